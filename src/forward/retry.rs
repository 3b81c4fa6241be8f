//! Retry delays: exponential backoff with full jitter (a uniformly random delay up to the
//! current cap, which doubles from `initial` to `max`), never shorter than a server's
//! `Retry-After`. Full jitter spreads retries from many workers instead of synchronising them.

use std::time::Duration;

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
            Some(ra) => jittered.max(ra).min(self.max.max(ra)),
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
    fn retry_after_is_a_floor() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100), 1);
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
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
