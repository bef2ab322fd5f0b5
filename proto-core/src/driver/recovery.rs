//! Recovery: snapshot records, then journaled changes, into a node (single-node mode; a
//! cluster node starts empty, its state is in the store).

use crate::codec::Uuid;
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

    /// One removal floor from the snapshot (after its records, before any change): a key
    /// provisioned for `uuid` later refuses stamps up to `until` (PROTOCOL.md 9.3).
    pub fn removal_floor(&mut self, uuid: Uuid, until: u32) {
        debug_assert_eq!(self.changes, 0, "snapshot floor after a journal change");
        self.node.restore_removal_floor(self.now, uuid, until);
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
