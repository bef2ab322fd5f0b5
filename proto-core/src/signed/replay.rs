//! The replay window of one key holder: which `(ts, nonce)` pairs were already accepted.
//!
//! Memory is fixed: [`SLOTS`] pairs plus a floor, 72 bytes, whatever the traffic. The rule
//! that keeps it sound with so little memory:
//!
//! * every pair at or below `floor` (ordered by `ts`, then `nonce`) is refused;
//! * every pair in `seen` is refused;
//! * when `seen` is full, its smallest pair is evicted and `floor` rises to it.
//!
//! So an accepted pair is, forever after, either in `seen` or at or below `floor`: it is never
//! accepted twice. Pairs whose `ts` fell out of the time window are pruned from `seen` without
//! raising the floor, because the caller's time check refuses them from then on (time never
//! goes back in the node). The cost of the small memory is that a device sending more than
//! [`SLOTS`] packets within the window must send them with increasing `(ts, nonce)` (a
//! counter as nonce does that), or a late, reordered one may be refused as a replay; the Rust
//! `Device` uses a counter.
//!
//! A pair is kept as one `u64`, `ts` in the high half, so that the order of the numbers is the
//! order of the pairs and every scan of the slots is a few plain compares. A free slot holds
//! 0, the pair `(0, 0)`: that pair is at or below every floor, so it is never accepted and
//! cannot be confused with one that was (no length byte needed; the server keeps one window
//! per signed-only uuid, in the cache lines it reads first).

/// Pairs remembered per key holder.
pub const SLOTS: usize = 8;

/// A slot with no pair in it.
const FREE: u64 = 0;

fn pair(ts: u32, nonce: u32) -> u64 {
    (u64::from(ts) << 32) | u64::from(nonce)
}

/// See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    floor: u64,
    seen: [u64; SLOTS],
}

/// The pair was seen before, or is at or below the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replayed;

impl ReplayWindow {
    /// An empty window: everything above `(0, 0)` is new.
    pub fn new() -> Self {
        Self::default()
    }

    /// A window that refuses every pair stamped at or before `ts` (used after a restart, when
    /// the pairs accepted before it are not known).
    pub fn refusing_until(ts: u32) -> Self {
        ReplayWindow {
            floor: pair(ts, u32::MAX),
            ..Self::default()
        }
    }

    /// From now on also refuses every pair stamped at or before `ts` (never lowers the floor).
    pub fn refuse_until(&mut self, ts: u32) {
        self.floor = self.floor.max(pair(ts, u32::MAX));
    }

    /// A word of the last slot, to fetch its cache line early (see `Keyring::verify`).
    pub(crate) fn last_word(&self) -> u64 {
        self.seen[SLOTS - 1]
    }

