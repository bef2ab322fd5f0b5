//! Every signed-only uuid: its keys, its replay window, and the server's downstream nonces.
//!
//! The keyring is keyed by uuid, not by record slot: a key outlives its record (an expired or
//! removed record does not make its uuid v1 again, which would reopen the hole the key
//! closes). Only an explicit key removal does.

use std::hash::BuildHasher;
use std::time::Duration;

use foldhash::fast::FixedState;
use hashbrown::{HashMap, HashTable};

use crate::codec::{DevicePacket, DownPacket, UpHeader, Uuid};
use crate::time::{secs32, Time};

use super::codec::{KeyedMac, MacKey, Seal, SealedDown, SignedFrame};
use super::keys::{DeviceKey, KeyError, KeyState, KeyUpdate, PreviousKey};
use super::replay::ReplayWindow;
use super::SignedDrop;

/// One signed-only uuid, laid out for the hot path. A signed heartbeat reads the uuid, the
/// key id, the ahead bound, the slot hint, the replay window and both HMAC states: with the
/// entry 64-byte aligned and those first, that is three whole cache lines and nothing else
/// (the key bytes, read only to persist or compare them, share the last line). The key of a
/// rotation's grace period lives out of line in [`Keyring::previous`]: rare, and 8 bytes of
/// pointer here would cost every uuid a fourth line.
#[repr(C, align(64))]
struct Entry {
    uuid: Uuid,
    /// The ahead bound ([`KeyState::ahead`]) in 16 bits: it is at most the replay window
    /// (at most an hour, `Config::validate`), so a persisted bound above `u16::MAX` can only
    /// be damage; it saturates (still refusing over 18 hours after a restart).
    ahead: u16,
    /// Id of the current key.
    id: u8,
    /// The key id of the last verified packet: immediate pushes are sealed under it, because
    /// that is the key the device is known to hold.
    last_key_id: u8,
    /// Whether [`Keyring::previous`] holds a key of this uuid (so the common case looks it up
    /// never).
    rotating: bool,
    /// The node's record slot of this uuid as it last found it, 24 bits little-endian
    /// ([`NO_SLOT`] for none): only a hint, checked against the record's uuid before use, so
    /// a signed heartbeat skips the registry's index (its misses) in the common case.
    slot: [u8; 3],
    replay: ReplayWindow,
    /// The current key, HMAC-keyed once: every packet of a uuid that is not mid-rotation
    /// verifies and is sealed under it (a previous key is keyed per packet, during its grace
    /// period only).
    mac: KeyedMac,
    /// The current key's bytes.
    key: DeviceKey,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 192, "three cache lines");

/// The slot hint of an entry that has none (slots from 2^24 - 1 up are never hinted).
const NO_SLOT: [u8; 3] = [0xFF; 3];

fn ahead16(ahead: u32) -> u16 {
    u16::try_from(ahead).unwrap_or(u16::MAX)
}

/// See the module docs.
pub struct Keyring {
    map: HashTable<Entry>,
    hasher: FixedState,
    /// The previous key of each uuid in a rotation's grace period.
    previous: HashMap<Uuid, PreviousKey, FixedState>,
    window_s: u32,
    /// Downstream nonces: a counter from a seed the adapter draws at start, so that pairs
    /// `(ts, nonce)` do not repeat across restarts within a second.
    next_nonce: u32,
    /// Replay windows made after a restart refuse stamps up to this second.
    restart_floor: u32,
    /// Uuids whose key was removed less than a window ago, with the second up to which a new
    /// key for them refuses stamps: provisioned again with the same key bytes, packets
    /// captured before the removal would verify again. Empty but for recent removals.
    gone: HashMap<Uuid, u32, FixedState>,
}

/// A uuid's whole entry as [`Keyring::take`] removed it: keys, replay memory, the key id it
/// last used, and what the keyring remembered of an earlier removal.
pub struct Removed {
    entry: Box<Entry>,
    previous: Option<PreviousKey>,
    gone_was: Option<u32>,
}

