//! The node's side of signed devices (PROTOCOL.md section 9): key updates, the signed input
//! path, v1 packets naming a signed-only uuid, and sealing what goes out to signed devices.

use std::time::Duration;

use crate::codec::{DeviceMsg, DevicePacket, DownMsg, DownPacket, Uuid};
use crate::output::{Dest, Payload, Transmit};
use crate::record::flag;
use crate::signed::keyring::Ahead;
use crate::signed::{
    DeviceKey, KeyError, KeyState, KeyUpdate, KeyedMac, Removed, Unsigned, TRAILER_LEN,
};
use crate::state::Change;
use crate::time::Time;

use super::{Node, Via};

/// What a key update of the current turn replaced, to take it back if the turn's write fails.
pub(super) enum KeyUndo {
    /// The uuid's key state before a provisioning, rotation or ahead-bound raise (`None`: it
    /// had no key).
    Keys(Uuid, Option<KeyState>),
    /// A removal: the whole entry, so that its replay memory comes back as it was.
    Removed(Removed),
}

/// The verified signed packet being handled.
pub(super) struct Answering {
    uuid: Uuid,
    /// The key it verified under: answers are sealed under it.
    key_id: u8,
    /// That key HMAC-keyed, when it is the uuid's current key (`None` for a rotation's
    /// previous key): answers are sealed with it without a second keyring lookup.
    mac: Option<KeyedMac>,
    /// The keyring's hint of the uuid's record slot.
    slot_hint: Option<u32>,
}

/// Datagrams whose memory [`Node::load_ahead`] loads at a time (the server's `recvmmsg`
/// batch).
const LOAD_AHEAD: usize = 64;

/// The longest rotation grace period a key update may ask for.
pub const MAX_KEY_GRACE: Duration = Duration::from_secs(90 * 24 * 3600);

impl Node {
    /// Provisions or rotates the key of `uuid` (the admin API's `PUT /clients/{uuid}/key`).
    ///
    /// The first key makes the uuid signed-only: the record's address and TCP attachment,
    /// which anyone could have set with a v1 heartbeat, are forgotten, so nothing goes out
    /// before a verified heartbeat. A new key id rotates: the old key stays valid for `grace`.
    /// Journaled as [`Change::Keyed`]; an unchanged key journals nothing.
    pub fn set_key(
        &mut self,
        now: Time,
        uuid: Uuid,
        key_id: u8,
        key: DeviceKey,
        grace: Duration,
    ) -> Result<KeyUpdate, KeyError> {
        self.advance(now);
        let grace = grace.min(MAX_KEY_GRACE);
        let before = self.keys.get(&uuid);
        let update = self.keys.update(uuid, key_id, key, self.now + grace)?;
        if update == KeyUpdate::Unchanged {
            return Ok(update);
        }
        self.key_undo.push(KeyUndo::Keys(uuid, before));
        if update == KeyUpdate::Provisioned {
            self.stats.keys += 1;
            if let Some(slot) = self.reg.find(&uuid) {
                self.forget_route(slot);
            }
        }
        if let Some(keys) = self.keys.get(&uuid) {
            self.changes.push_back(Change::Keyed { uuid, keys });
        }
        Ok(update)
    }

    /// Removes the key of `uuid`, which speaks v1 again. Journaled as [`Change::Unkeyed`].
    pub fn remove_key(&mut self, now: Time, uuid: &Uuid) -> bool {
        self.advance(now);
        let Some(removed) = self.keys.take(uuid, self.now) else {
            return false;
        };
        self.key_undo.push(KeyUndo::Removed(removed));
        self.stats.keys -= 1;
        self.changes.push_back(Change::Unkeyed { uuid: *uuid });
        true
    }

    /// The keys of a signed-only uuid (for snapshots; never log them).
    pub fn key_state(&self, uuid: &Uuid) -> Option<KeyState> {
        self.keys.get(uuid)
    }

    /// Every signed-only uuid with its keys, sorted by uuid, for a snapshot.
    pub fn key_states(&self) -> Vec<(Uuid, KeyState)> {
        self.keys.iter_sorted()
    }

    /// Loads a uuid's keys from a snapshot. Pairs accepted before the restart are unknown, so
    /// its replay window refuses everything stamped up to `now` (PROTOCOL.md 9.3).
    pub fn restore_key(&mut self, now: Time, uuid: Uuid, keys: KeyState) {
        self.advance(now);
        self.keys.restarted(self.now);
        if !self.keys.contains(&uuid) {
            self.stats.keys += 1;
        }
        self.keys.set(uuid, keys);
    }

