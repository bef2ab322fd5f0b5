//! Time as a value: the core never reads a clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds since an epoch the adapter chooses (the server uses the Unix epoch so that
/// persisted times mean something across restarts; tests and the simulator start at zero).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(pub u64);

impl Time {
    /// The epoch.
    pub const ZERO: Time = Time(0);

    /// From whole milliseconds.
    pub fn from_millis(ms: u64) -> Self {
        Time(ms)
    }

    /// From whole seconds.
    pub fn from_secs(s: u64) -> Self {
        Time(s.saturating_mul(1000))
    }

    /// Whole milliseconds since the epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds since the epoch, saturated to the u32 the client records use
    /// (enough until the year 2106 with the Unix epoch).
    pub fn secs32(self) -> u32 {
        u32::try_from(self.0 / 1000).unwrap_or(u32::MAX)
    }

    /// Time elapsed since `earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// Whole seconds of a duration as u32 (saturating), the unit of the client records.
pub(crate) fn secs32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

impl std::ops::Add<Duration> for Time {
    type Output = Time;
    /// Saturating: a deadline far in the future is "never", not a wrap to the past.
    fn add(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}
