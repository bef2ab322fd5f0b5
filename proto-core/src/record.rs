//! The per-client record, laid out for a million idle clients per node.
//!
//! `Record` is 60 bytes (checked by a test): the uuid, the 0x11 mask, times as u32 seconds, an
//! IPv4 address inline, and a few bits. The rare parts live out of line in the registry's side
//! tables keyed by slot: the 0x20 payload, an IPv6 address, an attached TCP connection.
//!
//! # The ack rule for 0x10 and 0x20 (PROTOCOL.md 8.2)
//!
//! A 0x10 or 0x20 ack carries no id, so an ack of an older send cannot be told from an ack of
//! the newer message that replaced it. Upstream cleared on any ack and so could lose a payload
//! pushed between a send and the ack of that send. We never let that happen:
//!
//! * `outstanding[k]` counts sends of kind `k` not yet matched by an ack (saturating at
//!   `OUTSTANDING_MAX`, where it stops moving: "unknown, assume some are in flight").
//! * When a push of kind `k` arrives while a send of an older version may still be answered,
//!   that is, `outstanding[k] > 0` and the last send is less than `ack_horizon` old, the record
//!   sets `guard[k] = last send + ack_horizon`.
//! * An ack of kind `k` clears the item only at or after `guard[k]`. An earlier ack leaves the
//!   item pending: it is re-sent on the next heartbeat and cleared by the ack of that re-send.
//!
//! An old ack therefore never clears a newer message (no loss) as long as acks arrive within
//! `ack_horizon` of their send; the price is at most one duplicate delivery per ambiguity.

use crate::codec::Uuid;

/// Sends counted in `Record::outstanding` before the counter sticks.
pub(crate) const OUTSTANDING_MAX: u8 = u8::MAX;

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
    /// Seconds: last send of [0x10, 0x20].
    pub sent: [u32; 2],
    /// Seconds: acks of [0x10, 0x20] before this do not clear (see module docs).
    pub guard: [u32; 2],
    pub ip: [u8; 4],
    pub port: u16,
    pub flags: u16,
    pub outstanding: [u8; 2],
}

impl Record {
    pub(crate) fn new(uuid: Uuid, now_s: u32) -> Self {
        Record {
            uuid,
            mask: [0, 0],
            last_hb: now_s,
            last_push: 0,
            sent: [0, 0],
            guard: [0, 0],
            ip: [0; 4],
            port: 0,
            flags: flag::LIVE,
            outstanding: [0, 0],
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

    /// Notes a send of kind `k` at `now_s`.
    pub(crate) fn note_send(&mut self, k: usize, now_s: u32) {
        self.sent[k] = now_s;
        if self.outstanding[k] < OUTSTANDING_MAX {
            self.outstanding[k] += 1;
        }
    }

    /// Notes a push of kind `k`: guards the new message if an older send may still be acked.
    pub(crate) fn note_push(&mut self, k: usize, now_s: u32, horizon_s: u32) {
        let until = self.sent[k].saturating_add(horizon_s);
        if self.outstanding[k] > 0 && now_s < until {
            self.guard[k] = self.guard[k].max(until);
        } else if now_s >= until {
            // Every earlier send is older than the horizon: its ack is either in or lost.
            self.outstanding[k] = 0;
        }
    }

    /// Handles an ack of kind `k`; true if it may clear the pending item.
    pub(crate) fn note_ack(&mut self, k: usize, now_s: u32) -> bool {
        if self.outstanding[k] > 0 && self.outstanding[k] < OUTSTANDING_MAX {
            self.outstanding[k] -= 1;
        }
        now_s >= self.guard[k]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_is_sixty_bytes() {
        assert_eq!(std::mem::size_of::<Record>(), 60);
    }

    #[test]
    fn old_ack_does_not_clear_a_newer_push() {
        let mut r = Record::new(Uuid([0; 16]), 100);
        r.note_send(K_PAYLOAD, 100); // v1 sent
        r.note_push(K_PAYLOAD, 101, 10); // v2 pushed while v1's ack may be in flight
        assert!(
            !r.note_ack(K_PAYLOAD, 102),
            "ambiguous ack must not clear v2"
        );
        r.note_send(K_PAYLOAD, 150); // re-sent on the next heartbeat
        assert!(r.note_ack(K_PAYLOAD, 150));
    }

    #[test]
    fn push_after_all_sends_acked_is_not_guarded() {
        let mut r = Record::new(Uuid([0; 16]), 100);
        r.note_send(K_NOTIFY, 100);
        assert!(r.note_ack(K_NOTIFY, 100));
        r.note_push(K_NOTIFY, 101, 10);
        assert!(r.note_ack(K_NOTIFY, 101));
    }
}
