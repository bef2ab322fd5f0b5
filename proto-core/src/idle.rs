//! Idle deadlines of TCP connections, in one-second buckets like the offline wheel: an idle
//! connection costs one 8-byte entry in a bucket, no heap node and no timer of its own.
//!
//! An entry is only a connection id. When its second comes the node re-checks the connection:
//! if it was active meanwhile, the entry moves to the new deadline (so data on a connection
//! costs no wheel work). An entry whose exact deadline falls inside the second being processed
//! waits in a short list with its millisecond deadline, so timeouts fire on time to the
//! millisecond, not at the next whole second.

use crate::time::Time;
use crate::ConnId;

/// Seconds the ring covers; a later deadline is parked at the far end and re-checked there.
const SPAN: u32 = 1024;

pub(crate) struct IdleWheel {
    buckets: Vec<Vec<ConnId>>,
    /// The next second to process; every bucket before it is empty.
    cursor: u32,
    entries: usize,
    /// The earliest second with an entry (no entry lies before it).
    next: Option<u32>,
    /// Entries due within a second already processed, with their exact deadlines.
    soon: Vec<(Time, ConnId)>,
}

impl IdleWheel {
    pub(crate) fn new() -> Self {
        IdleWheel {
            buckets: (0..SPAN).map(|_| Vec::new()).collect(),
            cursor: 0,
            entries: 0,
            next: None,
            soon: Vec::new(),
        }
    }

    fn bucket(sec: u32) -> usize {
        (sec % SPAN) as usize
    }

    /// Schedules `conn` to be looked at by `deadline`.
    pub(crate) fn schedule(&mut self, conn: ConnId, deadline: Time) {
        let sec = deadline.secs32();
        if sec < self.cursor {
            self.soon.push((deadline, conn));
            return;
        }
        let sec = sec.min(self.cursor.saturating_add(SPAN - 1));
        self.buckets[Self::bucket(sec)].push(conn);
        self.entries += 1;
        self.next = Some(self.next.map_or(sec, |n| n.min(sec)));
    }

    /// Moves every entry whose time has come (`now` or earlier) into `out`. The caller
    /// re-checks each and schedules again those not yet idle long enough.
    pub(crate) fn expire(&mut self, now: Time, out: &mut Vec<ConnId>) {
        if !self.soon.is_empty() {
            let mut i = 0;
            while i < self.soon.len() {
                if self.soon[i].0 <= now {
                    out.push(self.soon.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
        }
        let now_s = now.secs32();
        if now_s < self.cursor {
            return;
        }
        match self.next {
            // Nothing due up to `now_s`: every bucket skipped over is empty.
            None => {}
            Some(n) if n > now_s => {}
            Some(n) => {
                let last = now_s.min(n.saturating_add(SPAN - 1));
                for s in n..=last {
                    let b = &mut self.buckets[Self::bucket(s)];
                    self.entries -= b.len();
                    out.append(b);
                }
                self.next = None;
                if self.entries > 0 {
                    self.next = (last.saturating_add(1)..last.saturating_add(SPAN))
                        .find(|&s| !self.buckets[Self::bucket(s)].is_empty());
                }
            }
        }
        self.cursor = now_s.saturating_add(1);
    }

    /// When [`IdleWheel::expire`] next has work.
    pub(crate) fn next_due(&self) -> Option<Time> {
        let soon = self.soon.iter().map(|&(t, _)| t).min();
        let wheel = self.next.map(|s| Time::from_secs(u64::from(s)));
        soon.into_iter().chain(wheel).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: u64) -> Time {
        Time(t)
    }

    #[test]
    fn an_entry_comes_out_at_its_second_and_then_at_its_exact_deadline() {
        let mut w = IdleWheel::new();
        let mut out = Vec::new();
        w.expire(ms(100_000), &mut out);
        w.schedule(7, ms(400_250));
        assert_eq!(w.next_due(), Some(ms(400_000)));
        w.expire(ms(399_999), &mut out);
        assert!(out.is_empty());
        w.expire(ms(400_000), &mut out);
        assert_eq!(out, vec![7]);
        // The node finds it not yet due and schedules it again: it waits for the exact time.
        out.clear();
        w.schedule(7, ms(400_250));
        assert_eq!(w.next_due(), Some(ms(400_250)));
        w.expire(ms(400_249), &mut out);
        assert!(out.is_empty());
        w.expire(ms(400_250), &mut out);
        assert_eq!(out, vec![7]);
        assert_eq!(w.next_due(), None);
    }

    #[test]
    fn far_deadlines_are_parked_at_the_end_of_the_ring_and_jumps_lose_nothing() {
        let mut w = IdleWheel::new();
        let mut out = Vec::new();
        w.expire(ms(0), &mut out);
        w.schedule(1, ms(5_000_000)); // beyond the span
        w.schedule(2, ms(3_000));
        w.schedule(3, ms(3_500));
        assert_eq!(w.next_due(), Some(ms(3_000)));
        w.expire(ms(10_000), &mut out);
        out.sort();
        assert_eq!(out, vec![2, 3]);
        out.clear();
        assert_eq!(w.next_due(), Some(Time::from_secs(1024)));
        // A jump far past everything.
        w.expire(ms(9_000_000), &mut out);
        assert_eq!(out, vec![1]);
        assert_eq!(w.next_due(), None);
    }
}
