//! A coarse timer wheel for offline detection: one bucket per second, one entry per online
//! client, no heap node per client.
//!
//! An entry is only a slot number. When its second comes the node re-checks the record: if a
//! heartbeat arrived meanwhile, the entry moves to the new deadline instead of being updated on
//! every heartbeat, so a heartbeat costs no wheel work at all.

pub(crate) struct Wheel {
    buckets: Vec<Vec<u32>>,
    /// The next second to process; everything before it has been handled.
    cursor: u32,
    entries: usize,
}

impl Wheel {
    /// A wheel able to hold deadlines up to `span` seconds ahead.
    pub(crate) fn new(span: u32) -> Self {
        Wheel {
            buckets: (0..span as usize + 2).map(|_| Vec::new()).collect(),
            cursor: 0,
            entries: 0,
        }
    }

    fn bucket(&self, sec: u32) -> usize {
        sec as usize % self.buckets.len()
    }

    /// Schedules `slot` at second `due` (clamped to the next unprocessed second).
    pub(crate) fn schedule(&mut self, slot: u32, due: u32) {
        let due = due.max(self.cursor);
        debug_assert!(((due - self.cursor) as usize) < self.buckets.len());
        let b = self.bucket(due);
        self.buckets[b].push(slot);
        self.entries += 1;
    }

    /// Removes and returns every entry due at or before `now_s`, in deterministic order.
    pub(crate) fn expire(&mut self, now_s: u32, out: &mut Vec<u32>) {
        if now_s < self.cursor {
            return;
        }
        if self.entries == 0 {
            self.cursor = now_s.saturating_add(1);
            return;
        }
        let span = (now_s - self.cursor) as usize + 1;
        if span >= self.buckets.len() {
            // A jump past the whole ring: everything is due.
            for b in 0..self.buckets.len() {
                let sec = self.cursor as usize + b;
                let i = sec % self.buckets.len();
                out.append(&mut self.buckets[i]);
            }
        } else {
            for s in self.cursor..=now_s {
                let i = self.bucket(s);
                out.append(&mut self.buckets[i]);
            }
        }
        self.entries -= out.len().min(self.entries);
        self.cursor = now_s.saturating_add(1);
    }

    /// The earliest second with an entry, if any.
    pub(crate) fn next_due(&self) -> Option<u32> {
        if self.entries == 0 {
            return None;
        }
        (0..self.buckets.len() as u32)
            .map(|d| self.cursor + d)
            .find(|&s| !self.buckets[self.bucket(s)].is_empty())
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.buckets.iter().map(|b| b.capacity() * 4).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_out_at_their_second() {
        let mut w = Wheel::new(60);
        let mut out = Vec::new();
        w.expire(100, &mut out);
        w.schedule(1, 160);
        w.schedule(2, 130);
        assert_eq!(w.next_due(), Some(130));
        w.expire(129, &mut out);
        assert!(out.is_empty());
        w.expire(130, &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        w.expire(10_000, &mut out);
        assert_eq!(out, vec![1]);
        assert_eq!(w.next_due(), None);
    }
}
