//! A bounded, in-memory history of the server's counters for the console's charts, and of
//! recent push->ack latencies for its percentiles.
//!
//! The loop samples the core's counters about every [`INTERVAL`]; the console asks for the
//! per-second rates between consecutive samples. Both rings are capped by count as well as by
//! age, so a server that runs for months holds the same few tens of kilobytes as one that just
//! started. Nothing here is persisted: after a restart the charts start empty.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ddpush_proto::cluster::ClusterStats;
use ddpush_proto::{Stats, Time};

/// Target time between two samples.
pub(crate) const INTERVAL: Duration = Duration::from_secs(2);
/// How far back the charts and the latency percentiles reach.
pub(crate) const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Samples kept at most (a window's worth at the target interval, plus slack for jitter).
const MAX_SAMPLES: usize = 600;
/// Push->ack latencies kept at most.
const MAX_LATENCIES: usize = 4096;
/// A sample is taken once this much of [`INTERVAL`] has passed: the loop looks once a second,
/// so waiting for the full interval would often mean three seconds.
const MIN_GAP: Duration = Duration::from_millis(1500);

/// The charted series, in the order of [`Sample::counters`].
pub(crate) const SERIES: [&str; 7] = [
    "heartbeats",
    "pushes_accepted",
    "pushes_rejected",
    "deliveries",
    "resends",
    "invalid",
    "limited",
];

/// The core's counters that the console charts, in [`SERIES`] order. The one place that
/// knows how [`Stats`] maps onto the charts.
pub(crate) fn counters(s: &Stats) -> [u64; SERIES.len()] {
    [
        s.heartbeats,
        s.pushes_accepted,
        s.pushes_rejected.total(),
        s.deliveries,
        s.resends,
        s.invalid.total(),
        s.limited.total(),
    ]
}

/// The same series from a cluster node's counters (its pushes are `[0x00, 0x01, 0xFF]`; a
/// push the store did not confirm counts as neither accepted nor rejected).
pub(crate) fn cluster_counters(s: &ClusterStats) -> [u64; SERIES.len()] {
    [
        s.heartbeats,
        s.pushes[0],
        s.pushes[1],
        s.deliveries,
        s.resends,
        s.invalid,
        s.limited.total(),
    ]
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    seq: u64,
    at: Time,
    counters: [u64; SERIES.len()],
}

/// Per-second rates between consecutive samples, newest last.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Rates {
    /// Sequence number of the newest point (0: none yet). Points are numbered consecutively,
    /// so a poller that last saw `n` asks for the points after `n`.
    pub seq: u64,
    /// End time of each point.
    pub t_ms: Vec<u64>,
    /// One column per [`SERIES`] entry, each as long as `t_ms`.
    pub series: Vec<Vec<f64>>,
}

/// Push->ack latency percentiles over [`WINDOW`].
#[derive(Debug, PartialEq)]
pub(crate) struct Latency {
    /// Acks in the window (at most [`MAX_LATENCIES`]).
    pub samples: usize,
    /// Median, if any sample.
    pub p50_ms: Option<u64>,
    /// 99th percentile, if any sample.
    pub p99_ms: Option<u64>,
}

/// The two rings.
#[derive(Debug, Default)]
pub(crate) struct History {
    samples: VecDeque<Sample>,
    next_seq: u64,
    latencies: VecDeque<(Instant, u64)>,
}

impl History {
    /// No sample yet.
    pub(crate) fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// What the loop calls about once a second: the counters now, and how long the process
    /// has run. The counters start at zero with the process (a restore sets only gauges), so
    /// the very first sample is preceded by a zero point at the start, and the first chart
    /// point covers what happened before it.
    pub(crate) fn offer(&mut self, now: Time, uptime: Duration, counters: [u64; SERIES.len()]) {
        if self.is_empty() {
            let up = u64::try_from(uptime.as_millis()).unwrap_or(u64::MAX);
            self.sample_counters(Time(now.0.saturating_sub(up)), [0; SERIES.len()]);
        }
        self.sample_counters(now, counters);
    }

    /// Takes a sample if enough time has passed since the last one; returns whether it did.
    #[cfg(test)]
    pub(crate) fn sample(&mut self, now: Time, stats: &Stats) -> bool {
        self.sample_counters(now, counters(stats))
    }

    /// [`History::sample`] of counters already mapped onto [`SERIES`].
    fn sample_counters(&mut self, now: Time, counters: [u64; SERIES.len()]) -> bool {
        if let Some(last) = self.samples.back() {
            if now.since(last.at) < MIN_GAP {
                return false;
            }
        }
        self.next_seq += 1;
        self.samples.push_back(Sample {
            seq: self.next_seq,
            at: now,
            counters,
        });
        // One sample more than the points in the window: a rate needs two ends.
        while self.samples.len() > MAX_SAMPLES
            || self
                .samples
                .get(1)
                .is_some_and(|s| now.since(s.at) >= WINDOW)
        {
            self.samples.pop_front();
        }
        true
    }

