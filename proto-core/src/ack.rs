//! Which send an ack answers: the ack rule for 0x10 and 0x20 (PROTOCOL.md 8.2), in one place.
//!
//! A 0x10 or 0x20 ack carries no id. Each item (the 0x10 flag, the 0x20 payload) therefore has a
//! [`Generation`], bumped by every push of it, and each record keeps a [`SendLedger`] per item:
//! the sends made and not yet matched to an ack, grouped by generation. An ack is attributed to
//! the **oldest** unmatched send ([`SendLedger::on_ack`]); the item is cleared only if that send
//! carried the item's current generation ([`Attribution::clears`]). The server and a cluster
//! node use the same calls; only where the current generation lives differs (the record, or a
//! shared store that clears with a compare-and-delete on the generation). The ledger is generic
//! over the generation's type: the single node's records count pushes in a wrapping `u16`
//! ([`Generation`]), the cluster store's generations are clock-based `u64`s
//! ([`crate::cluster::Gen`]), and a cluster node keeps those in its ledgers as they are, so the
//! generation an ack is attributed to is exactly the one the store compares.
//!
//! # Why oldest-first is exact
//!
//! The device SDK acks every message at once, before anything else it sends, on the socket or
//! connection the message came in on. Sends are queued in the order made (generations never
//! go down in that order), every ack consumes the front of the queue, and the queue forgets a
//! prefix only on evidence that no ack of it can still come. Then an ack attributed to the
//! current generation `g` proves that the device has seen `g`: if all `m` acks so far answered
//! sends older than the front, those `m` distinct sends would all lie in the part of the queue
//! already consumed or forgotten, which holds only `m - 1` consumed sends plus sends whose acks
//! had all arrived before they were forgotten; a counting argument (docs/PROTOCOL-NOTES.md)
//! shows that cannot happen. Acks reordered among themselves do not break it: a later ack
//! attributed to `g` follows an earlier ack that really answered a send of `g`.
//!
//! # When the ledger forgets (the only places precision is traded)
//!
//! * **Fence** ([`SendLedger::on_fence`]): a heartbeat from the path the sends went to. The
//!   device sends it after acking everything it had received, so the acks of every send the
//!   device had before it are already in. Only sends younger than the in-flight window (the
//!   heartbeat may have crossed them on the network) are kept. This is what lets one ack of a
//!   re-send clear an item whose earlier sends went unacked (upstream's sequences).
//! * **Path change** ([`SendLedger::forget`]): a heartbeat from a new UDP address, or a new TCP
//!   connection (or the close of the attached one), when the record has no other path. Acks
//!   are only accepted from the recorded address or the attached connection (the node checks
//!   the source), so no ack of the old path's sends can count any more. This assumes a socket
//!   the device has left does not hand its address to a later socket while its acks are still
//!   in flight (connection ids are never reused; a new socket gets a new port).
//! * **Superseded** ([`SendLedger::supersede`]): the item may have moved on without this ledger's
//!   owner seeing it (a cluster node dropped its copy of the record). The unmatched sends stay
//!   counted, so their acks are still consumed in order, but none of them can clear any more;
//!   the next fence forgets them as usual.
//! * Nothing is persisted: after a restart the ledger is empty, an ack matches nothing and
//!   clears nothing until the first send after the restart; the first heartbeat's answer is
//!   then the fence, so a restart does not make acks untrusted for any length of time.
//!
//! Counts saturate at 255 and then stick (every further ack is attributed to that group), which
//! errs toward a duplicate delivery, never toward a loss.
//!
//! # Memory
//!
//! A single node's ledger is 8 bytes (generation 2, counts 1 + 1, two send times 2 + 2); a
//! record holds two ledgers and two item generations: 20 bytes, the same as the time-based guard
//! it replaced. A cluster node's ledger (`u64` generation) is 16 bytes, held only for the
//! clients online at that node.

use std::time::Duration;

use crate::time::Time;

/// Generation of an item of one record: bumped (wrapping) by every push of that item.
///
/// Only equality is ever asked of it; a wrap would need 65,536 pushes of one item between a
/// send and its ack with no send in between.
pub type Generation = u16;

/// Send times are kept in ticks of this many milliseconds, wrapping after 65,536 ticks (about
/// 8.7 minutes). A wrap can only make an old send look young, which keeps it (a possible
/// duplicate), never forgets a young one.
pub const TICK_MS: u64 = 8;

/// Largest in-flight window the ledger can represent with margin (see [`TICK_MS`]).
pub const MAX_WINDOW: Duration = Duration::from_secs(60);

/// Count value that no longer moves.
const STUCK: u8 = u8::MAX;

