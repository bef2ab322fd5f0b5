//! The acceptance step of a turn: the one thing the two modes do differently.
//!
//! [`Journal`] makes a single node's pushes durable by writing the turn's changes; a cluster
//! node's pushes are durable when the store confirmed them, which [`StoreConfirmed`] reads
//! from the confirmations the node collected during the turn. Both resolve the driver's
//! front-end tickets and keep its durability health; neither is async: the journal write is a
//! function the adapter passes in, the store's confirmations are inputs that came earlier.

use crate::cluster::{ClusterNode, Confirmation};
use crate::codec::PushReply;
use crate::node::Node;
use crate::state::Change;

use super::{Commit, Core, Driver};

/// An acceptance step for core `C` (sealed: [`Journal`] for [`Node`], [`StoreConfirmed`] for
/// [`ClusterNode`]). [`Driver::end_turn`] runs it.
pub trait Acceptance<C: Core>: sealed::Sealed {
    /// What the step reports (for logs and metrics).
    type Outcome;
    #[doc(hidden)]
    fn decide(self, core: &mut C, driver: &mut Driver) -> Self::Outcome;
}

mod sealed {
    pub trait Sealed {}
    impl<F> Sealed for super::Journal<F> {}
    impl Sealed for super::StoreConfirmed {}
}

/// The single node's step: `0.0` writes the turn's changes as one batch, as the fsync policy
/// requires; the pushes of the turn are accepted only if it succeeded.
pub struct Journal<F>(pub F);

impl<E, F: FnOnce(&[Change]) -> Result<(), E>> Acceptance<Node> for Journal<F> {
    type Outcome = Commit<E>;

    fn decide(self, node: &mut Node, d: &mut Driver) -> Commit<E> {
        let outcome = {
            let changes = node.turn_changes();
            if changes.is_empty() {
                Commit::Nothing
            } else {
                match (self.0)(changes) {
                    Ok(()) => Commit::Written {
                        recovered: d.write_succeeded(),
                    },
                    Err(error) => Commit::Failed {
                        error,
                        first: d.write_failed(),
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
        d.resolve_turn(written);
        outcome
    }
}

/// What a push needs from the store's replicas before `0x00`, when the store reports that it
/// asked them (Redis `WAIT`, `--cluster-wait-fail`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WaitPolicy {
    /// A push the replicas did not confirm in time is answered `0xFF` (the app server
    /// retries; at worst a duplicate). The default: `0x00` means on a replica too.
    #[default]
    Refuse,
    /// It is accepted anyway: `0x00` means on the primary; a fail-over right after can lose it.
    Accept,
}

/// The cluster node's step: every push whose store operation finished during the turn is
/// decided now, in the order the results came in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreConfirmed {
    /// The replica policy for pushes the store reports as not replicated in time.
    pub wait: WaitPolicy,
}

/// What [`StoreConfirmed`] decided in one turn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Settled {
    /// Pushes answered `0x00`.
    pub accepted: u64,
    /// Pushes answered `0xFF` (store error, time-out, or replicas short under
    /// [`WaitPolicy::Refuse`]).
    pub refused: u64,
    /// A refusal started an episode of unconfirmed pushes (log it once).
    pub first: bool,
    /// An accepted push ended such an episode (log it once).
    pub recovered: bool,
}

impl StoreConfirmed {
    /// The rule: `0x00` only for a push the store confirmed (tools that store pushes
    /// without a node, like `ddpushd import-ddpush`, apply it too).
    pub fn reply(self, c: &Confirmation) -> PushReply {
        match c {
            Confirmation::Stored => PushReply::Accepted,
            Confirmation::Unreplicated if self.wait == WaitPolicy::Accept => PushReply::Accepted,
            Confirmation::Unreplicated | Confirmation::Failed(_) => PushReply::Failed,
        }
    }
}

impl Acceptance<ClusterNode> for StoreConfirmed {
    type Outcome = Settled;

    fn decide(self, node: &mut ClusterNode, d: &mut Driver) -> Settled {
        let mut s = Settled::default();
        while let Some((op, reply)) = node.settle_next(|c| self.reply(c)) {
            if reply == PushReply::Accepted {
                s.accepted += 1;
                s.recovered |= d.write_succeeded();
            } else {
                s.refused += 1;
                s.first |= d.write_failed();
            }
            d.resolve_op(op, reply);
        }
        // Front-end pushes the node answered at once (a rejection) resolve with the turn.
        d.resolve_turn(true);
        s
    }
}
