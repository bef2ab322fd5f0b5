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
//! # Duplicated datagrams: an ack that crossed an older send is not trusted to clear
//!
//! The counting argument needs one ack per delivery. A network that duplicates datagrams breaks
//! that: a copy of an older send's datagram, or of its ack, is one ack too many, and it would be
//! attributed to the next send in the queue. Where that next send is a newer generation whose
//! own datagram was lost, the newer item would be cleared without ever reaching the device (lossy
//! seed 3660 of the simulator: a payload's ack duplicated by a NAT cleared the next payload,
//! whose immediate send had been lost). So an ack attributed to the newest generation clears only
//! if that generation's sends **did not cross** a send of another generation still in flight:
//! when the newest group was started while sends of an older generation were unmatched, and
//! more than a burst gap ([`Window::burst`], a quarter of the in-flight window) after the latest
//! of them, the first UDP ack attributed to it is [`Attribution::Crossed`], until a fence
//! settles the older sends or the stray window (ten in-flight windows, [`Window::stray`]) has
//! passed since the latest of them. Such an ack is consumed as usual and clears nothing; a
//! second ack of the same generation clears (with one stray, two acks prove a delivery), and
//! otherwise the item goes out again on the next heartbeat and the ack of that re-send clears
//! it. The crossing stays marked until the fence even when the counts say every send was
//! matched: if the distrusted ack was a stray, the real ack it stood in for is still on its
//! way, and would be attributed to a newer generation pushed next (fuzz finding 11), whose
//! first ack is therefore distrusted too. A fence that settles the older sends keeps such a
//! spent crossing while the newest sends are younger than the in-flight window, since that
//! real ack may still cross the heartbeat. The price is one duplicate where an older send's ack
//! crossed a newer push, which is a duplicate the network's crossing caused, never a loss.
//! Sends closer together than the burst gap (pushes in one turn, or an app server pushing
//! twice in a row on a fast network) are one burst: their acks are trusted, so a quick pair of
//! pushes to an online device costs no duplicate. Acks on a TCP connection ([`SendLedger::on_stream_ack`]) are exact: a stream duplicates
//! nothing.
//!
//! The losses left need three faults together: a duplicate of an older send's datagram or ack,
//! the newer push's immediate send lost, and either the two sends within one burst gap of each
//! other, or the older item acked **before** the newer push went out (so nothing crossed) with a
//! downlink copy of it held back past the newer push (copies of one datagram on one path arrive
//! close together, so that needs a spread longer than the gap between the ack and the push).
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
//!   in flight (connection ids are never reused; a new socket gets a new port). A connection
//!   that stays open can become the path again, though: its forgotten ledger is kept aside
//!   ([`Parked`]) and put back in front, as older sends, when it does.
//! * **Superseded** ([`SendLedger::supersede`]): the item may have moved on without this ledger's
//!   owner seeing it (a cluster node dropped its copy of the record). The unmatched sends stay
//!   counted, so their acks are still consumed in order, but none of them can clear any more;
//!   the next fence forgets them as usual.
//! * Nothing is persisted: after a restart the ledger is empty, an ack matches nothing and
//!   clears nothing until the first send after the restart; the first heartbeat's answer is
//!   then the fence, so a restart does not make acks untrusted for any length of time.
//!
//! Counts saturate (the newest group's at 255, the older group's at 63: its byte also holds
//! the crossing bits) and then stick (every further ack is attributed to that group), which
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

/// Count value that no longer moves (the newest group's count).
const STUCK: u8 = u8::MAX;

/// Count value that no longer moves for the older group, whose byte also holds [`CROSSED`]
/// and [`SPENT`].
const STUCK_OLDER: u8 = 0x3F;

/// Bit of the older group's byte: a send crossed older unmatched sends (see the module docs)
/// and no fence has settled them since, so one UDP ack may be a stray of theirs, and every
/// attribution after it may be one send off.
const CROSSED: u8 = 0x80;

/// Bit of the older group's byte: the newest generation has had its one distrusted ack.
const SPENT: u8 = 0x40;

/// The older group's count bits.
const COUNT: u8 = STUCK_OLDER;