/// What an ack answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribution<G = Generation> {
    /// A send of this generation: clear the item if this is still its generation.
    Generation(G),
    /// A send of a generation older than the newest one sent: never clears.
    Older,
    /// No unmatched send (a stray, duplicated or pre-restart ack): never clears.
    Unmatched,
}

impl<G: PartialEq> Attribution<G> {
    /// Whether the ack clears an item whose generation is `current`.
    pub fn clears(self, current: G) -> bool {
        matches!(self, Attribution::Generation(g) if g == current)
    }
}

/// The in-flight window in ledger ticks: a send is forgotten by a fence only when it is
/// certainly older than the window (see [`SendLedger::on_fence`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window(u16);

impl Window {
    /// Converts a duration (at most [`MAX_WINDOW`]; longer is clamped).
    pub fn new(d: Duration) -> Window {
        let d = d.min(MAX_WINDOW);
        let ms = d.as_millis() as u64;
        // Ticks are truncated, so a send whose tick age exceeds ceil(w / tick) is older than w.
        Window(ms.div_ceil(TICK_MS) as u16)
    }
}

fn tick(t: Time) -> u16 {
    (t.as_millis() / TICK_MS) as u16
}

/// The unmatched sends of one item of one record, oldest group first.
///
/// Two groups are enough: the sends of the newest generation sent, and all older ones (an ack
/// attributed to those never clears, so their generations need not be told apart).
///
/// `G` is the item generation's type (see the module docs); only equality is asked of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendLedger<G = Generation> {
    /// Generation of the newest group (meaningless while `newest` is 0).
    gen: G,
    /// Unmatched sends of `gen`.
    newest: u8,
    /// Unmatched sends of older generations.
    older: u8,
    /// Tick of the latest send of each group.
    newest_at: u16,
    older_at: u16,
}

impl SendLedger {
    /// An empty ledger (new record, or after a restart).
    pub const fn new() -> Self {
        SendLedger {
            gen: 0,
            newest: 0,
            older: 0,
            newest_at: 0,
            older_at: 0,
        }
    }
}

impl<G: Copy + PartialEq> SendLedger<G> {
    /// A send of generation `gen` left at `now` (to the record's current path).
    pub fn on_send(&mut self, gen: G, now: Time) {
        if self.newest > 0 && gen != self.gen {
            self.older = add(self.older, self.newest);
            self.older_at = self.newest_at;
            self.newest = 0;
        }
        self.gen = gen;
        self.newest = add(self.newest, 1);
        self.newest_at = tick(now);
    }

    /// An ack arrived on the record's current path: match it to the oldest unmatched send.
    pub fn on_ack(&mut self) -> Attribution<G> {
        if self.older > 0 {
            self.older = sub(self.older);
            Attribution::Older
        } else if self.newest > 0 {
            self.newest = sub(self.newest);
            Attribution::Generation(self.gen)
        } else {
            Attribution::Unmatched
        }
    }

    /// A heartbeat arrived at `now` on the path the sends went to: every send the device had
    /// received before sending it has had its ack delivered (or lost), so forget each group
    /// whose latest send is older than `window`. Younger sends may have crossed the heartbeat
    /// and stay. Call before the heartbeat's own answers are noted.
    pub fn on_fence(&mut self, now: Time, window: Window) {
        let now = tick(now);
        let old = |at: u16| now.wrapping_sub(at) > window.0;
        if self.older > 0 && old(self.older_at) {
            self.older = 0;
        }
        if self.newest > 0 && self.older == 0 && old(self.newest_at) {
            self.newest = 0;
        }
    }

    /// Every send went to a path that can no longer deliver acks (the node ignores acks from
    /// it): forget them all.
    pub fn forget(&mut self) {
        self.newest = 0;
        self.older = 0;
    }

    /// The item may have a newer generation than any send made (the owner of this ledger lost
    /// track of it): every unmatched send now counts as older, so its ack is still consumed in
    /// order but never clears. Later sends start a new newest group as usual.
    pub fn supersede(&mut self) {
        if self.newest > 0 {
            self.older = add(self.older, self.newest);
            self.older_at = self.newest_at;
            self.newest = 0;
        }
    }

    /// No unmatched send.
    pub fn is_empty(&self) -> bool {
        self.newest == 0 && self.older == 0
    }
}

fn add(a: u8, b: u8) -> u8 {
    if a == STUCK {
        STUCK
    } else {
        a.saturating_add(b)
    }
}

