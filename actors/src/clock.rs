//! The one place the actors read time. The `core::pd` state machines take the time as an
//! argument (`now_us`); their drivers get it here, from one epoch per process, so every core of a
//! process sees the same timeline and nothing else in the actors calls `Instant::now`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Microseconds since the process's epoch, for the cores; instants for deadlines and latency.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// The process's clock; its epoch is now.
    pub fn start() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    /// The time as the cores count it.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Now, for deadlines and latency measurements outside the cores.
    pub fn instant() -> Instant {
        Instant::now()
    }

    /// Time since `t` (an [`Clock::instant`]).
    pub fn since(t: Instant) -> Duration {
        t.elapsed()
    }

    /// `d` from now.
    pub fn deadline(d: Duration) -> Instant {
        Instant::now() + d
    }

    /// Seconds since the Unix epoch (the OpenAI API's `created` fields, hello timestamps).
    pub fn unix_secs() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}
