//! The shared store's data model and its atomic operations, as values.
//!
//! One [`StoredRecord`] per uuid is the truth for pending items and ownership. Every change is
//! one [`StoreOp`] on one uuid (a [`StoreOp::Drain`] is a batch of such per-uuid steps), and
//! [`MemStore::apply`] is the reference semantics: the simulator's store host runs exactly this
//! code, and the Redis adapter's Lua scripts (part 2) must do the same thing on one hash per
//! uuid plus the owner's dirty set in the same slot. Nothing here reads a clock: every op
//! carries the issuing node's time.
//!
//! # Versions and generations
//!
//! `ver` grows on every change of a record, as `max(ver + 1, at_ms)` where `at_ms` is the
//! issuing node's clock. A pushed 0x10 or 0x20 takes the new `ver` as its generation, so a
//! generation is never reused for a different message, even after a store fail-over dropped
//! the last writes (the next push happens later by the clock, and node clocks are far closer
//! than a fail-over is long). Nodes keep a copy of a record at some `ver` and replace it only
//! with a newer one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{Content, Kind, PushMsg, Uuid};
use crate::time::Time;

use super::NodeId;

/// A message generation: the record version of the push that stored it.
pub type Gen = u64;

/// The shared record of one uuid.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Grows on every change (see the module docs).
    pub ver: u64,
    /// The node the device is attached to (None until its first heartbeat binds it).
    pub owner: Option<NodeId>,
    /// Grows by one on every bind; acks carry the epoch their node bound under.
    pub epoch: u64,
    /// The pending 0x10 flag, by generation.
    pub notify: Option<Gen>,
    /// The pending 0x11 mask.
    pub bits: u64,
    /// The pending 0x20 payload and its generation.
    pub payload: Option<(Gen, Content)>,
    /// Time of the newest accepted push of [0x10, 0x11, 0x20] (None: never).
    pub pushed_at: [Option<Time>; 3],
}

impl StoredRecord {
    /// Anything waiting for an ack.
    pub fn has_pending(&self) -> bool {
        self.notify.is_some() || self.bits != 0 || self.payload.is_some()
    }

    fn bump(&mut self, at: Time) {
        self.ver = (self.ver + 1).max(at.as_millis());
    }
}

/// Identifies a store operation, so that its result can be matched when it comes back.
pub type OpId = u64;

/// One atomic store operation (per uuid; a drain is a batch of per-uuid steps).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreOp {
    /// Store a push: 0x10 sets the flag with a new generation, 0x11 ORs, 0x20 replaces with a
    /// new generation. Creates the record if absent. Marks the uuid dirty for its owner.
    Push {
        /// The client.
        uuid: Uuid,
        /// What.
        msg: PushMsg,
        /// The pushing node's clock.
        at: Time,
    },
    /// An ack attributed by `node`: clears 0x10/0x20 only if `gen` is the pending generation,
    /// 0x11 clears exactly `bits`; nothing happens unless `node` owns the record at `epoch`.
    Ack {
        /// The client.
        uuid: Uuid,
        /// The acking node.
        node: NodeId,
        /// The epoch that node bound the record under.
        epoch: u64,
        /// Which item.
        kind: Kind,
        /// For 0x10/0x20: the generation the node attributes the ack to.
        gen: Gen,
        /// For 0x11: the acked bits.
        bits: u64,
        /// The acking node's clock.
        at: Time,
    },
    /// A heartbeat reached `node`, which does not hold the record: owner = `node`,
    /// epoch + 1. Creates the record if absent. Marks the uuid dirty for the previous owner so
    /// that it drops its copy.
    Bind {
        /// The client.
        uuid: Uuid,
        /// The new owner.
        node: NodeId,
        /// Its clock.
        at: Time,
    },
    /// First removes `node`'s dirty marks listed in `done` whose version is at most the one
    /// given (the node has merged that version), then returns up to `limit` of its remaining
    /// marks, each with its record.
    Drain {
        /// Whose marks.
        node: NodeId,
        /// Marks already handled: (uuid, version merged).
        done: Vec<(Uuid, u64)>,
        /// At most this many marks returned.
        limit: usize,
    },
}