fn sub(a: u8) -> u8 {
    if a == STUCK {
        STUCK
    } else {
        a - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: u64) -> Time {
        Time::from_millis(1_000_000 + t)
    }

    const W: Window = Window(25); // 200 ms

    #[test]
    fn ledger_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<SendLedger>(), 8);
    }

    #[test]
    fn window_rounds_up_to_ticks() {
        assert_eq!(Window::new(Duration::from_millis(200)), Window(25));
        assert_eq!(Window::new(Duration::from_millis(201)), Window(26));
        assert_eq!(Window::new(Duration::from_secs(3600)), Window(7500));
    }

    #[test]
    fn ack_of_an_older_send_does_not_clear_a_newer_generation() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0)); // heartbeat answer "A"
        l.on_send(2, ms(150)); // "B" pushed, immediate send lost
        assert_eq!(l.on_ack(), Attribution::Older); // the ack of "A"
        assert_eq!(l.on_ack(), Attribution::Generation(2)); // the lost send had no ack
        let mut l2 = SendLedger::new();
        l2.on_send(1, ms(0));
        l2.on_send(2, ms(150));
        assert!(!l2.on_ack().clears(2));
        l2.on_fence(ms(50_000), W);
        l2.on_send(2, ms(50_000));
        assert!(l2.on_ack().clears(2), "the ack of the re-send clears");
    }

    #[test]
    fn a_fence_forgets_unacked_sends_older_than_the_window() {
        // Upstream's sequence: "three" unacked, "four" pushed and re-sent, one ack clears.
        let mut l = SendLedger::new();
        l.on_send(3, ms(0));
        l.on_send(4, ms(150));
        l.on_fence(ms(300), W);
        l.on_send(4, ms(300));
        assert!(l.on_ack().clears(4));
    }

    #[test]
    fn a_fence_keeps_sends_that_may_have_crossed_it() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0));
        l.on_send(2, ms(10));
        l.on_fence(ms(150), W); // both younger than 200 ms: kept
        l.on_send(2, ms(150));
        assert_eq!(l.on_ack(), Attribution::Older);
        assert!(l.on_ack().clears(2));
        assert!(l.on_ack().clears(2));
        assert_eq!(l.on_ack(), Attribution::Unmatched);
    }

    #[test]
    fn a_fence_settles_each_group_on_its_own() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0));
        l.on_send(2, ms(190));
        l.on_fence(ms(300), W); // 1 is 300 ms old: settled; 2 is 110 ms old: kept
        l.on_send(2, ms(300));
        assert!(l.on_ack().clears(2));
        assert!(l.on_ack().clears(2));
        assert_eq!(l.on_ack(), Attribution::Unmatched);
    }

    #[test]
    fn forget_and_unmatched() {
        let mut l = SendLedger::new();
        assert_eq!(l.on_ack(), Attribution::Unmatched);
        l.on_send(1, ms(0));
        l.on_send(2, ms(1));
        l.forget();
        assert!(l.is_empty());
        assert_eq!(l.on_ack(), Attribution::Unmatched);
    }

    #[test]
    fn stuck_counts_never_release_a_newer_generation() {
        let mut l = SendLedger::new();
        for i in 0..300 {
            l.on_send(1, ms(i));
        }
        l.on_send(2, ms(400));
        for _ in 0..1000 {
            assert_eq!(l.on_ack(), Attribution::Older);
        }
        l.on_fence(ms(1_000), W);
        l.on_send(2, ms(1_000));
        assert!(l.on_ack().clears(2));
    }

    #[test]
    fn superseded_sends_are_consumed_but_never_clear() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0));
        l.on_send(1, ms(10));
        l.supersede();
        l.on_send(1, ms(20)); // the same generation sent again after, e.g., a re-bind
        assert_eq!(l.on_ack(), Attribution::Older);
        assert_eq!(l.on_ack(), Attribution::Older);
        assert!(
            l.on_ack().clears(1),
            "only the ack of the send after it clears"
        );
        assert_eq!(l.on_ack(), Attribution::Unmatched);
        // A fence settles superseded sends like any older group.
        l.on_send(2, ms(30));
        l.supersede();
        l.on_fence(ms(300), W);
        assert!(l.is_empty());
    }

    #[test]
    fn wide_generations_are_attributed_exactly() {
        // A cluster store's generations: clock-based u64s, not a wrapping counter.
        let mut l: SendLedger<u64> = SendLedger::default();
        let (a, b) = (1_700_000_000_000u64, 1_700_000_000_150u64);
        l.on_send(a, ms(0));
        l.on_send(b, ms(150));
        assert!(!l.on_ack().clears(b), "the ack of the older send");
        let at = l.on_ack();
        assert_eq!(at, Attribution::Generation(b));
        assert!(!at.clears(a) && at.clears(b));
        assert_eq!(std::mem::size_of::<SendLedger<u64>>(), 16);
    }

    #[test]
    fn tick_wrap_only_keeps() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0));
        // Exactly one wrap later the send looks 0 ms old: kept (a duplicate at worst).
        l.on_fence(ms(65_536 * TICK_MS), W);
        assert!(!l.is_empty());
    }
}
