//! All client records: a slab of [`Record`]s with stable slot numbers, a hash index from uuid to
//! slot that stores only a u32 per client, and side tables for the rare large parts.

use std::hash::BuildHasher;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use foldhash::fast::FixedState;
use hashbrown::{HashMap, HashTable};

use crate::codec::{Content, Uuid};
use crate::record::{flag, Record};
use crate::ConnId;

pub(crate) struct Registry {
    slots: Vec<Record>,
    free: Vec<u32>,
    index: HashTable<u32>,
    hasher: FixedState,
    pub(crate) payloads: HashMap<u32, Content, FixedState>,
    v6: HashMap<u32, SocketAddrV6, FixedState>,
    pub(crate) tcp: HashMap<u32, ConnId, FixedState>,
}

impl Registry {
    pub(crate) fn new(seed: u64) -> Self {
        let hasher = FixedState::with_seed(seed);
        Registry {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            hasher,
            payloads: HashMap::with_hasher(FixedState::with_seed(seed ^ 1)),
            v6: HashMap::with_hasher(FixedState::with_seed(seed ^ 2)),
            tcp: HashMap::with_hasher(FixedState::with_seed(seed ^ 3)),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn find(&self, uuid: &Uuid) -> Option<u32> {
        let h = self.hasher.hash_one(uuid.0);
        let slots = &self.slots;
        self.index
            .find(h, |&i| slots[i as usize].uuid == *uuid)
            .copied()
    }

    /// Inserts a new record; the caller has checked the uuid is absent.
    pub(crate) fn insert(&mut self, rec: Record) -> u32 {
        let h = self.hasher.hash_one(rec.uuid.0);
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = rec;
                s
            }
            None => {
                self.slots.push(rec);
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .insert_unique(h, slot, |&i| hasher.hash_one(slots[i as usize].uuid.0));
        slot
    }

    pub(crate) fn remove(&mut self, slot: u32) {
        let Some(rec) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if !rec.has(flag::LIVE) {
            return;
        }
        rec.flags = 0;
        let uuid = rec.uuid;
        let h = self.hasher.hash_one(uuid.0);
        if let Ok(e) = self.index.find_entry(h, |&i| i == slot) {
            e.remove();
        }
        self.payloads.remove(&slot);
        self.v6.remove(&slot);
        self.tcp.remove(&slot);
        self.free.push(slot);
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&Record> {
        self.slots.get(slot as usize).filter(|r| r.has(flag::LIVE))
    }

    pub(crate) fn rec(&self, slot: u32) -> &Record {
        &self.slots[slot as usize]
    }

    pub(crate) fn rec_mut(&mut self, slot: u32) -> &mut Record {
        &mut self.slots[slot as usize]
    }

    pub(crate) fn addr(&self, slot: u32) -> Option<SocketAddr> {
        let r = self.rec(slot);
        if r.has(flag::ADDR_V4) {
            Some(SocketAddr::V4(SocketAddrV4::new(r.ip.into(), r.port)))
        } else if r.has(flag::ADDR_V6) {
            self.v6.get(&slot).copied().map(SocketAddr::V6)
        } else {
            None
        }
    }

    pub(crate) fn set_addr(&mut self, slot: u32, addr: SocketAddr) {
        match addr {
            SocketAddr::V4(a) => {
                let r = &mut self.slots[slot as usize];
                r.ip = a.ip().octets();
                r.port = a.port();
                r.set(flag::ADDR_V4, true);
                if r.has(flag::ADDR_V6) {
                    r.set(flag::ADDR_V6, false);
                    self.v6.remove(&slot);
                }
            }
            SocketAddr::V6(a) => {
                let r = &mut self.slots[slot as usize];
                r.set(flag::ADDR_V4, false);
                r.set(flag::ADDR_V6, true);
                self.v6.insert(slot, a);
            }
        }
    }

    /// Live slots in slot order (deterministic, for snapshots and sweeps).
    pub(crate) fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, r)| r.has(flag::LIVE))
            .map(|(i, _)| i as u32)
    }

    /// Approximate heap bytes held, for the memory figures.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Record>()
            + self.index.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.free.capacity() * 4
            + self.payloads.capacity() * 40
            + self.payloads.values().map(|p| p.len()).sum::<usize>()
            + self.v6.capacity() * 36
            + self.tcp.capacity() * 16
    }
}