    /// The removal floors of uuids whose key was removed less than a window ago, sorted by
    /// uuid, for a snapshot (PROTOCOL.md 9.3: a key provisioned again refuses what the removed
    /// one may have accepted).
    pub fn removal_floors(&self) -> Vec<(Uuid, u32)> {
        self.keys.removal_floors()
    }

    /// Loads a removal floor from a snapshot.
    pub fn restore_removal_floor(&mut self, now: Time, uuid: Uuid, until: u32) {
        self.advance(now);
        self.keys.restarted(self.now);
        self.keys.restore_removal_floor(uuid, until);
    }

    /// Ends the turn for key updates: kept once written; taken back, newest first, when the
    /// turn's write failed (the admin API then answers 503 and nothing of them remains).
    pub(super) fn end_key_turn(&mut self, written: bool) {
        let undo = std::mem::take(&mut self.key_undo);
        if written {
            return;
        }
        for u in undo.into_iter().rev() {
            let (uuid, before) = match u {
                KeyUndo::Keys(uuid, before) => (uuid, before),
                KeyUndo::Removed(r) => {
                    if self.keys.put_back(r) {
                        self.stats.keys += 1;
                    }
                    continue;
                }
            };
            let had = self.keys.contains(&uuid);
            match before {
                Some(k) => {
                    self.keys.set(uuid, k);
                    if !had {
                        self.stats.keys += 1;
                    }
                }
                None => {
                    if self.keys.remove(&uuid, self.now) {
                        self.stats.keys -= 1;
                    }
                }
            }
        }
    }

    /// Replays a key change from the journal.
    pub(super) fn apply_key(&mut self, change: &Change) {
        // With no time yet (empty snapshot), `advance` does this at the first input.
        if self.now > Time::ZERO {
            self.keys.restarted(self.now);
        }
        match change {
            Change::Keyed { uuid, keys } => {
                if !self.keys.contains(uuid) {
                    self.stats.keys += 1;
                    // As `set_key` did live: an address in the snapshot may come from a v1
                    // heartbeat (anyone's) before the key; the journal does not record that
                    // provisioning forgot it, so forget it again here.
                    if let Some(slot) = self.reg.find(uuid) {
                        self.forget_route(slot);
                    }
                }
                self.keys.set(*uuid, keys.clone());
            }
            Change::Unkeyed { uuid } if self.keys.remove(uuid, self.now) => self.stats.keys -= 1,
            _ => {}
        }
    }

