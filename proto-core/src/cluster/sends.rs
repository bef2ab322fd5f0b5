//! Which send an ack of 0x10/0x20 answers, per node and kind.
//!
//! INTERIM: this is the generation-based attribution the cluster node needs until the single
//! node's attribution rule (issue #12) lands in the core; then this file goes and both modes
//! call that one rule.

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Time;

use super::Gen;

/// Most sends remembered per kind; older ones are forgotten (their acks stay unattributed).
const MAX_SENDS: usize = 8;

/// How long after a send its ack may still arrive (the single node's former default).
pub(crate) const HORIZON: Duration = Duration::from_secs(10);

/// Sends of one kind not yet matched by an ack, oldest first.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sends {
    open: VecDeque<(Gen, Time)>,
}

impl Sends {
    pub(crate) fn on_send(&mut self, gen: Gen, now: Time) {
        if self.open.len() == MAX_SENDS {
            self.open.pop_front();
        }
        self.open.push_back((gen, now));
    }

    /// The generation this ack answers, or None when it cannot be told.
    pub(crate) fn on_ack(&mut self, now: Time, horizon: Duration) -> Option<Gen> {
        while self.open.front().is_some_and(|&(_, t)| t + horizon < now) {
            self.open.pop_front();
        }
        let first = self.open.front()?.0;
        let unique = self.open.iter().all(|&(g, _)| g == first);
        self.open.pop_front();
        unique.then_some(first)
    }

    pub(crate) fn clear(&mut self) {
        self.open.clear();
    }
}
