//! The driver: recovery and the turn, written once for every adapter and both modes.
//!
//! The server (`node-smol`), the simulator, the fuzz targets and [`crate::testing::Harness`]
//! all run a core the same way, and the durability promise lives in that sequence, so it lives
//! here and nowhere else. A core is the single node ([`Node`]) or a cluster node
//! ([`ClusterNode`]); one [`Driver`] runs either:
//!
//! * **Recovery** (single node): [`Recovery`] turns snapshot records and the journal's
//!   changes, in that order, into a node. A cluster node starts empty: its state is the store's.
//! * **The turn**: feed inputs to the core (`handle_*`; pushes from front ends other than port
//!   9999 through [`Driver::handle_push`]), then [`Driver::end_turn`] with the core's
//!   acceptance step, then drain the core's outputs (`poll_transmit`, `poll_close`,
//!   `poll_event`; a cluster node's `poll_store` and `poll_peer` too) and
//!   [`Driver::poll_reply`].
//!
//! **The one acceptance rule, with two ways of being durable.** A push is accepted (port 9999
//! `0x00`, the admin API's "accepted", any future front end) only once the acceptance step of
//! its core says it is durable, and the adapter never decides this itself. The step is the one
//! thing that differs between the modes ([`Acceptance`], in `accept.rs`):
//!
//! | core | step | a push is accepted when | otherwise |
//! |---|---|---|---|
//! | [`Node`] | [`Journal`] (or [`Driver::commit`]) | the write of its turn's changes succeeded, per the fsync policy of the write function | every push of the turn is taken back before anything leaves: its record is as before, its deliveries are dropped, `0x00` becomes `0xFF` |
//! | [`ClusterNode`] | [`StoreConfirmed`] | the store confirmed its push operation (and, when the store reports replication, per [`WaitPolicy`]) | `0xFF`: a store error, a time-out, or replicas short under [`WaitPolicy::Refuse`]; nothing is delivered from it |
//!
//! Either way a front-end push's [`Ticket`] resolves to the final reply, port 9999 replies
//! leave in request order, and the decision is taken before the turn's outputs are drained.
//!
//! **Changes before transmits.** A debug build panics if a single node's transmit is polled
//! while the turn still has uncommitted changes (`Node::poll_transmit` checks), and the tests
//! run debug builds, so an adapter that sends first fails its tests. A cluster node holds every
//! push reply until the step decided it.
//!
//! **Durability health.** The driver counts failed writes (single node: journal writes;
//! cluster node: pushes the store could not confirm) and tells the adapter when an episode of
//! failures starts and ends ([`Commit`], [`Settled`]), so "one log line per episode" is also
//! written once. While writes fail, every turn still tries; the first success ends the
//! episode, so recovery needs no restart and no operator.

mod accept;
mod recovery;

use std::collections::VecDeque;

use crate::cluster::{ClusterNode, OpId};
use crate::codec::{PushReply, PushRequest};
use crate::node::Node;
use crate::time::Time;

pub use accept::{Acceptance, Journal, Settled, StoreConfirmed, WaitPolicy};
pub use recovery::Recovery;

/// A push taken through [`Driver::handle_push`]; its reply is known after the acceptance step
/// that decides it ([`Driver::end_turn`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// What [`Driver::commit`] did (the single node's acceptance step).
#[derive(Debug)]
#[must_use]
pub enum Commit<E> {
    /// The turn changed nothing durable; nothing was written.
    Nothing,
    /// The turn's changes were written; its pushes are accepted.
    Written {
        /// This write ended an episode of failed writes (log it once).
        recovered: bool,
    },
    /// The write failed; the turn's pushes were taken back and answered `0xFF`.
    Failed {
        /// Why, from the write function.
        error: E,
        /// This failure started an episode (log it once).
        first: bool,
        /// Pushes taken back.
        refused: u64,
    },
}

/// How a front-end push stands once its core took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    /// Decided by the core at once (`0x01`, or an accepted push that the turn's write decides).
    Turn(PushReply),
    /// Waiting for the store's confirmation of this operation.
    Op(OpId),
}

/// Seals [`Core`]: only this crate's state machines are driven.
mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::node::Node {}
    impl Sealed for crate::cluster::ClusterNode {}
}

/// A state machine the [`Driver`] runs: [`Node`] or [`ClusterNode`]. Sealed; its only method
/// is the driver's way in for front-end pushes.
pub trait Core: sealed::Sealed {
    #[doc(hidden)]
    fn front_push(&mut self, now: Time, req: PushRequest) -> FrontPush;
}

/// How a core took a front-end push (hidden: between the driver and the cores).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontPush {
    /// The reply is known (a rejection), or is the turn's to decide (single node).
    Turn(PushReply),
    /// The push is store operation `OpId`; its confirmation decides it.
    Op(OpId),
}