    /// Loads what the signed datagrams of a receive batch will read, without waiting for any
    /// of it: every keyring entry first, then the record each entry's slot hint names (by then
    /// the entries have arrived). Reads only; see [`Node::handle_udp_batch`].
    pub(super) fn load_ahead(&self, batch: &[(std::net::SocketAddr, &[u8])]) {
        for chunk in batch.chunks(LOAD_AHEAD) {
            let mut ahead: [Option<Ahead<'_>>; LOAD_AHEAD] = std::array::from_fn(|_| None);
            for (a, (_, data)) in ahead.iter_mut().zip(chunk) {
                if data.first() == Some(&crate::signed::VERSION) {
                    *a = self.keys.prefetch(data);
                }
            }
            for slot in ahead.iter().flatten().filter_map(Ahead::slot_hint) {
                // Possibly another uuid's record (the hint is checked when it is used): only
                // loaded here.
                std::hint::black_box(self.reg.get(slot).map(|r| r.uuid.0[0]));
            }
        }
    }

    /// A version-2 packet on the device port (UDP datagram or delimited TCP frame).
    pub(super) fn on_signed(&mut self, data: &[u8], via: Via) {
        match self.keys.verify_keyed(self.now, data) {
            Ok((v, mac)) => {
                self.stats.signed_accepted += 1;
                if let Some(was) = v.ahead_was {
                    self.ahead_raised(v.packet.uuid, was);
                }
                self.answering = Some(Answering {
                    uuid: v.packet.uuid,
                    key_id: v.key_id,
                    mac,
                    slot_hint: v.slot_hint,
                });
                self.dispatch(v.packet, via);
                self.answering = None;
            }
            Err(e) => self.stats.signed_dropped.incr(e),
        }
    }

    /// The record slot of `uuid`. For the uuid of the verified packet being handled, the
    /// keyring's hint when it still names this uuid's live record (slots are reused, so it is
    /// checked), saving the registry's lookup; otherwise the registry's answer, which becomes
    /// the hint.
    pub(super) fn find_answering(&mut self, uuid: &Uuid) -> Option<u32> {
        let Some(a) = self.answering.as_mut().filter(|a| a.uuid == *uuid) else {
            return self.reg.find(uuid);
        };
        let hinted = a
            .slot_hint
            .filter(|&s| self.reg.get(s).is_some_and(|r| r.uuid == *uuid));
        if hinted.is_some() {
            return hinted;
        }
        let found = self.reg.find(uuid);
        if let Some(s) = found {
            a.slot_hint = Some(s);
            self.keys.set_slot_hint(uuid, s);
        }
        found
    }

    /// A verified packet was stamped further ahead of the node's clock than its uuid's ahead
    /// bound said (it was `was`): journal the raised bound in this turn, before anything the
    /// packet causes is sent (a restart then refuses its stamp, PROTOCOL.md 9.3), and take it
    /// back if the turn's write fails. Costs a write only when a device's clock is found
    /// further ahead than before: at most one per second of forward drift, never one per
    /// heartbeat.
    fn ahead_raised(&mut self, uuid: Uuid, was: u32) {
        let Some(keys) = self.keys.get(&uuid) else {
            return;
        };
        self.stats.ahead_raised += 1;
        self.key_undo.push(KeyUndo::Keys(
            uuid,
            Some(KeyState {
                ahead: was,
                ..keys.clone()
            }),
        ));
        self.changes.push_back(Change::Keyed { uuid, keys });
    }

    /// A v1 packet for a signed-only uuid: it records nothing, and a heartbeat gets at most a
    /// bare v1 `0x10` (never the mask or the payload), so an old app build learns there is
    /// news without anyone learning what it is. The per-uuid answer budget is not spent here:
    /// a guesser must not be able to use up the real device's budget. The amplification
    /// bound still applies (5 bytes out for 21 in never reaches it).
    pub(super) fn unsigned(&mut self, p: DevicePacket, via: Via) {
        if p.msg != DeviceMsg::Heartbeat {
            self.stats.unsigned_refused.incr(Unsigned::Ack);
            return;
        }
        self.stats.unsigned_refused.incr(Unsigned::Heartbeat);
        let Some(slot) = self.reg.find(&p.uuid) else {
            return;
        };
        if !self.reg.rec(slot).pending() {
            return;
        }
        let packet = DownPacket {
            app_id: p.app_id,
            msg: DownMsg::Notify,
        };
        let dest = match via {
            Via::Udp(a) => {
                if let Err(l) = self.guard.spend(self.now, a.ip(), packet.encoded_len()) {
                    self.limited(l);
                    return;
                }
                Dest::Udp(a)
            }
            Via::Tcp(c) => Dest::Tcp(c),
        };
        self.transmits.push_back(Transmit {
            dest,
            payload: Payload::Down(packet),
        });
    }

    /// What goes out for `packet` to `uuid`: sealed if the uuid is signed-only (under the key
    /// of the packet being answered, else the key the device last used), plain otherwise.
    pub(super) fn down_payload(&mut self, uuid: &Uuid, packet: DownPacket) -> Payload {
        let answering = self.answering.as_ref();
        if let Some((a, mac)) = answering
            .filter(|a| a.uuid == *uuid)
            .and_then(|a| Some((a, a.mac.as_ref()?)))
        {
            return Payload::Sealed(self.keys.seal_under(mac, a.key_id, self.now, packet));
        }
        let key_id = answering.map(|a| a.key_id);
        match self.keys.seal(uuid, key_id, self.now, packet) {
            Ok(s) => Payload::Sealed(s),
            Err(plain) => Payload::Down(plain),
        }
    }

    /// Extra bytes per packet sent to `uuid` (the signed trailer, if it is signed-only). The
    /// uuid of the verified packet being answered is signed-only without a lookup.
    pub(super) fn down_extra(&self, uuid: &Uuid) -> usize {
        if self.answering.as_ref().is_some_and(|a| a.uuid == *uuid) || self.keys.contains(uuid) {
            TRAILER_LEN
        } else {
            0
        }
    }

    /// Forgets where a record's device was: its UDP address and TCP attachment.
    fn forget_route(&mut self, slot: u32) {
        self.reg.tcp.remove(&slot);
        let r = self.reg.rec_mut(slot);
        r.set(flag::TCP, false);
        r.set(flag::ADDR_V4 | flag::ADDR_V6 | flag::SA_KNOWN, false);
    }
}
