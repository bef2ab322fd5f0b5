//! The server's clock: wall-clock milliseconds for persisted times, monotonic within a run.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ddpush_proto::Time;

/// Wall clock for persisted times, monotonic within a run.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
    epoch_ms: u64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            start: Instant::now(),
            epoch_ms,
        }
    }

    pub(crate) fn now(&self) -> Time {
        Time(self.epoch_ms + self.start.elapsed().as_millis() as u64)
    }

    pub(crate) fn instant(&self, t: Time) -> Instant {
        self.start + Duration::from_millis(t.0.saturating_sub(self.epoch_ms))
    }
}