    /// Accepts `(ts, nonce)` once. `now_s - window_s` is the oldest `ts` the caller still
    /// accepts; older entries are pruned.
    pub fn check(
        &mut self,
        now_s: u32,
        window_s: u32,
        ts: u32,
        nonce: u32,
    ) -> Result<(), Replayed> {
        let p = pair(ts, nonce);
        if p <= self.floor {
            return Err(Replayed);
        }
        // One pass over the slots finds a repeat, the first free slot and the smallest pair
        // (the eviction's candidate). `p` is above the floor, so above `FREE`: free slots
        // never match it.
        let mut repeat = false;
        let mut free = None;
        let mut min_at = 0;
        for (i, &s) in self.seen.iter().enumerate() {
            repeat |= s == p;
            if s == FREE && free.is_none() {
                free = Some(i);
            }
            if s < self.seen[min_at] {
                min_at = i;
            }
        }
        if repeat {
            return Err(Replayed);
        }
        let slot = match free {
            Some(i) => i,
            None => {
                // Full: pairs out of the time window go first (the caller's time check refuses
                // them from now on), and only if none did does the smallest rise into the floor.
                let oldest = pair(now_s.saturating_sub(window_s), 0);
                let mut first = None;
                for (i, s) in self.seen.iter_mut().enumerate() {
                    if *s < oldest {
                        *s = FREE;
                        first.get_or_insert(i);
                    }
                }
                match first {
                    Some(i) => i,
                    None => {
                        self.floor = self.floor.max(self.seen[min_at]);
                        min_at
                    }
                }
            }
        };
        self.seen[slot] = p;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_accepted_once() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(100, 60, 100, 1), Ok(()));
        assert_eq!(w.check(100, 60, 100, 1), Err(Replayed));
        assert_eq!(w.check(100, 60, 100, 2), Ok(()));
    }

    #[test]
    fn eviction_raises_the_floor_so_evicted_pairs_stay_refused() {
        let mut w = ReplayWindow::new();
        for n in 0..SLOTS as u32 + 4 {
            assert_eq!(w.check(100, 60, 100, n), Ok(()));
        }
        for n in 0..SLOTS as u32 + 4 {
            assert_eq!(w.check(100, 60, 100, n), Err(Replayed), "nonce {n}");
        }
        // Increasing pairs keep being accepted.
        assert_eq!(w.check(100, 60, 101, 0), Ok(()));
    }

    #[test]
    fn after_a_restart_older_stamps_are_refused() {
        let mut w = ReplayWindow::refusing_until(500);
        assert_eq!(w.check(500, 60, 500, u32::MAX), Err(Replayed));
        assert_eq!(w.check(500, 60, 490, 3), Err(Replayed));
        assert_eq!(w.check(501, 60, 501, 0), Ok(()));
    }

    /// The rule as first written, one scan per step (contains, free slot, prune, free slot,
    /// smallest): `check`'s single pass must leave the same window and give the same answer.
    fn check_by_steps(w: &mut ReplayWindow, now_s: u32, window_s: u32, p: u64) -> bool {
        if p <= w.floor || w.seen.contains(&p) {
            return false;
        }
        let slot = match w.seen.iter().position(|&s| s == FREE) {
            Some(i) => i,
            None => {
                let oldest = pair(now_s.saturating_sub(window_s), 0);
                for s in &mut w.seen {
                    if *s < oldest {
                        *s = FREE;
                    }
                }
                match w.seen.iter().position(|&s| s == FREE) {
                    Some(i) => i,
                    None => {
                        let mut min_at = 0;
                        for i in 1..SLOTS {
                            if w.seen[i] < w.seen[min_at] {
                                min_at = i;
                            }
                        }
                        w.floor = w.floor.max(w.seen[min_at]);
                        min_at
                    }
                }
            }
        };
        w.seen[slot] = p;
        true
    }

    proptest::proptest! {
        /// Whatever the arrivals (clocks going back included, as a device's may).
        #[test]
        fn the_single_pass_is_the_rule_step_by_step(
            start in proptest::option::of(0u32..50),
            steps in proptest::collection::vec((0u32..100, 0u32..60, 0u32..4), 0..300),
        ) {
            let mut a = start.map_or_else(ReplayWindow::new, ReplayWindow::refusing_until);
            let mut b = a.clone();
            for (now, ts, nonce) in steps {
                let got = a.check(now, 20, ts, nonce).is_ok();
                let want = check_by_steps(&mut b, now, 20, pair(ts, nonce));
                proptest::prop_assert_eq!(got, want);
                proptest::prop_assert_eq!(&a, &b);
            }
        }
    }

    #[test]
    fn pairs_out_of_the_time_window_make_room_without_raising_the_floor() {
        let mut w = ReplayWindow::new();
        for n in 0..SLOTS as u32 {
            assert_eq!(w.check(100, 60, 100, n + 1), Ok(()));
        }
        // 61 s later every remembered pair is out of the window: room is made, and a pair
        // below the old ones (but within the window) is still new.
        assert_eq!(w.check(161, 60, 150, 0), Ok(()));
        assert_eq!(w.floor, FREE);
        assert_eq!(w.check(161, 60, 150, 0), Err(Replayed));
        assert_eq!(std::mem::size_of::<ReplayWindow>(), 72);
    }
}
