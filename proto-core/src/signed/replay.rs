//! The replay window of one key holder: which `(ts, nonce)` pairs were already accepted.
//!
//! Memory is fixed: [`SLOTS`] pairs plus a floor, 76 bytes, whatever the traffic. The rule
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

/// Pairs remembered per key holder.
pub const SLOTS: usize = 8;

/// See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    floor: (u32, u32),
    seen: [(u32, u32); SLOTS],
    len: u8,
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
            floor: (ts, u32::MAX),
            ..Self::default()
        }
    }

    /// From now on also refuses every pair stamped at or before `ts` (never lowers the floor).
    pub fn refuse_until(&mut self, ts: u32) {
        self.floor = self.floor.max((ts, u32::MAX));
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
        let pair = (ts, nonce);
        if pair <= self.floor || self.seen().contains(&pair) {
            return Err(Replayed);
        }
        let mut n = usize::from(self.len);
        if n == SLOTS {
            // Full: pairs out of the time window go first (the caller's time check refuses
            // them from now on), and only if none did does the smallest rise into the floor.
            // Checked only when full, so the common case (a slot free) is the scan above.
            let oldest = now_s.saturating_sub(window_s);
            n = 0;
            for i in 0..SLOTS {
                if self.seen[i].0 >= oldest {
                    self.seen[n] = self.seen[i];
                    n += 1;
                }
            }
        }
        if n == SLOTS {
            let (min_at, min) = self
                .seen
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|&(_, p)| p)
                .unwrap_or((0, (0, 0)));
            self.floor = self.floor.max(min);
            self.seen[min_at] = pair;
        } else {
            self.seen[n] = pair;
            n += 1;
        }
        self.len = n as u8;
        Ok(())
    }

    fn seen(&self) -> &[(u32, u32)] {
        &self.seen[..usize::from(self.len)]
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
}