impl StoreOp {
    /// The uuid of a single-record operation (None for a drain).
    pub fn uuid(&self) -> Option<Uuid> {
        match self {
            StoreOp::Push { uuid, .. } | StoreOp::Ack { uuid, .. } | StoreOp::Bind { uuid, .. } => {
                Some(*uuid)
            }
            StoreOp::Drain { .. } => None,
        }
    }
}

/// A dirty mark returned by a drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The client.
    pub uuid: Uuid,
    /// The record version that set the mark.
    pub ver: u64,
    /// The record now.
    pub record: StoredRecord,
}

/// What an operation did. Every single-record reply carries the record after the operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreReply {
    /// The push is stored (on as many replicas as the adapter was asked to wait for).
    Pushed(StoredRecord),
    /// The push is stored on the primary, but fewer replicas than asked confirmed it in time
    /// (Redis `WAIT`). Whether it is accepted is the acceptance rule's business
    /// ([`crate::driver::WaitPolicy`]); [`MemStore`] never answers it.
    PushedUnreplicated(StoredRecord),
    /// The ack was applied; `cleared` says whether it cleared anything.
    Acked {
        /// The record after the ack.
        record: StoredRecord,
        /// Whether an item (or some bits) was cleared.
        cleared: bool,
    },
    /// The acking node does not own the record at the epoch it gave: it must drop its copy.
    Stale(StoredRecord),
    /// The record is bound to the node.
    Bound(StoredRecord),
    /// Dirty marks, and whether more remain.
    Drained {
        /// Up to `limit` marks.
        marks: Vec<Mark>,
        /// More marks remain after these.
        more: bool,
    },
}

/// Why an operation has no reply: the node must assume nothing about its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or refused the operation.
    #[error("store unavailable")]
    Unavailable,
    /// No reply within the store time-out (the operation may or may not have happened).
    #[error("store operation timed out")]
    Timeout,
}

/// The result of one operation, as the adapter hands it back.
pub type StoreResult = Result<StoreReply, StoreError>;