/// What an ack answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribution<G = Generation> {
    /// A send of this generation: clear the item if this is still its generation.
    Generation(G),
    /// A send of a generation older than the newest one sent: never clears.
    Older,
    /// A send of this generation, made while a send of an older one was in flight: a duplicate
    /// of that older send (or of its ack) cannot be told apart from this ack, so it never
    /// clears (see the module docs).
    Crossed(G),
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

    /// Sends of two generations closer than this are one burst (see the module docs): a
    /// quarter of the window (48 ms at the default 200 ms).
    pub fn burst(self) -> Window {
        Window(self.0 / 4)
    }

    /// How long a send can still produce a stray ack (a duplicate of its datagram or of its
    /// ack): a round trip plus the spread of the copies. Ten in-flight windows (2 s at the
    /// default 200 ms), at most [`MAX_WINDOW`].
    pub fn stray(self) -> Window {
        Window(self.0.saturating_mul(10).min(Window::new(MAX_WINDOW).0))
    }
}

/// Ledgers set aside on a TCP connection that stopped being a record's path while it stayed
/// open (another connection replaced it). A stream keeps order, so if the connection becomes
/// the record's path again, acks of what was sent on it before come first on it; restoring
/// the ledger in front, as older sends, keeps them from being taken for newer sends (fuzz
/// finding 13). `K` names the record (a uuid).
#[derive(Clone, Debug)]
pub struct Parked<K, G = Generation> {
    items: Vec<(K, [SendLedger<G>; 2])>,
}

impl<K, G> Default for Parked<K, G> {
    fn default() -> Self {
        Parked { items: Vec::new() }
    }
}

impl<K: PartialEq, G: Copy + PartialEq> Parked<K, G> {
    /// Most records parked per connection (a device has one uuid); beyond that the oldest is
    /// dropped, and its acks are handled as before parking existed.
    pub const MAX: usize = 4;

    /// The connection stops being `key`'s path, with these unmatched sends.
    pub fn park(&mut self, key: K, ledgers: [SendLedger<G>; 2]) {
        self.items.retain(|(k, _)| *k != key);
        if ledgers.iter().all(SendLedger::is_empty) {
            return;
        }
        if self.items.len() == Self::MAX {
            self.items.remove(0);
        }
        self.items.push((key, ledgers));
    }