/// An entry loaded ahead of its packet's check ([`Keyring::prefetch`]).
pub(crate) struct Ahead<'a>(&'a Entry);

impl Ahead<'_> {
    /// The entry's record slot hint (see [`Verified::slot_hint`]): possibly another uuid's
    /// record, so only to load, never to use.
    pub(crate) fn slot_hint(&self) -> Option<u32> {
        let [a, b, c] = self.0.slot;
        (self.0.slot != NO_SLOT).then(|| u32::from_le_bytes([a, b, c, 0]))
    }
}

/// A packet that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The packet, as v1 would carry it.
    pub packet: DevicePacket,
    /// The key it verified under.
    pub key_id: u8,
    /// The uuid's ahead bound before this packet raised it, if it did: the node must journal
    /// the new key state in this turn (and take the raise back if the write fails).
    pub ahead_was: Option<u32>,
    /// Where the node last found the uuid's record ([`Keyring::set_slot_hint`]); a hint to
    /// check, not an answer.
    pub slot_hint: Option<u32>,
}

impl Keyring {
    /// An empty keyring accepting timestamps within `window` of the node's clock.
    pub fn new(window: Duration, seed: u64) -> Self {
        Keyring {
            map: HashTable::new(),
            hasher: FixedState::with_seed(seed ^ 0x5157),
            previous: HashMap::with_hasher(FixedState::with_seed(seed ^ 0x7e5)),
            window_s: secs32(window),
            next_nonce: (seed >> 32) as u32 ^ seed as u32,
            restart_floor: 0,
            gone: HashMap::with_hasher(FixedState::with_seed(seed ^ 0x90e)),
        }
    }

    fn find(&self, uuid: &Uuid) -> Option<&Entry> {
        self.map
            .find(self.hasher.hash_one(uuid.0), |e| e.uuid == *uuid)
    }

    fn find_mut(&mut self, uuid: &Uuid) -> Option<&mut Entry> {
        self.map
            .find_mut(self.hasher.hash_one(uuid.0), |e| e.uuid == *uuid)
    }

    /// Number of signed-only uuids.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no uuid has a key.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `uuid` is signed-only.
    pub fn contains(&self, uuid: &Uuid) -> bool {
        !self.map.is_empty() && self.find(uuid).is_some()
    }

    fn state_of(&self, e: &Entry) -> KeyState {
        KeyState {
            id: e.id,
            key: e.key.clone(),
            previous: e
                .rotating
                .then(|| self.previous.get(&e.uuid).cloned().map(Box::new))
                .flatten(),
            ahead: u32::from(e.ahead),
        }
    }

    /// The key state of a uuid (what is persisted).
    pub fn get(&self, uuid: &Uuid) -> Option<KeyState> {
        self.find(uuid).map(|e| self.state_of(e))
    }

