//! The per-client record, laid out for a million idle clients per node.
//!
//! `Record` is 60 bytes (checked by a test): the uuid, the 0x11 mask, times as u32 seconds, an
//! IPv4 address inline, and a few bits. The rare parts live out of line in the registry's side
//! tables keyed by slot: the 0x20 payload, an IPv6 address, an attached TCP connection.
//!
//! # The ack rule for 0x10 and 0x20
//!
//! Each of the two items has a generation (`gen`, bumped by every push of it) and a
//! [`SendLedger`] of its unmatched sends; `crate::ack` holds the rule. They take the 20 bytes
//! the former time-based guard took (two u16 generations, two 8-byte ledgers).

use crate::ack::{Generation, SendLedger};
use crate::codec::Uuid;

/// Index of the 0x10 item in the per-kind arrays.
pub(crate) const K_NOTIFY: usize = 0;
/// Index of the 0x20 item in the per-kind arrays.
pub(crate) const K_PAYLOAD: usize = 1;

/// Bits of `Record::flags`.
pub(crate) mod flag {
    /// The slot holds a client (free slots are reused).
    pub const LIVE: u16 = 1 << 0;
    /// A 0x10 is pending.
    pub const NOTIFY: u16 = 1 << 1;
    /// A 0x20 payload is pending (stored in the registry's payload table).
    pub const PAYLOAD: u16 = 1 << 2;
    /// At least one heartbeat has been seen (else `last_hb` is the creation time).
    pub const HAS_HB: u16 = 1 << 3;
    /// Counted online; cleared by the wheel when the window passes.
    pub const ONLINE: u16 = 1 << 4;
    /// The recorded UDP address was confirmed by a heartbeat since creation or restart.
    pub const SA_KNOWN: u16 = 1 << 5;
    /// `ip`/`port` hold an IPv4 address.
    pub const ADDR_V4: u16 = 1 << 6;
    /// The address is IPv6, in the registry's side table.
    pub const ADDR_V6: u16 = 1 << 7;
    /// A TCP connection is attached (in the registry's side table).
    pub const TCP: u16 = 1 << 8;
}

/// One client. See the module docs for the layout and the ack rule.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Record {
    pub uuid: Uuid,
    /// The 0x11 mask as two u32 halves, so the record aligns to 4, not 8.
    mask: [u32; 2],
    /// Seconds: last heartbeat or ack; the creation time until the first one.
    pub last_hb: u32,
    /// Seconds: newest accepted push (0: none).
    pub last_push: u32,
    /// Unmatched sends of [0x10, 0x20] (see `crate::ack`).
    pub ledger: [SendLedger; 2],
    /// Generations of [0x10, 0x20]: bumped by every push of that item.
    pub gen: [Generation; 2],
    pub ip: [u8; 4],
    pub port: u16,
    pub flags: u16,
}

impl Record {
    pub(crate) fn new(uuid: Uuid, now_s: u32) -> Self {
        Record {
            uuid,
            mask: [0, 0],
            last_hb: now_s,
            last_push: 0,
            ledger: [SendLedger::new(); 2],
            gen: [0, 0],
            ip: [0; 4],
            port: 0,
            flags: flag::LIVE,
        }
    }

    pub(crate) fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    pub(crate) fn set(&mut self, f: u16, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }

    pub(crate) fn mask(&self) -> u64 {
        (u64::from(self.mask[0]) << 32) | u64::from(self.mask[1])
    }

    pub(crate) fn set_mask(&mut self, m: u64) {
        self.mask = [(m >> 32) as u32, m as u32];
    }

    /// Anything waiting for an ack.
    pub(crate) fn pending(&self) -> bool {
        self.has(flag::NOTIFY | flag::PAYLOAD) || self.mask() != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_is_sixty_bytes() {
        assert_eq!(std::mem::size_of::<Record>(), 60);
    }
}
