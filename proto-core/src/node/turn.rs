//! The end of a turn: its changes as one batch, and taking its pushes back if the batch could
//! not be written.
//!
//! A push changes the record at once (so later inputs of the same turn see it), but its reply
//! is only a promise once the turn's changes are durable. When the write fails, the driver
//! calls [`Node::end_turn`] with `written = false`: every push of the turn is undone from the
//! undo log kept here, its deliveries are dropped before they leave, its `0x00` replies become
//! `0xFF`, and its `PushAccepted` events become `PushFailed`. A refused push therefore leaves no
//! trace a device or a later start could see. An operator's removal ([`Node::remove`]) is
//! taken back too: the admin API answers it only after the write, so a failed write must leave
//! the record in memory as it stays on disk. The turn's other effects (acks, heartbeat
//! creations, expiry) stay in memory: losing them from the journal costs at most one duplicate
//! delivery after a crash, never an item.

use std::net::SocketAddr;

use crate::codec::Content;

use super::Node;
use crate::codec::{DownMsg, DownPacket, Kind, PushMsg, PushReply, Uuid};
use crate::output::{Dest, Event, Payload};
use crate::record::{flag, Record};
use crate::signed::SealedDown;
use crate::state::Change;
use crate::ConnId;

/// What one input of the turn changed that a failed write must take back, in turn order.
pub(super) enum Undo {
    /// A push.
    Push(PushUndo),
    /// An operator's removal: the whole record as it was.
    Removed(Box<RemovedRecord>),
}

/// A record removed by [`Node::remove`], with its side-table parts.
pub(super) struct RemovedRecord {
    rec: Record,
    payload: Option<Content>,
    addr: Option<SocketAddr>,
    tcp: Option<ConnId>,
}

/// What one push changed in its record.
pub(super) struct PushUndo {
    uuid: Uuid,
    kind: Kind,
    /// The push created the record.
    created: bool,
    /// 0x11 bits the push added (not already pending).
    bits_added: u64,
    /// 0x10 was already pending.
    notify_was: bool,
    /// The 0x20 payload before the push, and the one it stored.
    payload_was: Option<Content>,
    pushed: Option<Content>,
    last_push_was: u32,
}

impl Node {
    /// Notes what a push is about to change in `slot` (called before `store`).
    pub(super) fn note_undo(&mut self, slot: u32, created: bool, msg: &PushMsg) {
        let r = self.reg.rec(slot);
        self.undo.push(Undo::Push(PushUndo {
            uuid: r.uuid,
            kind: msg.kind(),
            created,
            bits_added: match msg {
                PushMsg::Bits(b) => b & !r.mask(),
                _ => 0,
            },
            notify_was: r.has(flag::NOTIFY),
            payload_was: self.reg.payloads.get(&slot).cloned(),
            pushed: match msg {
                PushMsg::Payload(p) => Some(p.clone()),
                _ => None,
            },
            last_push_was: r.last_push,
        }));
    }

    /// Notes the record in `slot` before an operator's removal (called before `remove_slot`).
    pub(super) fn note_removal(&mut self, slot: u32) {
        self.undo.push(Undo::Removed(Box::new(RemovedRecord {
            rec: *self.reg.rec(slot),
            payload: self.reg.payloads.get(&slot).cloned(),
            addr: self.reg.addr(slot),
            tcp: self.reg.tcp.get(&slot).copied(),
        })));
    }

    /// Takes back a removal whose write failed. If the uuid came back in the same turn (a
    /// heartbeat re-created it; a re-creating push was taken back before this), the removed
    /// record's items go back into that record, which keeps the newer heartbeat.
    fn undo_removal(&mut self, removed: RemovedRecord) {
        let RemovedRecord {
            rec,
            payload,
            addr,
            tcp,
        } = removed;
        // The record comes back with its own ledgers: what the removal left for a
        // re-creation is not needed.
        self.tombstones.remove(&rec.uuid);
        if let Some(slot) = self.reg.find(&rec.uuid) {
            self.count_pending(slot, -1);
            let r = self.reg.rec_mut(slot);
            r.set(flag::NOTIFY, r.has(flag::NOTIFY) || rec.has(flag::NOTIFY));
            r.set_mask(r.mask() | rec.mask());
            r.last_push = r.last_push.max(rec.last_push);
            if let Some(p) = payload.filter(|_| !r.has(flag::PAYLOAD)) {
                r.set(flag::PAYLOAD, true);
                self.reg.payloads.insert(slot, p);
            }
            self.count_pending(slot, 1);
            return;
        }
        let now_s = self.now.secs32();
        let due = rec.last_hb.saturating_add(self.window_s).saturating_add(1);
        let mut back = rec;
        let online = rec.has(flag::ONLINE) && due > now_s;
        back.set(flag::ONLINE, online);
        back.set(flag::TCP, false);
        let slot = self.reg.insert(back);
        if let Some(p) = payload {
            self.reg.payloads.insert(slot, p);
        }
        if let Some(a) = addr {
            self.reg.set_addr(slot, a);
        }
        match tcp.and_then(|c| self.conns.get_mut(&c).map(|conn| (c, conn))) {
            Some((c, conn)) => {
                if !conn.attached.contains(&slot) {
                    conn.attached.push(slot);
                }
                self.reg.tcp.insert(slot, c);
                self.reg.rec_mut(slot).set(flag::TCP, true);
            }
            // Its connection closed in this turn: as when a connection closes, nothing sent
            // on it can be acked any more.
            None if tcp.is_some() && addr.is_none() => self.forget_sends(slot),
            None => {}
        }
        self.stats.clients += 1;
        self.count_pending(slot, 1);
        if online {
            self.stats.online += 1;
            self.wheel.schedule(slot, due);
        } else if rec.has(flag::ONLINE) {
            self.events.push_back(Event::Offline { uuid: rec.uuid });
        }
    }