impl Core for Node {
    fn front_push(&mut self, now: Time, req: PushRequest) -> FrontPush {
        FrontPush::Turn(self.handle_push(now, req))
    }
}

impl Core for ClusterNode {
    fn front_push(&mut self, now: Time, req: PushRequest) -> FrontPush {
        match self.handle_push(now, req) {
            Ok(op) => FrontPush::Op(op),
            Err(reply) => FrontPush::Turn(reply),
        }
    }
}

/// The turn sequence and the acceptance rule around a core the adapter owns.
#[derive(Debug)]
pub struct Driver {
    /// Front-end pushes not decided yet, with how they stand.
    open: Vec<(Ticket, Open)>,
    /// Resolved replies, waiting for [`Driver::poll_reply`].
    replies: VecDeque<(Ticket, PushReply)>,
    next_ticket: u64,
    storage_ok: bool,
    failed_writes: u64,
}

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}

impl Driver {
    /// A driver with healthy storage.
    pub fn new() -> Self {
        Driver {
            open: Vec::new(),
            replies: VecDeque::new(),
            next_ticket: 0,
            storage_ok: true,
            failed_writes: 0,
        }
    }

    /// A push from a front end other than port 9999 (admin API, tools). Its reply comes out of
    /// [`Driver::poll_reply`] once the acceptance step decided it: the turn's commit (single
    /// node), or the turn in which the store's confirmation arrived (cluster node).
    pub fn handle_push<C: Core>(&mut self, core: &mut C, now: Time, req: PushRequest) -> Ticket {
        let t = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let open = match core.front_push(now, req) {
            FrontPush::Turn(r) => Open::Turn(r),
            FrontPush::Op(op) => Open::Op(op),
        };
        self.open.push((t, open));
        t
    }

    /// Ends the turn with the core's acceptance step: [`Journal`] for a [`Node`],
    /// [`StoreConfirmed`] for a [`ClusterNode`]. Call it after the turn's inputs and before
    /// draining any output; what it returns says what the step did (for logs and metrics).
    pub fn end_turn<C: Core, A: Acceptance<C>>(&mut self, core: &mut C, step: A) -> A::Outcome {
        step.decide(core, self)
    }

    /// The single node's acceptance step: hands the turn's changes to `write` as one batch
    /// (skipped when there are none), and lets the outcome decide every push of the turn.
    /// The same as `end_turn(node, Journal(write))`.
    pub fn commit<E>(
        &mut self,
        node: &mut Node,
        write: impl FnOnce(&[crate::state::Change]) -> Result<(), E>,
    ) -> Commit<E> {
        self.end_turn(node, Journal(write))
    }

    /// The final reply of a [`Driver::handle_push`], once the acceptance step decided it.
    #[must_use]
    pub fn poll_reply(&mut self) -> Option<(Ticket, PushReply)> {
        self.replies.pop_front()
    }

    /// Front-end pushes not decided yet.
    pub fn undecided(&self) -> usize {
        self.open.len()
    }

    /// Notes a failed write outside a turn (a periodic fsync, for example): the storage is
    /// degraded until a write succeeds. Returns true if this starts an episode.
    pub fn write_failed(&mut self) -> bool {
        self.failed_writes += 1;
        std::mem::replace(&mut self.storage_ok, false)
    }

    /// Notes a successful write. Returns true if this ends an episode of failures.
    pub fn write_succeeded(&mut self) -> bool {
        !std::mem::replace(&mut self.storage_ok, true)
    }

    /// False from a failed write until the next successful one.
    pub fn storage_ok(&self) -> bool {
        self.storage_ok
    }

    /// Writes that failed since start (cluster node: pushes the store could not confirm).
    pub fn failed_writes(&self) -> u64 {
        self.failed_writes
    }

    /// Resolves the front-end pushes the turn decides: those the core answered at once, and,
    /// when the turn's write failed (`written` false), every accepted one becomes `0xFF`.
    fn resolve_turn(&mut self, written: bool) {
        let mut i = 0;
        while i < self.open.len() {
            if let Open::Turn(r) = self.open[i].1 {
                let t = self.open.remove(i).0;
                let r = match r {
                    PushReply::Accepted if !written => PushReply::Failed,
                    r => r,
                };
                self.replies.push_back((t, r));
            } else {
                i += 1;
            }
        }
    }

    /// Resolves the front-end push that was store operation `op`, if one was.
    fn resolve_op(&mut self, op: OpId, reply: PushReply) {
        if let Some(i) = self.open.iter().position(|(_, o)| *o == Open::Op(op)) {
            let t = self.open.remove(i).0;
            self.replies.push_back((t, reply));
        }
    }
}