    /// The connection is `key`'s path again: put what was parked in front of `ledgers`.
    pub fn restore(&mut self, key: &K, ledgers: &mut [SendLedger<G>; 2]) {
        if let Some(i) = self.items.iter().position(|(k, _)| k == key) {
            let (_, parked) = self.items.swap_remove(i);
            for (l, p) in ledgers.iter_mut().zip(parked) {
                l.absorb_parked(p);
            }
        }
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
    /// Unmatched sends of older generations (low 6 bits), [`CROSSED`] and [`SPENT`].
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
    /// A send of generation `gen` left at `now` (to the record's current path); `window` is
    /// the in-flight window.
    pub fn on_send(&mut self, gen: G, now: Time, window: Window) {
        if gen != self.gen {
            if self.newest > 0 {
                // The new generation crosses the unmatched sends of the previous one, unless
                // it follows them within a burst.
                if tick(now).wrapping_sub(self.newest_at) > window.burst().0 {
                    self.older |= CROSSED;
                }
                self.set_older_count(add_older(self.older_count(), self.newest));
                self.older_at = self.newest_at;
                self.newest = 0;
            }
            // A crossing marked before stays marked, even when every send looks matched: a
            // stray may have taken the place of an ack still on its way (fuzz finding 11).
            // The new generation gets its own distrusted ack.
            self.older &= !SPENT;
        }
        self.gen = gen;
        self.newest = add(self.newest, 1);
        self.newest_at = tick(now);
    }

    /// An ack arrived at `now` over UDP from the record's current address: match it to the
    /// oldest unmatched send. `window` is the in-flight window; an ack of the newest generation
    /// that crossed older sends, within [`Window::stray`] of the latest of them, is
    /// [`Attribution::Crossed`], since a datagram network may have duplicated one of them or
    /// its ack.
    ///
    /// Only the first such ack of a generation is distrusted: with one stray, a second ack
    /// attributed to the same generation proves the device saw it.
    pub fn on_ack(&mut self, now: Time, window: Window) -> Attribution<G> {
        let stray = self.older & (CROSSED | SPENT) == CROSSED
            && tick(now).wrapping_sub(self.older_at) <= window.stray().0;
        match self.consume() {
            Attribution::Generation(g) if stray => {
                self.older |= SPENT;
                Attribution::Crossed(g)
            }
            a => a,
        }
    }

    /// An ack arrived on the record's attached TCP connection: match it to the oldest unmatched
    /// send. A stream delivers every packet once, so nothing on it can be a duplicate and a
    /// crossed send needs no distrust.
    pub fn on_stream_ack(&mut self) -> Attribution<G> {
        self.consume()
    }

    fn consume(&mut self) -> Attribution<G> {
        let older = self.older_count();
        if older > 0 {
            self.set_older_count(sub_older(older));
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
        if old(self.older_at) {
            // The device sent this heartbeat after acking everything it had of the older
            // sends: they are settled, and can no longer make an ack stray. But when the
            // newest generation has had its distrusted ack and its sends are younger than the
            // window, that ack may have been a stray that took the place of one of theirs,
            // whose own ack can still cross this heartbeat and would then be counted against
            // the generation pushed next: the crossing stays marked for that one.
            let spent = self.older & (CROSSED | SPENT) == CROSSED | SPENT;
            self.older = if spent && !old(self.newest_at) {
                CROSSED | SPENT
            } else {
                0
            };
        }
        if self.newest > 0 && self.older_count() == 0 && old(self.newest_at) {
            self.newest = 0;
        }
    }

    /// Every send went to a path that can no longer deliver acks (the node ignores acks from
    /// it): forget them all. Copies of them can only reach that path too, so nothing they
    /// cause can stray onto the new one: later sends cross nothing.
    pub fn forget(&mut self) {
        self.newest = 0;
        self.older = 0;
    }

    /// The item may have a newer generation than any send made (the owner of this ledger lost
    /// track of it): every unmatched send now counts as older, so its ack is still consumed in
    /// order but never clears. Later sends start a new newest group as usual; they count as
    /// crossing the superseded ones, which may have carried another generation.
    pub fn supersede(&mut self) {
        if self.newest > 0 {
            self.set_older_count(add_older(self.older_count(), self.newest));
            self.older |= CROSSED;
            self.older &= !SPENT;
            self.older_at = self.newest_at;
            self.newest = 0;
        }
    }

    /// Puts the unmatched sends of `parked` (a ledger set aside when its path, a TCP
    /// connection still open, was replaced) in front of this ledger's, as older sends: the
    /// path is attached again, and acks of those sends may still come on it, ahead of acks of
    /// anything sent since (a stream keeps order). Each is consumed in order and clears
    /// nothing, so none can be taken for a newer send (fuzz finding 13).
    pub fn absorb_parked(&mut self, parked: Self) {
        let n = add_older(parked.older_count(), parked.newest.min(STUCK_OLDER));
        if n == 0 {
            return;
        }
        if self.older_count() == 0 {
            self.older_at = if parked.newest > 0 {
                parked.newest_at
            } else {
                parked.older_at
            };
        }
        self.set_older_count(add_older(self.older_count(), n));
    }

    /// No unmatched send.
    pub fn is_empty(&self) -> bool {
        self.newest == 0 && self.older_count() == 0
    }

    fn older_count(&self) -> u8 {
        self.older & COUNT
    }

    fn set_older_count(&mut self, count: u8) {
        self.older = (self.older & !COUNT) | count;
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

/// `add` for the older group's 7-bit count (`b` may be a full newest count).
fn add_older(a: u8, b: u8) -> u8 {
    if a == STUCK_OLDER || b >= STUCK_OLDER {
        STUCK_OLDER
    } else {
        (a + b).min(STUCK_OLDER)
    }
}

fn sub_older(a: u8) -> u8 {
    if a == STUCK_OLDER {
        STUCK_OLDER
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

    const W: Window = Window(25); // 200 ms; stray window 2 s

    #[test]
    fn ledger_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<SendLedger>(), 8);
    }

    #[test]
    fn window_rounds_up_to_ticks() {
        assert_eq!(Window::new(Duration::from_millis(200)), Window(25));
        assert_eq!(Window::new(Duration::from_millis(201)), Window(26));
        assert_eq!(Window::new(Duration::from_secs(3600)), Window(7500));
        assert_eq!(W.stray(), Window(250));
        assert_eq!(Window::new(MAX_WINDOW).stray(), Window::new(MAX_WINDOW));
    }

    #[test]
    fn ack_of_an_older_send_does_not_clear_a_newer_generation() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W); // heartbeat answer "A"
        l.on_send(2, ms(150), W); // "B" pushed, immediate send lost
        assert_eq!(l.on_ack(ms(200), W), Attribution::Older); // the ack of "A"
        l.on_fence(ms(50_000), W);
        l.on_send(2, ms(50_000), W);
        assert!(
            l.on_ack(ms(50_100), W).clears(2),
            "the ack of the re-send clears"
        );
    }

    #[test]
    fn a_duplicated_ack_of_an_older_send_does_not_clear_a_newer_one_that_was_lost() {
        // Lossy seed 3660: "m761" sent, "m469" pushed 200 ms later (its send lost); the ack of
        // "m761" is duplicated on the way and both copies arrive together.
        let mut l = SendLedger::new();
        l.on_send(2, ms(0), W);
        l.on_send(3, ms(200), W);
        assert_eq!(l.on_ack(ms(300), W), Attribution::Older);
        let copy = l.on_ack(ms(300), W);
        assert_eq!(copy, Attribution::Crossed(3));
        assert!(
            !copy.clears(3),
            "the copy must not clear the lost newer send"
        );
        // The next heartbeat sends it again; that send crossed nothing, its ack clears.
        l.on_fence(ms(50_000), W);
        l.on_send(3, ms(50_000), W);
        assert!(l.on_ack(ms(50_100), W).clears(3));
        assert_eq!(l.on_ack(ms(50_100), W), Attribution::Unmatched);
    }

    #[test]
    fn pushes_acked_one_after_the_other_clear_at_once() {
        // Nothing crossed: no duplicate on a clean network, however close the pushes.
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        assert!(l.on_ack(ms(100), W).clears(1));
        l.on_send(2, ms(150), W);
        assert!(l.on_ack(ms(250), W).clears(2));
        assert_eq!(l.on_ack(ms(250), W), Attribution::Unmatched);
    }

    #[test]
    fn a_crossing_ack_is_trusted_again_after_the_stray_window() {
        for (at, trusted) in [(2_000, false), (2_100, true)] {
            let mut l = SendLedger::new();
            l.on_send(1, ms(0), W);
            l.on_send(2, ms(100), W);
            assert_eq!(l.on_ack(ms(1_000), W), Attribution::Older);
            assert_eq!(
                l.on_ack(ms(at), W).clears(2),
                trusted,
                "{at} ms after send 1"
            );
        }
    }

    #[test]
    fn a_fresh_ledger_trusts_its_first_ack_at_any_tick() {
        // A tick of 0 (the wrap) must not look like a crossed send at tick 0.
        // Generation 0 too: a record restored from a snapshot has it (fuzz finding 12).
        for base in [0, TICK_MS * 65_536 * 3, TICK_MS * 65_536 * 3 - 100] {
            for gen in [0, 1] {
                let mut l = SendLedger::new();
                l.on_send(gen, Time::from_millis(base), W);
                let a = l.on_ack(Time::from_millis(base + 100), W);
                assert_eq!(a, Attribution::Generation(gen), "at {base} ms");
            }
        }
    }

    #[test]
    fn a_fence_forgets_unacked_sends_older_than_the_window() {
        // Upstream's sequence: "three" unacked, "four" pushed and re-sent, one ack clears.
        let mut l = SendLedger::new();
        l.on_send(3, ms(0), W);
        l.on_send(4, ms(150), W);
        l.on_fence(ms(300), W);
        l.on_send(4, ms(300), W);
        assert!(l.on_ack(ms(350), W).clears(4));
    }

    #[test]
    fn a_fence_keeps_sends_that_may_have_crossed_it() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        l.on_send(2, ms(10), W); // within a burst of 1: trusted
        l.on_fence(ms(150), W); // both younger than 200 ms: kept
        l.on_send(2, ms(150), W);
        assert_eq!(l.on_ack(ms(200), W), Attribution::Older);
        assert!(l.on_ack(ms(200), W).clears(2));
        assert!(l.on_ack(ms(250), W).clears(2));
        assert_eq!(l.on_ack(ms(250), W), Attribution::Unmatched);
    }