    /// The changes of the turn so far, in order, for the adapter to write as one batch.
    pub(crate) fn turn_changes(&mut self) -> &[Change] {
        self.changes.make_contiguous()
    }

    /// Ends the turn once its changes were written (`written`) or could not be. Returns how
    /// many pushes were taken back (0 when written).
    pub(crate) fn end_turn(&mut self, written: bool) -> u64 {
        self.changes.clear();
        self.end_key_turn(written);
        let undo = std::mem::take(&mut self.undo);
        if written {
            self.undo = undo;
            self.undo.clear();
            return 0;
        }
        let mut undo = undo;
        // Destinations and kinds whose packets this turn must not send.
        let mut silenced: Vec<(Dest, Kind)> = Vec::new();
        let mut refused = 0u64;
        for u in undo.drain(..).rev() {
            let u = match u {
                Undo::Push(u) => u,
                Undo::Removed(r) => {
                    self.undo_removal(*r);
                    continue;
                }
            };
            refused += 1;
            let Some(slot) = self.reg.find(&u.uuid) else {
                continue;
            };
            self.count_pending(slot, -1);
            let r = self.reg.rec_mut(slot);
            match u.kind {
                Kind::Notify if !u.notify_was => r.set(flag::NOTIFY, false),
                Kind::Notify => {}
                Kind::Bits => r.set_mask(r.mask() & !u.bits_added),
                Kind::Payload => {
                    // Only if the turn's acks did not clear it since.
                    if self.reg.payloads.get(&slot) == u.pushed.as_ref() {
                        match &u.payload_was {
                            Some(p) => {
                                self.reg.payloads.insert(slot, p.clone());
                            }
                            None => {
                                self.reg.payloads.remove(&slot);
                            }
                        }
                        let has = u.payload_was.is_some();
                        self.reg.rec_mut(slot).set(flag::PAYLOAD, has);
                    }
                }
            }
            self.reg.rec_mut(slot).last_push = u.last_push_was;
            self.count_pending(slot, 1);
            if let Some(a) = self.reg.addr(slot) {
                silenced.push((Dest::Udp(a), u.kind));
            }
            if let Some(c) = self.reg.tcp.get(&slot) {
                silenced.push((Dest::Tcp(*c), u.kind));
            }
            let r = self.reg.rec(slot);
            if u.created && !r.has(flag::HAS_HB) && !r.pending() && !r.has(flag::TCP) {
                // Nothing but the refused push ever knew this uuid.
                self.remove_slot(slot);
                self.stats.created -= 1;
            }
        }
        self.stats.pushes_accepted -= refused;
        self.stats.pushes_failed += refused;
        self.transmits.retain_mut(|t| match &mut t.payload {
            Payload::Reply(r) => {
                if *r == PushReply::Accepted {
                    *r = PushReply::Failed;
                }
                true
            }
            Payload::Down(DownPacket { msg, .. })
            | Payload::Sealed(SealedDown {
                packet: DownPacket { msg, .. },
                ..
            }) => {
                let kind = match msg {
                    DownMsg::HeartbeatReply => return true,
                    DownMsg::Notify => Kind::Notify,
                    DownMsg::Bits(_) => Kind::Bits,
                    DownMsg::Payload(_) => Kind::Payload,
                };
                !silenced.contains(&(t.dest, kind))
            }
        });
        for e in self.events.iter_mut() {
            if let Event::PushAccepted { uuid, kind, sent } = *e {
                self.stats.deliveries -= u64::from(sent);
                *e = Event::PushFailed { uuid, kind };
            }
        }
        self.undo = undo;
        self.undo.clear();
        refused
    }
}