/// An in-memory store with the reference semantics of every operation.
///
/// The simulator's store host is one of these; tests use it directly. Iteration orders are
/// deterministic (B-trees).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStore {
    records: BTreeMap<Uuid, StoredRecord>,
    /// Per owner: uuid -> version that set the mark.
    dirty: BTreeMap<NodeId, BTreeMap<Uuid, u64>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// One record.
    pub fn get(&self, uuid: &Uuid) -> Option<&StoredRecord> {
        self.records.get(uuid)
    }

    /// Every record, by uuid.
    pub fn records(&self) -> impl Iterator<Item = (&Uuid, &StoredRecord)> {
        self.records.iter()
    }

    /// Dirty marks held for `node`.
    pub fn dirty_count(&self, node: &NodeId) -> usize {
        self.dirty.get(node).map_or(0, BTreeMap::len)
    }

    fn mark(&mut self, owner: &NodeId, uuid: Uuid, ver: u64) {
        self.dirty
            .entry(owner.clone())
            .or_default()
            .insert(uuid, ver);
    }

    /// Executes one operation atomically.
    pub fn apply(&mut self, op: &StoreOp) -> StoreReply {
        match op {
            StoreOp::Push { uuid, msg, at } => {
                let r = self.records.entry(*uuid).or_default();
                let idx = match msg {
                    PushMsg::Notify => 0,
                    PushMsg::Bits(_) => 1,
                    PushMsg::Payload(_) => 2,
                };
                let changes = !matches!(msg, PushMsg::Bits(b) if r.bits | b == r.bits);
                if changes {
                    r.bump(*at);
                }
                match msg {
                    PushMsg::Notify => r.notify = Some(r.ver),
                    PushMsg::Bits(b) => r.bits |= b,
                    PushMsg::Payload(p) => r.payload = Some((r.ver, p.clone())),
                }
                r.pushed_at[idx] = Some(r.pushed_at[idx].map_or(*at, |t| t.max(*at)));
                let r = r.clone();
                if changes {
                    if let Some(o) = &r.owner {
                        self.mark(o, *uuid, r.ver);
                    }
                }
                StoreReply::Pushed(r)
            }
            StoreOp::Ack {
                uuid,
                node,
                epoch,
                kind,
                gen,
                bits,
                at,
            } => {
                let Some(r) = self.records.get_mut(uuid) else {
                    return StoreReply::Stale(StoredRecord::default());
                };
                if r.owner.as_ref() != Some(node) || r.epoch != *epoch {
                    return StoreReply::Stale(r.clone());
                }
                let cleared = match kind {
                    Kind::Notify if r.notify == Some(*gen) => {
                        r.notify = None;
                        true
                    }
                    Kind::Payload if r.payload.as_ref().is_some_and(|(g, _)| g == gen) => {
                        r.payload = None;
                        true
                    }
                    Kind::Bits if r.bits & bits != 0 => {
                        r.bits &= !bits;
                        true
                    }
                    _ => false,
                };
                if cleared {
                    r.bump(*at);
                }
                StoreReply::Acked {
                    record: r.clone(),
                    cleared,
                }
            }
            StoreOp::Bind { uuid, node, at } => {
                let r = self.records.entry(*uuid).or_default();
                let previous = r.owner.replace(node.clone());
                r.epoch += 1;
                r.bump(*at);
                let r = r.clone();
                if let Some(p) = previous.filter(|p| p != node) {
                    self.mark(&p, *uuid, r.ver);
                }
                // The new owner has this version now; an older mark of its own is moot.
                if let Some(d) = self.dirty.get_mut(node) {
                    d.remove(uuid);
                }
                StoreReply::Bound(r)
            }
            StoreOp::Drain { node, done, limit } => {
                let empty = BTreeMap::new();
                if let Some(d) = self.dirty.get_mut(node) {
                    for (uuid, ver) in done {
                        if d.get(uuid).is_some_and(|v| v <= ver) {
                            d.remove(uuid);
                        }
                    }
                }
                let d = self.dirty.get(node).unwrap_or(&empty);
                let marks = d
                    .iter()
                    .take(*limit)
                    .map(|(uuid, ver)| Mark {
                        uuid: *uuid,
                        ver: *ver,
                        record: self.records.get(uuid).cloned().unwrap_or_default(),
                    })
                    .collect();
                StoreReply::Drained {
                    marks,
                    more: d.len() > *limit,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(i: u8) -> Uuid {
        Uuid([i; 16])
    }

    fn n(s: &str) -> NodeId {
        NodeId::from(s)
    }

    fn rec(r: StoreReply) -> StoredRecord {
        match r {
            StoreReply::Pushed(r)
            | StoreReply::PushedUnreplicated(r)
            | StoreReply::Bound(r)
            | StoreReply::Stale(r) => r,
            StoreReply::Acked { record, .. } => record,
            StoreReply::Drained { .. } => panic!("not a record reply"),
        }
    }

    fn push(s: &mut MemStore, uuid: Uuid, msg: PushMsg, at: u64) -> StoredRecord {
        rec(s.apply(&StoreOp::Push {
            uuid,
            msg,
            at: Time(at),
        }))
    }

    fn ack(
        s: &mut MemStore,
        node: &str,
        epoch: u64,
        kind: Kind,
        gen: Gen,
        bits: u64,
    ) -> StoreReply {
        s.apply(&StoreOp::Ack {
            uuid: u(1),
            node: n(node),
            epoch,
            kind,
            gen,
            bits,
            at: Time(0),
        })
    }

    #[test]
    fn pushes_merge_with_generations() {
        let mut s = MemStore::new();
        let a = push(
            &mut s,
            u(1),
            PushMsg::Payload(Content::from_static(b"a")),
            10,
        );
        let b = push(
            &mut s,
            u(1),
            PushMsg::Payload(Content::from_static(b"b")),
            10,
        );
        assert!(b.ver > a.ver);
        assert_eq!(b.payload, Some((b.ver, Content::from_static(b"b"))));
        push(&mut s, u(1), PushMsg::Bits(1), 11);
        let r = push(&mut s, u(1), PushMsg::Bits(4), 12);
        assert_eq!(r.bits, 5);
        let again = push(&mut s, u(1), PushMsg::Bits(4), 13);
        assert_eq!(
            again.ver, r.ver,
            "a push that changes nothing keeps the version"
        );
        assert_eq!(r.owner, None);
    }

    #[test]
    fn ack_clears_only_its_generation_and_only_for_the_owner_at_its_epoch() {
        let mut s = MemStore::new();
        let b = rec(s.apply(&StoreOp::Bind {
            uuid: u(1),
            node: n("a"),
            at: Time(1),
        }));
        assert_eq!((b.owner.clone(), b.epoch), (Some(n("a")), 1));
        let old = push(
            &mut s,
            u(1),
            PushMsg::Payload(Content::from_static(b"old")),
            5,
        );
        let old_gen = old.payload.as_ref().map(|p| p.0).unwrap_or_default();
        let new = push(
            &mut s,
            u(1),
            PushMsg::Payload(Content::from_static(b"new")),
            6,
        );
        // The ack of the older send does not clear the newer payload.
        let r = ack(&mut s, "a", 1, Kind::Payload, old_gen, 0);
        assert!(matches!(r, StoreReply::Acked { cleared: false, .. }));
        // Another node, or the right node at an old epoch, clears nothing.
        let new_gen = new.payload.as_ref().map(|p| p.0).unwrap_or_default();
        assert!(matches!(
            ack(&mut s, "b", 1, Kind::Payload, new_gen, 0),
            StoreReply::Stale(_)
        ));
        assert!(matches!(
            ack(&mut s, "a", 0, Kind::Payload, new_gen, 0),
            StoreReply::Stale(_)
        ));
        let r = ack(&mut s, "a", 1, Kind::Payload, new_gen, 0);
        assert!(matches!(r, StoreReply::Acked { cleared: true, .. }));
        assert!(s.get(&u(1)).is_some_and(|r| r.payload.is_none()));
    }

    #[test]
    fn bits_ack_clears_exactly_its_bits() {
        let mut s = MemStore::new();
        s.apply(&StoreOp::Bind {
            uuid: u(1),
            node: n("a"),
            at: Time(1),
        });
        push(&mut s, u(1), PushMsg::Bits(0b111), 2);
        ack(&mut s, "a", 1, Kind::Bits, 0, 0b101);
        assert_eq!(s.get(&u(1)).map(|r| r.bits), Some(0b010));
    }

    #[test]
    fn pushes_mark_the_owner_dirty_until_drained_and_done() {
        let mut s = MemStore::new();
        push(&mut s, u(1), PushMsg::Notify, 1);
        assert_eq!(s.dirty_count(&n("a")), 0, "no owner, no mark");
        s.apply(&StoreOp::Bind {
            uuid: u(1),
            node: n("a"),
            at: Time(2),
        });
        let p = push(&mut s, u(1), PushMsg::Notify, 3);
        let drain = |s: &mut MemStore, done| {
            s.apply(&StoreOp::Drain {
                node: n("a"),
                done,
                limit: 10,
            })
        };
        let StoreReply::Drained { marks, more } = drain(&mut s, vec![]) else {
            panic!("drain reply")
        };
        assert!(!more);
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].record, p);
        // A newer push re-marks: an old `done` does not remove the newer mark.
        let q = push(
            &mut s,
            u(1),
            PushMsg::Payload(Content::from_static(b"x")),
            4,
        );
        drain(&mut s, vec![(u(1), p.ver)]);
        assert_eq!(s.dirty_count(&n("a")), 1);
        drain(&mut s, vec![(u(1), q.ver)]);
        assert_eq!(s.dirty_count(&n("a")), 0);
    }

    #[test]
    fn bind_moves_ownership_and_tells_the_old_owner() {
        let mut s = MemStore::new();
        for (node, epoch) in [("a", 1), ("b", 2)] {
            let r = rec(s.apply(&StoreOp::Bind {
                uuid: u(1),
                node: n(node),
                at: Time(1),
            }));
            assert_eq!((r.owner, r.epoch), (Some(n(node)), epoch));
        }
        assert_eq!(
            s.dirty_count(&n("a")),
            1,
            "the old owner learns by its dirty marks"
        );
        assert_eq!(s.dirty_count(&n("b")), 0);
    }

    #[test]
    fn versions_follow_the_clock_so_a_lost_write_is_never_reused() {
        let mut s = MemStore::new();
        let before = s.clone();
        let lost = push(&mut s, u(1), PushMsg::Notify, 1_000);
        // Fail-over to a replica that never saw the write, then a later push.
        let mut s = before;
        let later = push(&mut s, u(1), PushMsg::Notify, 1_500);
        assert!(later.notify > lost.notify);
    }
}
