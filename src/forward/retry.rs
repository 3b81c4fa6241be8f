//! Retry delays: exponential backoff with jitter (a uniformly random delay between half the
//! initial delay and the current cap, which doubles from `initial` to `max`), never shorter
//! than a server's `Retry-After`. Jitter spreads retries from many workers instead of
//! synchronising them; a `Retry-After` gets up to a tenth of itself on top, for the same reason.
//!
//! A `Retry-After` is honoured up to [`RETRY_AFTER_MAX`] (or `max`, if that is longer): a sink
//! or a proxy answering `Retry-After: 86400` must not park a worker, and every slot it owns,
//! for a day.

use std::time::Duration;

/// The longest `Retry-After` honoured when the configured `max` is shorter.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

pub struct Backoff {
    initial: Duration,
    max: Duration,
    cap: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            initial,
            max,
            cap: initial,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let cap_ms = self.cap.as_millis().max(1) as u64;
        let jittered =
            Duration::from_millis(self.rng.u64(self.initial.as_millis() as u64 / 2..=cap_ms));
        self.cap = (self.cap * 2).min(self.max);
        match retry_after {
            Some(ra) => {
                let ra = ra.min(self.max.max(RETRY_AFTER_MAX));
                let spread_ms = self.rng.u64(0..=ra.as_millis() as u64 / 10);
                jittered.max(ra + Duration::from_millis(spread_ms))
            }
            None => jittered,
        }
    }

    pub fn reset(&mut self) {
        self.cap = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_a_doubling_cap_up_to_the_maximum() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000), 7);
        let mut cap = 100;
        for _ in 0..10 {
            let d = b.next_delay(None).as_millis() as u64;
            assert!((50..=cap).contains(&d), "{d} not in 50..={cap}");
            cap = (cap * 2).min(1000);
        }
    }

    #[test]
    fn retry_after_is_a_floor_with_at_most_a_tenth_on_top() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100), 1);
        for _ in 0..20 {
            let d = b.next_delay(Some(Duration::from_secs(3)));
            assert!(
                (Duration::from_secs(3)..=Duration::from_millis(3300)).contains(&d),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_retry_after_of_a_day_is_cut_to_the_bound() {
        let day = Duration::from_secs(86_400);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30), 1);
        let d = b.next_delay(Some(day));
        assert!(
            (RETRY_AFTER_MAX..=RETRY_AFTER_MAX * 11 / 10).contains(&d),
            "{d:?}"
        );
        // A configured maximum above the bound is the bound instead.
        let hour = Duration::from_secs(3600);
        let mut b = Backoff::new(Duration::from_millis(100), hour, 1);
        let d = b.next_delay(Some(day));
        assert!((hour..=hour * 11 / 10).contains(&d), "{d:?}");
        // u64::MAX seconds (what a bare parse accepts) neither overflows nor waits for ever.
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30), 1);
        assert!(b.next_delay(Some(Duration::from_secs(u64::MAX))) <= RETRY_AFTER_MAX * 11 / 10);
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let mut a = Backoff::new(Duration::from_millis(10), Duration::from_secs(1), 42);
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1), 42);
        for _ in 0..5 {
            assert_eq!(a.next_delay(None), b.next_delay(None));
        }
    }
}