    #[test]
    fn a_send_apart_from_the_one_it_crossed_is_not_trusted_until_a_fence() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        l.on_send(2, ms(100), W); // 100 ms after 1, which is still unmatched: crossed
        l.on_fence(ms(150), W); // both younger than 200 ms: kept, still crossed
        l.on_send(2, ms(150), W);
        assert_eq!(l.on_ack(ms(200), W), Attribution::Older);
        // A duplicate of send 1 or of its ack would look like this ack...
        assert_eq!(l.on_ack(ms(200), W), Attribution::Crossed(2));
        // ...but not like two of them: the second proves 2 was delivered.
        assert!(l.on_ack(ms(250), W).clears(2));
        assert_eq!(l.on_ack(ms(250), W), Attribution::Unmatched);
        // Only one ack came for 2: the next fence settles send 1; the re-send's ack clears.
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        l.on_send(2, ms(100), W);
        assert_eq!(l.on_ack(ms(200), W), Attribution::Older);
        assert_eq!(l.on_ack(ms(200), W), Attribution::Crossed(2));
        l.on_fence(ms(50_000), W);
        l.on_send(2, ms(50_000), W);
        assert!(l.on_ack(ms(50_100), W).clears(2));
    }

    #[test]
    fn a_stray_that_looked_matched_does_not_clear_the_next_push() {
        // Fuzz finding 11: 1 sent, 2 sent (crossing 1), the ack of 1, a network copy of it
        // (taken for 2: Crossed), 3 pushed (its send lost), then 2's own slow ack. The counts
        // said nothing was in flight when 3 went out; the crossing must still hold.
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        l.on_send(2, ms(100), W);
        assert_eq!(l.on_ack(ms(200), W), Attribution::Older);
        assert_eq!(l.on_ack(ms(200), W), Attribution::Crossed(2)); // the copy
        l.on_send(3, ms(210), W); // lost
        let late = l.on_ack(ms(300), W); // 2's own ack
        assert_eq!(late, Attribution::Crossed(3));
        assert!(!late.clears(3));
        // The next fence settles the episode: 3's re-send is trusted.
        l.on_fence(ms(50_000), W);
        l.on_send(3, ms(50_000), W);
        assert!(l.on_ack(ms(50_100), W).clears(3));
    }

    #[test]
    fn a_fence_does_not_settle_a_stray_that_took_a_young_sends_place() {
        // The model test's case: 2 sent at 0, 3 sent at 150 (crossing 2). At 300 the ack of 2
        // and a network copy of it arrive (the copy taken for 3: Crossed), then a heartbeat:
        // 2 is settled, but 3's own ack (sent 150 ms before) may still cross it. The
        // heartbeat's re-send of 3 and a push of 4 follow in one burst; 4's send is lost.
        let mut l = SendLedger::new();
        l.on_send(2, ms(0), W);
        l.on_send(3, ms(150), W);
        assert_eq!(l.on_ack(ms(300), W), Attribution::Older);
        assert_eq!(l.on_ack(ms(300), W), Attribution::Crossed(3)); // the copy
        l.on_fence(ms(300), W);
        l.on_send(3, ms(300), W);
        l.on_send(4, ms(300), W); // lost
        assert_eq!(l.on_ack(ms(320), W), Attribution::Older); // 3's own slow ack
        let next = l.on_ack(ms(340), W); // the ack of the re-send of 3
        assert_eq!(next, Attribution::Crossed(4));
        assert!(!next.clears(4), "4 never reached the device");
        // Without a copy, the fence settles the crossing as before (upstream's sequence:
        // an item re-sent on a heartbeat and acked once is cleared).
        let mut l = SendLedger::new();
        l.on_send(2, ms(0), W);
        l.on_send(3, ms(150), W);
        l.on_fence(ms(300), W);
        l.on_send(3, ms(300), W);
        assert!(l.on_ack(ms(450), W).clears(3));
        // And once the newest sends are old at a fence, a spent crossing is settled too.
        let mut l = SendLedger::new();
        l.on_send(2, ms(0), W);
        l.on_send(3, ms(150), W);
        assert_eq!(l.on_ack(ms(300), W), Attribution::Older);
        assert_eq!(l.on_ack(ms(300), W), Attribution::Crossed(3));
        l.on_fence(ms(50_000), W);
        l.on_send(4, ms(50_000), W);
        assert!(l.on_ack(ms(50_100), W).clears(4));
    }

    #[test]
    fn a_quick_pair_of_pushes_is_one_burst() {
        // Two pushes 20 ms apart to an online device, both delivered and acked: no duplicate.
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        l.on_send(2, ms(20), W);
        assert_eq!(l.on_ack(ms(60), W), Attribution::Older);
        assert!(l.on_ack(ms(80), W).clears(2));
        // A crossing marked before a burst stays marked.
        l.on_send(3, ms(200), W); // nothing unmatched: nothing crossed
        l.on_send(4, ms(400), W); // crosses 3
        l.on_send(5, ms(410), W); // a burst after 4, but 3 is still crossed
        assert_eq!(l.on_ack(ms(500), W), Attribution::Older);
        assert_eq!(l.on_ack(ms(500), W), Attribution::Older);
        assert_eq!(l.on_ack(ms(500), W), Attribution::Crossed(5));
    }

    #[test]
    fn a_fence_settles_each_group_on_its_own() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        l.on_send(2, ms(190), W);
        l.on_fence(ms(300), W); // 1 is 300 ms old: settled; 2 is 110 ms old: kept
        l.on_send(2, ms(300), W);
        assert!(l.on_ack(ms(350), W).clears(2));
        assert!(l.on_ack(ms(350), W).clears(2));
        assert_eq!(l.on_ack(ms(350), W), Attribution::Unmatched);
    }

    #[test]
    fn parked_sends_are_answered_first_and_never_clear() {
        // Finding 13's shape: 1 sent on a connection that was then replaced (parked), and
        // attached again; 2 sent on it after. The ack of 1 comes first on the stream.
        let mut parked = SendLedger::new();
        parked.on_send(1, ms(0), W);
        let mut l = SendLedger::new();
        l.absorb_parked(parked);
        l.on_send(2, ms(10), W);
        assert_eq!(l.on_stream_ack(), Attribution::Older);
        assert!(l.on_stream_ack().clears(2));
        // An empty parked ledger changes nothing.
        let mut l = SendLedger::new();
        l.on_send(2, ms(10), W);
        l.absorb_parked(SendLedger::new());
        assert!(l.on_stream_ack().clears(2));
    }

    #[test]
    fn forget_and_unmatched() {
        let mut l = SendLedger::new();
        assert_eq!(l.on_ack(ms(0), W), Attribution::Unmatched);
        l.on_send(1, ms(0), W);
        l.on_send(2, ms(1), W);
        l.forget();
        assert!(l.is_empty());
        assert_eq!(l.on_ack(ms(2), W), Attribution::Unmatched);
    }

    #[test]
    fn stuck_counts_never_release_a_newer_generation() {
        let mut l = SendLedger::new();
        for i in 0..300 {
            l.on_send(1, ms(i), W);
        }
        l.on_send(2, ms(400), W);
        for _ in 0..1000 {
            assert_eq!(l.on_ack(ms(500), W), Attribution::Older);
        }
        l.on_fence(ms(1_000), W);
        l.on_send(2, ms(1_000), W);
        assert!(l.on_ack(ms(1_050), W).clears(2));
    }

    #[test]
    fn superseded_sends_are_consumed_but_never_clear() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        l.on_send(1, ms(10), W);
        l.supersede();
        l.on_send(1, ms(20), W); // the same generation sent again after, e.g., a re-bind
        assert_eq!(l.on_ack(ms(100), W), Attribution::Older);
        assert_eq!(l.on_ack(ms(100), W), Attribution::Older);
        // The superseded sends may have been of another generation: the send after them
        // crossed them, so its ack is not trusted to clear until a fence settles them.
        assert_eq!(l.on_ack(ms(100), W), Attribution::Crossed(1));
        assert_eq!(l.on_ack(ms(100), W), Attribution::Unmatched);
        l.on_fence(ms(300), W);
        l.on_send(1, ms(300), W);
        assert!(
            l.on_ack(ms(350), W).clears(1),
            "the ack of the send after the fence clears"
        );
        // A fence settles superseded sends like any older group.
        l.on_send(2, ms(400), W);
        l.supersede();
        l.on_fence(ms(700), W);
        assert!(l.is_empty());
    }

    #[test]
    fn wide_generations_are_attributed_exactly() {
        // A cluster store's generations: clock-based u64s, not a wrapping counter.
        let mut l: SendLedger<u64> = SendLedger::default();
        let (a, b) = (1_700_000_000_000u64, 1_700_000_000_150u64);
        l.on_send(a, ms(0), W);
        l.on_send(b, ms(150), W);
        assert!(!l.on_ack(ms(200), W).clears(b), "the ack of the older send");
        assert_eq!(l.on_ack(ms(200), W), Attribution::Crossed(b));
        l.on_fence(ms(50_000), W);
        l.on_send(b, ms(50_000), W);
        let at = l.on_ack(ms(50_100), W);
        assert_eq!(at, Attribution::Generation(b));
        assert!(!at.clears(a) && at.clears(b));
        assert_eq!(std::mem::size_of::<SendLedger<u64>>(), 16);
    }

    #[test]
    fn tick_wrap_only_keeps() {
        let mut l = SendLedger::new();
        l.on_send(1, ms(0), W);
        // Exactly one wrap later the send looks 0 ms old: kept (a duplicate at worst).
        l.on_fence(ms(65_536 * TICK_MS), W);
        assert!(!l.is_empty());
    }
}
