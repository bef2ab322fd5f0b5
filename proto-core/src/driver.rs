//! The driver: recovery and the turn, written once for every adapter.
//!
//! The server (`node-smol`), the simulator, the fuzz targets and [`crate::testing::Harness`]
//! all run a [`Node`] the same way, and the durability promise lives in that sequence, so it
//! lives here and nowhere else:
//!
//! * **Recovery**: [`Recovery`] turns snapshot records and the journal's changes, in that order,
//!   into a node.
//! * **The turn**: feed inputs to the node (`Node::handle_*`; pushes from front ends other than
//!   port 9999 through [`Driver::handle_push`]), then [`Driver::commit`] with a function that
//!   writes the turn's changes as the fsync policy requires, then drain
//!   [`Node::poll_transmit`], [`Node::poll_close`], [`Node::poll_event`] and
//!   [`Driver::poll_reply`].
//!
//! **The one acceptance rule.** A push is accepted (port 9999 `0x00`, the admin API's
//! "accepted", any future front end) only if the write of its turn succeeded. If it failed,
//! [`Driver::commit`] takes every push of the turn back before anything leaves: its record is
//! as before, its deliveries are dropped, its `0x00` becomes `0xFF` and its ticket resolves to
//! [`PushReply::Failed`]. The adapter never decides this itself.
//!
//! **Changes before transmits.** A debug build panics if a transmit is polled while the turn
//! still has uncommitted changes (`Node::poll_transmit` checks), and the tests run debug
//! builds, so an adapter that sends first fails its tests.
//!
//! **Storage health.** The driver counts failed writes and tells the adapter when an episode
//! of failures starts and ends ([`Commit`]), so "one log line per episode" is also written
//! once. While writes fail, every turn still tries to write; the first turn whose write
//! succeeds ends the episode, so recovery needs no restart and no operator.

use std::collections::VecDeque;

use crate::codec::{PushReply, PushRequest, Uuid};
use crate::config::{Config, ConfigError};
use crate::node::Node;
use crate::signed::KeyState;
use crate::state::{Change, RecordState};
use crate::time::Time;

/// Rebuilds a node from persisted state: every snapshot record first, then every journaled
/// change in order.
pub struct Recovery {
    node: Node,
    now: Time,
    records: u64,
    changes: u64,
}

impl Recovery {
    /// Starts a recovery at `now` (the time records are restored at).
    pub fn new(cfg: Config, now: Time) -> Result<Self, ConfigError> {
        Ok(Recovery {
            node: Node::new(cfg)?,
            now,
            records: 0,
            changes: 0,
        })
    }

    /// One snapshot record. All of them come before the first [`Recovery::change`].
    pub fn record(&mut self, st: RecordState) {
        debug_assert_eq!(self.changes, 0, "snapshot record after a journal change");
        self.node.restore(self.now, st);
        self.records += 1;
    }

    /// One signed-only uuid's keys from the snapshot (after its records, before any change).
    pub fn key(&mut self, uuid: Uuid, keys: KeyState) {
        debug_assert_eq!(self.changes, 0, "snapshot key after a journal change");
        self.node.restore_key(self.now, uuid, keys);
    }

    /// One journaled change, in journal order.
    pub fn change(&mut self, c: &Change) {
        self.node.apply(c);
        self.changes += 1;
    }

    /// Records restored so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Changes replayed so far.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The rebuilt node. Restore and replay journal nothing, so it starts with an empty turn.
    pub fn finish(mut self) -> Node {
        debug_assert!(
            self.node.turn_changes().is_empty(),
            "restore and replay must not journal"
        );
        self.node
    }
}

/// A push taken through [`Driver::handle_push`]; its reply is known after the turn's commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// What [`Driver::commit`] did.
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

/// The turn sequence and the acceptance rule around a [`Node`] the adapter owns.
#[derive(Debug)]
pub struct Driver {
    /// Front-end pushes of the current turn with their provisional replies.
    open: Vec<(Ticket, PushReply)>,
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
    /// [`Driver::poll_reply`] after the turn's [`Driver::commit`].
    pub fn handle_push(&mut self, node: &mut Node, now: Time, req: PushRequest) -> Ticket {
        let t = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let r = node.handle_push(now, req);
        self.open.push((t, r));
        t
    }

    /// Ends the turn: hands its changes to `write` as one batch (skipped when there are none),
    /// and lets the outcome decide every push of the turn. Call it after the turn's inputs and
    /// before draining any output.
    pub fn commit<E>(
        &mut self,
        node: &mut Node,
        write: impl FnOnce(&[Change]) -> Result<(), E>,
    ) -> Commit<E> {
        let outcome = {
            let changes = node.turn_changes();
            if changes.is_empty() {
                Commit::Nothing
            } else {
                match write(changes) {
                    Ok(()) => Commit::Written {
                        recovered: self.write_succeeded(),
                    },
                    Err(error) => Commit::Failed {
                        error,
                        first: self.write_failed(),
                        refused: 0,
                    },
                }
            }
        };
        let (outcome, written) = match outcome {
            Commit::Failed { error, first, .. } => {
                let refused = node.end_turn(false);
                (
                    Commit::Failed {
                        error,
                        first,
                        refused,
                    },
                    false,
                )
            }
            other => {
                node.end_turn(true);
                (other, true)
            }
        };
        for (t, r) in self.open.drain(..) {
            let r = match r {
                PushReply::Accepted if !written => PushReply::Failed,
                r => r,
            };
            self.replies.push_back((t, r));
        }
        outcome
    }

    /// The final reply of a [`Driver::handle_push`], once its turn is committed.
    #[must_use]
    pub fn poll_reply(&mut self) -> Option<(Ticket, PushReply)> {
        self.replies.pop_front()
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

    /// Writes that failed since start.
    pub fn failed_writes(&self) -> u64 {
        self.failed_writes
    }
}
