//! The clock that times requests. Every request through the relay is timed, start and end, so
//! the clock is read twice per round trip: here that is a read of the CPU's time-stamp counter
//! (a few instructions), where `std::time::Instant::now` calls the system clock through the
//! vDSO and then converts a `timespec`. quanta calibrates the counter against the monotonic
//! clock once (up to 200 ms, paid by [`calibrate`] at start-up) and falls back to the
//! monotonic clock on CPUs whose counter is not invariant.

use std::sync::OnceLock;
use std::time::Duration;

static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();

fn clock() -> &'static quanta::Clock {
    CLOCK.get_or_init(quanta::Clock::new)
}

/// Calibrates the clock now, so no request waits for it.
pub fn calibrate() {
    let _ = clock();
}

/// A reading of the clock: only differences between two readings mean anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp(u64);

impl Stamp {
    #[inline]
    pub fn now() -> Stamp {
        Stamp(clock().raw())
    }

    /// The time from `earlier` to this reading (zero if `earlier` is not earlier).
    #[inline]
    pub fn since(self, earlier: Stamp) -> Duration {
        clock().delta(earlier.0, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_measure_the_time_between_them() {
        calibrate();
        let start = Stamp::now();
        std::thread::sleep(Duration::from_millis(20));
        let end = Stamp::now();
        let took = end.since(start);
        let wall = Duration::from_millis(20);
        assert!(took >= wall - Duration::from_millis(1), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        // Backwards is zero, never a wrapped-around huge duration.
        assert_eq!(start.since(end), Duration::ZERO);
    }
}
