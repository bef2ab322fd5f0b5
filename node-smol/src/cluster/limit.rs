//! The bound on store operations in flight, sized to the store time-out.
//!
//! Every operation the core issues has `--cluster-store-timeout` to get its result, counted
//! from when it was issued; time it spends queued behind other operations (in our queue, in
//! the push lanes, in Redis's input buffer) counts too. A fixed bound that is right on a quiet
//! machine lets operations queue past the time-out when Redis slows down, and a push then gets
//! `0xFF` for our own queueing. So the bound follows the latency: above the target (a quarter
//! of the time left after the `WAIT`) it shrinks by a quarter, at most once per target
//! interval; well below the target it grows back by one per bound's worth of completed
//! operations (one per round trip, as TCP's congestion window does), up to
//! `--cluster-max-inflight`. Growing faster would let a stream of fast results outweigh the
//! slow ones (measured in bench/cluster.sh's mass re-home: with one step per operation the
//! bound was back at its maximum at the end and 530 binds outlived their time-out at one
//! node; with one per bound's worth it was at 103 and 251 did). Input beyond the bound waits in TCP flow control (back-pressure);
//! nothing is dropped.

use std::time::{Duration, Instant};

/// The smallest bound: enough to keep every master busy.
pub const MIN_INFLIGHT: usize = 16;

/// An adaptive in-flight bound (additive increase, multiplicative decrease on latency).
#[derive(Debug)]
pub struct InflightLimit {
    max: usize,
    cur: usize,
    /// Fast operations since the bound last grew.
    credit: usize,
    target: Duration,
    last_cut: Option<Instant>,
}

impl InflightLimit {
    /// A bound of at most `max` that keeps operations under `target`.
    pub fn new(max: usize, target: Duration) -> Self {
        InflightLimit {
            max,
            cur: max,
            credit: 0,
            target,
            last_cut: None,
        }
    }

    /// The latency it keeps operations under: a quarter of what the time-out leaves after the
    /// `WAIT`, plus the `WAIT`.
    pub fn target_for(store_timeout: Duration, wait_timeout: Duration) -> Duration {
        wait_timeout + store_timeout.saturating_sub(wait_timeout) / 4
    }

    /// The bound now.
    pub fn get(&self) -> usize {
        self.cur
    }

    /// One operation completed after `took` (from when the core issued it).
    pub fn on_done(&mut self, now: Instant, took: Duration) {
        if took > self.target {
            if self
                .last_cut
                .is_none_or(|t| now.duration_since(t) >= self.target)
            {
                self.cur = (self.cur - self.cur / 4).max(MIN_INFLIGHT.min(self.max));
                self.last_cut = Some(now);
            }
        } else if took <= self.target / 2 && self.cur < self.max {
            self.credit += 1;
            if self.credit >= self.cur {
                self.credit = 0;
                self.cur += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(100);

    #[test]
    fn slow_operations_shrink_the_bound_once_per_interval_down_to_the_floor() {
        let t0 = Instant::now();
        let mut l = InflightLimit::new(1024, T);
        l.on_done(t0, T * 2);
        assert_eq!(l.get(), 768);
        // A burst of slow results in the same interval is one signal, not many.
        for _ in 0..100 {
            l.on_done(t0 + T / 2, T * 2);
        }
        assert_eq!(l.get(), 768);
        for i in 1..100 {
            l.on_done(t0 + T * i, T * 2);
        }
        assert_eq!(l.get(), MIN_INFLIGHT);
    }

    #[test]
    fn fast_operations_grow_it_back_to_the_maximum_and_no_further() {
        let t0 = Instant::now();
        let mut l = InflightLimit::new(64, T);
        l.on_done(t0, T * 2);
        assert_eq!(l.get(), 48);
        // Between half the target and the target: hold.
        l.on_done(t0, T * 3 / 4);
        assert_eq!(l.get(), 48);
        // One step per bound's worth of fast results: 48 of them make 49.
        for _ in 0..48 {
            l.on_done(t0, T / 4);
        }
        assert_eq!(l.get(), 49);
        for _ in 0..2000 {
            l.on_done(t0, T / 4);
        }
        assert_eq!(l.get(), 64);
    }

    #[test]
    fn a_maximum_below_the_floor_is_kept() {
        let mut l = InflightLimit::new(4, T);
        l.on_done(Instant::now(), T * 2);
        assert_eq!(l.get(), 4);
    }

    #[test]
    fn the_target_leaves_the_wait_its_time() {
        assert_eq!(
            InflightLimit::target_for(Duration::from_millis(500), Duration::from_millis(50)),
            Duration::from_millis(162) + Duration::from_micros(500)
        );
    }
}