    /// The rates of the points newer than `since` (all of them for 0).
    pub(crate) fn rates(&self, since: u64) -> Rates {
        let mut r = Rates {
            seq: self.samples.back().map_or(0, |s| s.seq),
            t_ms: Vec::new(),
            series: vec![Vec::new(); SERIES.len()],
        };
        for (a, b) in self.samples.iter().zip(self.samples.iter().skip(1)) {
            if b.seq <= since {
                continue;
            }
            let secs = b.at.since(a.at).as_secs_f64();
            r.t_ms.push(b.at.as_millis());
            for (col, (x, y)) in r.series.iter_mut().zip(a.counters.iter().zip(&b.counters)) {
                // Round to 0.01/s so the JSON stays short; counters never go backwards
                // within a run, and a zero-length gap cannot happen (MIN_GAP).
                let v = y.saturating_sub(*x) as f64 / secs.max(0.001);
                col.push((v * 100.0).round() / 100.0);
            }
        }
        r
    }

    /// Records one push->ack latency observed at `at`.
    pub(crate) fn acked(&mut self, at: Instant, latency: Duration) {
        // Make room first, so the ring never grows past its cap (nor its allocation past it).
        if self.latencies.len() >= MAX_LATENCIES {
            self.latencies.pop_front();
        }
        self.latencies
            .push_back((at, latency.as_millis().min(u128::from(u64::MAX)) as u64));
        self.expire(at);
    }

    /// Percentiles of the latencies within [`WINDOW`] of `now` (nearest-rank method).
    pub(crate) fn latency(&mut self, now: Instant) -> Latency {
        self.expire(now);
        let mut v: Vec<u64> = self.latencies.iter().map(|(_, l)| *l).collect();
        v.sort_unstable();
        let rank = |p: f64| -> Option<u64> {
            if v.is_empty() {
                return None;
            }
            let k = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            Some(v[k - 1])
        };
        Latency {
            samples: v.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .latencies
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > WINDOW)
        {
            self.latencies.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(heartbeats: u64, accepted: u64) -> Stats {
        let mut s = Stats::default();
        s.heartbeats = heartbeats;
        s.pushes_accepted = accepted;
        s
    }

    #[test]
    fn rates_are_per_second_between_samples() {
        let mut h = History::default();
        assert!(h.sample(Time(10_000), &stats(0, 0)));
        assert!(!h.sample(Time(11_000), &stats(5, 0)), "too soon");
        assert!(h.sample(Time(12_000), &stats(10, 4)));
        assert!(h.sample(Time(16_000), &stats(30, 4)));
        let r = h.rates(0);
        assert_eq!(r.seq, 3);
        assert_eq!(r.t_ms, vec![12_000, 16_000]);
        assert_eq!(r.series[0], vec![5.0, 5.0]);
        assert_eq!(r.series[1], vec![2.0, 0.0]);
        // Only the newer point for a poller that has seen point 2.
        let r = h.rates(2);
        assert_eq!(r.t_ms, vec![16_000]);
        assert_eq!(r.seq, 3);
        assert!(h.rates(3).t_ms.is_empty());
    }

    #[test]
    fn history_stays_within_the_window_and_the_cap() {
        let mut h = History::default();
        let mut t = 0u64;
        for i in 0..5_000u64 {
            t += 2_000;
            h.sample(Time(t), &stats(i, i));
        }
        let r = h.rates(0);
        assert!(h.samples.len() <= MAX_SAMPLES);
        // 15 minutes at 2 s: 450 points.
        assert_eq!(r.t_ms.len(), 450);
        assert!(t - r.t_ms[0] < WINDOW.as_millis() as u64);
        assert_eq!(r.series[0][0], 0.5);

        // Samples at 1.5 s are capped by count before the window fills.
        let mut h = History::default();
        for i in 0..5_000u64 {
            h.sample(Time(i * 1_500), &stats(i, i));
        }
        assert_eq!(h.samples.len(), MAX_SAMPLES);
    }

    #[test]
    fn latency_percentiles_use_nearest_rank_within_the_window() {
        let mut h = History::default();
        let t0 = Instant::now();
        assert_eq!(h.latency(t0).p50_ms, None);
        for ms in 1..=100u64 {
            h.acked(t0, Duration::from_millis(ms));
        }
        let l = h.latency(t0);
        assert_eq!((l.samples, l.p50_ms, l.p99_ms), (100, Some(50), Some(99)));
        // A later slow ack; the first hundred leave the window.
        let later = t0 + WINDOW + Duration::from_secs(1);
        h.acked(later, Duration::from_secs(7));
        let l = h.latency(later);
        assert_eq!((l.samples, l.p50_ms, l.p99_ms), (1, Some(7000), Some(7000)));
        for _ in 0..10_000 {
            h.acked(later, Duration::from_millis(1));
        }
        assert_eq!(h.latency(later).samples, MAX_LATENCIES);
    }
}