    /// Every uuid with its keys, sorted by uuid (for snapshots: deterministic output).
    pub fn iter_sorted(&self) -> Vec<(Uuid, KeyState)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .map(|e| (e.uuid, self.state_of(e)))
            .collect();
        v.sort_by_key(|(u, _)| *u);
        v
    }

    /// The removal floors (see [`Keyring::remove`]) of uuids that have no key now, sorted by
    /// uuid: for snapshots. A snapshot taken after a removal holds neither the key nor its
    /// journaled removal, so without these a restart would let the same key bytes, provisioned
    /// again within the window, accept again what they accepted before the removal.
    pub fn removal_floors(&self) -> Vec<(Uuid, u32)> {
        let mut v: Vec<_> = self.gone.iter().map(|(u, until)| (*u, *until)).collect();
        v.sort_by_key(|(u, _)| *u);
        v
    }

    /// Restores a removal floor from a snapshot (ignored if the uuid has a key).
    pub fn restore_removal_floor(&mut self, uuid: Uuid, until: u32) {
        if self.find(&uuid).is_some() {
            return;
        }
        let f = self.gone.entry(uuid).or_insert(0);
        *f = (*f).max(until);
    }

    /// Approximate heap bytes, for the memory figures.
    pub fn heap_bytes(&self) -> usize {
        self.map.capacity() * (std::mem::size_of::<Entry>() + 1)
            + self.previous.capacity() * (std::mem::size_of::<(Uuid, PreviousKey)>() + 1)
            + self.gone.capacity() * (std::mem::size_of::<(Uuid, u32)>() + 1)
    }

    /// The node (re)started at `now`: the windows of every key it holds, and of keys installed
    /// from now on, refuse stamps up to `now` (see [`Keyring::set`]). Call before any input
    /// after a restore; calling it again with the same time changes nothing.
    pub fn restarted(&mut self, now: Time) {
        let floor = now.secs32();
        if floor <= self.restart_floor {
            return;
        }
        self.restart_floor = floor;
        for e in self.map.iter_mut() {
            e.replay = ReplayWindow::refusing_until(floor.saturating_add(u32::from(e.ahead)));
        }
    }

    /// Provisions or rotates a key. On a rotation the old current key stays valid until
    /// `until`.
    pub fn update(
        &mut self,
        uuid: Uuid,
        id: u8,
        key: DeviceKey,
        until: Time,
    ) -> Result<KeyUpdate, KeyError> {
        let Some(mut keys) = self.get(&uuid) else {
            self.set(uuid, KeyState::new(id, key));
            return Ok(KeyUpdate::Provisioned);
        };
        // The rotation rules are `KeyState`'s; the entry takes the result, its replay memory
        // and ahead bound unchanged.
        let update = keys.rotate(id, key, until)?;
        if update == KeyUpdate::Rotated {
            if let Some(p) = keys.previous.take() {
                self.previous.insert(uuid, *p);
            }
            if let Some(e) = self.find_mut(&uuid) {
                e.mac = KeyedMac::new(&keys.key);
                e.key = keys.key;
                e.id = keys.id;
                e.rotating = true;
            }
        }
        Ok(update)
    }

    /// Installs a whole key state (restore, journal replay, a rotation, a failed turn taken
    /// back). A new entry's replay window refuses what the restart floor and the state's
    /// ahead bound say: pairs accepted before a restart are not known, and none was stamped
    /// later than the restart second plus the ahead bound (PROTOCOL.md 9.3).
    pub fn set(&mut self, uuid: Uuid, keys: KeyState) {
        let floor = self.restart_floor.saturating_add(keys.ahead);
        let KeyState {
            id,
            key,
            previous,
            ahead,
        } = keys;
        let rotating = previous.is_some();
        match previous {
            Some(p) => self.previous.insert(uuid, *p),
            None => self.previous.remove(&uuid),
        };
        if let Some(e) = self.find_mut(&uuid) {
            // A rotation, or a journaled raise of the ahead bound replayed after the
            // snapshot's state: the replay memory stays.
            e.replay.refuse_until(floor);
            if e.key != key {
                e.mac = KeyedMac::new(&key);
                e.key = key;
            }
            e.id = id;
            e.ahead = ahead16(ahead);
            e.rotating = rotating;
            return;
        }
        let replay = ReplayWindow::refusing_until(match self.gone.remove(&uuid) {
            Some(until) => floor.max(until),
            None => floor,
        });
        let entry = Entry {
            uuid,
            ahead: ahead16(ahead),
            id,
            last_key_id: id,
            rotating,
            slot: NO_SLOT,
            replay,
            mac: KeyedMac::new(&key),
            key,
        };
        let hasher = &self.hasher;
        self.map.insert_unique(hasher.hash_one(uuid.0), entry, |e| {
            hasher.hash_one(e.uuid.0)
        });
    }

    /// Makes the uuid v1 again, at `now`. Should it get a key again within the window, that
    /// key refuses every stamp up to `now` plus the ahead bound: with the same key bytes, a
    /// packet accepted before the removal would otherwise be accepted a second time.
    pub fn remove(&mut self, uuid: &Uuid, now: Time) -> bool {
        self.take(uuid, now).is_some()
    }

    /// [`Keyring::remove`], keeping what was removed so that [`Keyring::put_back`] can give it
    /// back exactly when the removal's write fails.
    pub fn take(&mut self, uuid: &Uuid, now: Time) -> Option<Removed> {
        let h = self.hasher.hash_one(uuid.0);
        let (entry, _) = self.map.find_entry(h, |e| e.uuid == *uuid).ok()?.remove();
        let previous = self.previous.remove(uuid);
        let now_s = now.secs32().max(self.restart_floor);
        let w = self.window_s;
        // Stamps at or below a floor more than a window old are expired anyway.
        self.gone
            .retain(|_, until| until.saturating_add(w) >= now_s);
        let gone_was = self
            .gone
            .insert(*uuid, now_s.saturating_add(u32::from(entry.ahead)));
        Some(Removed {
            entry: Box::new(entry),
            previous,
            gone_was,
        })
    }

    /// Undoes a [`Keyring::take`]: the keys come back with the replay memory they had, not a
    /// new window ([`Keyring::set`] would forget the pairs accepted before the removal, or
    /// refuse the device's next ones). False if the uuid had a key again (it is replaced).
    pub fn put_back(&mut self, r: Removed) -> bool {
        let uuid = r.entry.uuid;
        match r.gone_was {
            Some(until) => self.gone.insert(uuid, until),
            None => self.gone.remove(&uuid),
        };
        match r.previous {
            Some(p) => self.previous.insert(uuid, p),
            None => self.previous.remove(&uuid),
        };
        let h = self.hasher.hash_one(uuid.0);
        let hasher = &self.hasher;
        match self
            .map
            .entry(h, |e| e.uuid == uuid, |e| hasher.hash_one(e.uuid.0))
        {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                *o.get_mut() = *r.entry;
                false
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(*r.entry);
                true
            }
        }
    }

    /// Checks a signed device packet: shape, key id, tag, time, then replay. Only a packet
    /// that passes all five changes the replay window.
    ///
    /// The tag is checked before the time so that `Expired` counts only authentic packets: a
    /// rising count means a real device's clock is off, not that someone sends garbage.
    pub fn verify(&mut self, now: Time, buf: &[u8]) -> Result<Verified, SignedDrop> {
        self.verify_keyed(now, buf).map(|(v, _)| v)
    }

    /// [`Keyring::verify`], also giving the uuid's current key HMAC-keyed when the packet
    /// verified under it (`None` under a previous key): the node seals the packet's answers
    /// with it ([`Keyring::seal_under`]) instead of looking the uuid up again. Nothing
    /// changes a key while one packet is handled, so it is the key [`Keyring::seal`] would
    /// find.
    pub(crate) fn verify_keyed(
        &mut self,
        now: Time,
        buf: &[u8],
    ) -> Result<(Verified, Option<KeyedMac>), SignedDrop> {
        let f = SignedFrame::parse(buf)?;
        let uuid = f.packet.uuid;
        let h = self.hasher.hash_one(uuid.0);
        let e = self
            .map
            .find_mut(h, |e| e.uuid == uuid)
            .ok_or(SignedDrop::UnknownKey)?;
        // Everything below reads all three of the entry's cache lines. Reading a word of the
        // other two now (the values are not needed yet) lets their misses overlap the first
        // one's instead of each waiting for the one before (profiled: BENCHMARKS.md).
        std::hint::black_box(u64::from(e.mac.outer_word()) ^ e.replay.last_word());
        let authentic = if f.seal.key_id == e.id {
            f.verify(&e.mac)
        } else {
            let key = e
                .rotating
                .then(|| self.previous.get(&uuid))
                .flatten()
                .filter(|p| p.id == f.seal.key_id && now < p.until)
                .ok_or(SignedDrop::UnknownKey)?;
            f.verify(&key.key)
        };
        if !authentic {
            return Err(SignedDrop::Tag);
        }
        let now_s = now.secs32();
        if now_s.abs_diff(f.seal.ts) > self.window_s {
            return Err(SignedDrop::Expired);
        }
        e.replay
            .check(now_s, self.window_s, f.seal.ts, f.seal.nonce)
            .map_err(|_| SignedDrop::Replayed)?;
        e.last_key_id = f.seal.key_id;
        if e.rotating && self.previous.get(&uuid).is_none_or(|p| now >= p.until) {
            // The grace period is over: the previous key is forgotten.
            self.previous.remove(&uuid);
            e.rotating = false;
        }
        // At most the window (checked above), so it fits.
        let ahead = ahead16(f.seal.ts.saturating_sub(now_s));
        let ahead_was =
            (ahead > e.ahead).then(|| u32::from(std::mem::replace(&mut e.ahead, ahead)));
        let slot_hint = (e.slot != NO_SLOT).then(|| {
            let [a, b, c] = e.slot;
            u32::from_le_bytes([a, b, c, 0])
        });
        let current = (f.seal.key_id == e.id).then(|| e.mac.clone());
        let v = Verified {
            packet: f.packet,
            key_id: f.seal.key_id,
            ahead_was,
            slot_hint,
        };
        Ok((v, current))
    }

    /// Loads the entry that the signed packet in `buf` will be checked against, ahead of
    /// [`Keyring::verify`], which otherwise waits for it at the uuid compare: called for every
    /// packet of a receive batch first, the batch's misses overlap
    /// ([`crate::Node::handle_udp_batch`]). Reads only, whatever `buf` holds. The entry is
    /// given back, for its slot hint once it has arrived ([`Ahead::slot_hint`]).
    pub(crate) fn prefetch(&self, buf: &[u8]) -> Option<Ahead<'_>> {
        if self.map.is_empty() {
            return None;
        }
        let h = UpHeader::parse(buf)?;
        // The first entry whose hash tag matches: the uuid's own but for a rare collision,
        // which costs wasted loads and nothing else.
        let e = self.map.iter_hash(self.hasher.hash_one(h.uuid.0)).next()?;
        // One word of each of the entry's three lines. Plain loads, not a prefetch
        // instruction (none is stable and safe at the crate's minimum Rust, and the crate
        // forbids `unsafe`): no load depends on another entry's, so the CPU has the misses
        // of several packets in flight at once.
        std::hint::black_box(
            u64::from(e.uuid.0[0]) ^ e.replay.last_word() ^ u64::from(e.mac.outer_word()),
        );
        Some(Ahead(e))
    }

    /// Remembers where the node found `uuid`'s record, for [`Verified::slot_hint`]. The node
    /// calls it only when the hint was missing or wrong (once per record, not per packet).
    pub fn set_slot_hint(&mut self, uuid: &Uuid, slot: u32) {
        if let Some(e) = self.find_mut(uuid) {
            let [a, b, c, d] = slot.to_le_bytes();
            e.slot = if d == 0 { [a, b, c] } else { NO_SLOT };
        }
    }

    /// Seals a packet for a signed-only uuid under `key_id` (the key its heartbeat used) or,
    /// when `None`, the key its last verified packet used, falling back to the current key
    /// when that one's grace period is over. A uuid without a key gets its packet back, to
    /// send as it is.
    pub fn seal(
        &mut self,
        uuid: &Uuid,
        key_id: Option<u8>,
        now: Time,
        packet: DownPacket,
    ) -> Result<SealedDown, DownPacket> {
        let Some(e) = self.find(uuid) else {
            return Err(packet);
        };
        let wanted = key_id.unwrap_or(e.last_key_id);
        // The current key is always valid; a previous one only within its grace period.
        let previous = (wanted != e.id && e.rotating)
            .then(|| self.previous.get(uuid))
            .flatten()
            .filter(|p| p.id == wanted && now < p.until);
        Ok(match previous {
            Some(p) => {
                let key = p.key.clone();
                self.seal_under(&key, wanted, now, packet)
            }
            None => {
                let (mac, id) = (e.mac.clone(), e.id);
                self.seal_under(&mac, id, now, packet)
            }
        })
    }

    /// Seals a packet under `key` (id `key_id`) with the next downstream nonce: what
    /// [`Keyring::seal`] does once it found the key, and what the node does with the current
    /// key that [`Keyring::verify_keyed`] gave for the packet being answered, without the
    /// lookup.
    pub(crate) fn seal_under(
        &mut self,
        key: &impl MacKey,
        key_id: u8,
        now: Time,
        packet: DownPacket,
    ) -> SealedDown {
        let seal = Seal {
            key_id,
            ts: now.secs32(),
            nonce: self.next_nonce,
        };
        self.next_nonce = self.next_nonce.wrapping_add(1);
        SealedDown::new(packet, seal, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signed::DeviceKey;

    const UUID: Uuid = Uuid([4; 16]);

    fn key(b: u8) -> DeviceKey {
        DeviceKey::new([b; 32])
    }

    fn hb(id: u8, k: &DeviceKey, ts: u32, nonce: u32) -> Vec<u8> {
        crate::testing::signed_heartbeat(UUID, k, id, ts, nonce)
    }

    fn ring() -> Keyring {
        let mut r = Keyring::new(Duration::from_secs(60), 0);
        assert_eq!(
            r.update(UUID, 1, key(1), Time::ZERO),
            Ok(KeyUpdate::Provisioned)
        );
        r
    }

    #[test]
    fn the_slot_hint_is_kept_until_set_again_and_large_slots_are_not_hinted() {
        let mut r = ring();
        let now = Time::from_secs(1000);
        let hint =
            |r: &mut Keyring, n: u32| r.verify(now, &hb(1, &key(1), 1000, n)).map(|v| v.slot_hint);
        assert_eq!(hint(&mut r, 1), Ok(None));
        r.set_slot_hint(&UUID, 0x00AB_CDEF);
        assert_eq!(hint(&mut r, 2), Ok(Some(0x00AB_CDEF)));
        // A rotation keeps it; a slot that does not fit 24 bits clears it.
        r.update(UUID, 2, key(2), Time::from_secs(2000)).unwrap();
        assert_eq!(hint(&mut r, 3), Ok(Some(0x00AB_CDEF)));
        r.set_slot_hint(&UUID, 1 << 24);
        assert_eq!(hint(&mut r, 4), Ok(None));
        // Removed and provisioned again: a new entry, no hint.
        r.set_slot_hint(&UUID, 7);
        assert!(r.remove(&UUID, now));
        r.update(UUID, 1, key(1), Time::ZERO).unwrap();
        assert_eq!(hint(&mut r, 5).map(|_| ()), Err(SignedDrop::Replayed));
        let v = r.verify(Time::from_secs(1062), &hb(1, &key(1), 1062, 6));
        assert_eq!(v.map(|v| v.slot_hint), Ok(None));
    }

    #[test]
    fn an_ahead_bound_beyond_sixteen_bits_saturates() {
        let mut r = ring();
        let mut k = r.get(&UUID).unwrap();
        k.ahead = 70_000;
        r.set(UUID, k);
        assert_eq!(r.get(&UUID).map(|k| k.ahead), Some(u32::from(u16::MAX)));
    }

    #[test]
    fn each_reason_is_told_apart() {
        let mut r = ring();
        let now = Time::from_secs(1000);
        assert_eq!(
            r.verify(now, &hb(1, &key(1), 1000, 1)).map(|v| v.key_id),
            Ok(1)
        );
        assert_eq!(
            r.verify(now, &hb(1, &key(1), 1000, 1)),
            Err(SignedDrop::Replayed)
        );
        assert_eq!(
            r.verify(now, &hb(1, &key(2), 1000, 2)),
            Err(SignedDrop::Tag)
        );
        assert_eq!(
            r.verify(now, &hb(2, &key(1), 1000, 3)),
            Err(SignedDrop::UnknownKey)
        );
        assert_eq!(
            r.verify(now, &hb(1, &key(1), 939, 4)),
            Err(SignedDrop::Expired)
        );
        assert_eq!(
            r.verify(now, &hb(1, &key(1), 1061, 5)),
            Err(SignedDrop::Expired)
        );
        // Drift within the window is tolerated both ways.
        assert!(r.verify(now, &hb(1, &key(1), 940, 6)).is_ok());
        assert!(r.verify(now, &hb(1, &key(1), 1060, 7)).is_ok());
        let mut short = hb(1, &key(1), 1000, 8);
        short.pop();
        assert_eq!(r.verify(now, &short), Err(SignedDrop::Length));
        r.remove(&UUID, now);
        assert_eq!(
            r.verify(now, &hb(1, &key(1), 1000, 9)),
            Err(SignedDrop::UnknownKey)
        );
    }

    #[test]
    fn rotation_grace_then_only_the_new_key() {
        let mut r = ring();
        let t = Time::from_secs(1000);
        assert_eq!(
            r.update(UUID, 2, key(2), Time::from_secs(1100)),
            Ok(KeyUpdate::Rotated)
        );
        assert!(r.verify(t, &hb(1, &key(1), 1000, 1)).is_ok());
        assert!(r.verify(t, &hb(2, &key(2), 1000, 2)).is_ok());
        let later = Time::from_secs(1100);
        assert_eq!(
            r.verify(later, &hb(1, &key(1), 1100, 3)),
            Err(SignedDrop::UnknownKey)
        );
        assert!(r.verify(later, &hb(2, &key(2), 1100, 4)).is_ok());
    }

    #[test]
    fn downstream_is_sealed_under_the_key_the_device_last_used() {
        let mut r = ring();
        r.update(UUID, 2, key(2), Time::from_secs(2000)).unwrap();
        let t = Time::from_secs(1000);
        r.verify(t, &hb(1, &key(1), 1000, 1)).unwrap();
        let p = DownPacket {
            app_id: 0,
            msg: crate::codec::DownMsg::Notify,
        };
        let a = r.seal(&UUID, None, t, p.clone()).unwrap();
        assert_eq!(r.seal(&Uuid([5; 16]), None, t, p.clone()), Err(p.clone()));
        assert_eq!(a.seal.key_id, 1);
        let b = r.seal(&UUID, None, t, p.clone()).unwrap();
        assert_ne!(a.seal.nonce, b.seal.nonce, "nonces never repeat");
        // Once the old key's grace is over, the current one is used.
        let c = r.seal(&UUID, None, Time::from_secs(2000), p).unwrap();
        assert_eq!(c.seal.key_id, 2);
        assert!(SealedDown::open(&c.to_vec(), |id| r
            .get(&UUID)
            .and_then(|k| k.key_for(id, Time::from_secs(2000)).cloned()))
        .is_ok());
    }

    #[test]
    fn verify_keyed_hands_out_only_the_current_key_and_seals_as_seal_does() {
        let mut r = ring();
        r.update(UUID, 2, key(2), Time::from_secs(2000)).unwrap();
        let t = Time::from_secs(1000);
        let (v, mac) = r.verify_keyed(t, &hb(1, &key(1), 1000, 1)).unwrap();
        assert_eq!(v.key_id, 1);
        assert!(mac.is_none(), "a previous key is sealed through the lookup");
        let (v, mac) = r.verify_keyed(t, &hb(2, &key(2), 1000, 2)).unwrap();
        let mac = mac.expect("the current key");
        let p = DownPacket {
            app_id: 0,
            msg: crate::codec::DownMsg::Notify,
        };
        let a = r.seal_under(&mac, v.key_id, t, p.clone());
        let b = r.seal(&UUID, Some(v.key_id), t, p).unwrap();
        assert_eq!((a.seal.key_id, a.seal.ts), (b.seal.key_id, b.seal.ts));
        assert_ne!(a.seal.nonce, b.seal.nonce, "one nonce counter for both");
        let open = |s: &SealedDown, k: u8| {
            SealedDown::open(&s.to_vec(), |id| (id == 2).then(|| key(k))).map(|o| o.packet)
        };
        assert_eq!(open(&a, 2), open(&b, 2));
        assert!(open(&a, 2).is_ok());
        assert_eq!(open(&a, 1).map(|_| ()), Err(SignedDrop::Tag));
    }

    #[test]
    fn a_restart_refuses_stamps_up_to_the_restart_second_plus_the_ahead_bound() {
        let mut r = ring();
        // A device 20 s ahead; its bound is raised once, by the first packet that shows it.
        let v = r.verify(Time::from_secs(1000), &hb(1, &key(1), 1020, 1));
        assert_eq!(v.map(|v| v.ahead_was), Ok(Some(0)));
        let captured = hb(1, &key(1), 1024, 2);
        let v = r.verify(Time::from_secs(1004), &captured);
        assert_eq!(v.map(|v| v.ahead_was), Ok(None));
        let persisted = r.get(&UUID).unwrap();
        assert_eq!(persisted.ahead, 20);
        // Restored after a restart at 1005: the copy stamped 1024 is refused, the device's
        // next packet (1026, a second later) is not.
        let mut again = Keyring::new(Duration::from_secs(60), 1);
        again.restarted(Time::from_secs(1005));
        again.set(UUID, persisted.clone());
        let t = Time::from_secs(1006);
        assert_eq!(again.verify(t, &captured), Err(SignedDrop::Replayed));
        assert_eq!(
            again.verify(t, &hb(1, &key(1), 1025, 3)),
            Err(SignedDrop::Replayed)
        );
        assert!(again.verify(t, &hb(1, &key(1), 1026, 3)).is_ok());
        // The same when the raise comes from the journal after a snapshot's older state.
        let mut replayed = Keyring::new(Duration::from_secs(60), 2);
        replayed.restarted(Time::from_secs(1005));
        replayed.set(UUID, KeyState::new(1, key(1)));
        replayed.set(UUID, persisted);
        assert_eq!(replayed.verify(t, &captured), Err(SignedDrop::Replayed));
    }

    #[test]
    fn the_same_key_provisioned_again_refuses_what_it_accepted_before() {
        let mut r = ring();
        let t = Time::from_secs(1000);
        let before = hb(1, &key(1), 1010, 1);
        assert!(r.verify(t, &before).is_ok());
        assert!(r.remove(&UUID, Time::from_secs(1002)));
        assert_eq!(
            r.update(UUID, 1, key(1), Time::ZERO),
            Ok(KeyUpdate::Provisioned)
        );
        let t = Time::from_secs(1003);
        assert_eq!(r.verify(t, &before), Err(SignedDrop::Replayed));
        // Up to the removal second plus the ahead bound (10 s), then the device again.
        assert_eq!(
            r.verify(t, &hb(1, &key(1), 1012, 2)),
            Err(SignedDrop::Replayed)
        );
        assert!(r.verify(t, &hb(1, &key(1), 1013, 3)).is_ok());
        // Long after a removal nothing is remembered of it.
        assert!(r.remove(&UUID, Time::from_secs(1003)));
        assert!(!r.remove(&Uuid([6; 16]), Time::from_secs(2000)));
        r.update(Uuid([7; 16]), 1, key(1), Time::ZERO).unwrap();
        assert!(r.remove(&Uuid([7; 16]), Time::from_secs(2000)));
        assert_eq!(r.gone.len(), 1, "the old removal was pruned");
    }

    #[test]
    fn keys_restored_after_a_restart_refuse_older_stamps() {
        let mut r = Keyring::new(Duration::from_secs(60), 0);
        r.restarted(Time::from_secs(1000));
        r.set(UUID, KeyState::new(1, key(1)));
        let t = Time::from_secs(1001);
        assert_eq!(
            r.verify(t, &hb(1, &key(1), 1000, 1)),
            Err(SignedDrop::Replayed)
        );
        assert!(r.verify(t, &hb(1, &key(1), 1001, 1)).is_ok());
    }
}
