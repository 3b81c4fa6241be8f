//! Backpressure: watermarks on the spool's size and on the data filesystem's free space.
//!
//! | condition                                                      | high | normal | low | reason     |
//! |----------------------------------------------------------------|------|--------|-----|------------|
//! | spool bytes ≥ `spool.quota_hard_bytes`                         | 429  | 429    | 429 | `quota`    |
//! | free bytes < `spool.disk_free_hard_bytes`                      | 429  | 429    | 429 | `disk`     |
//! | spool bytes ≥ `spool.quota_soft_bytes`                         | ok   | ok     | 429 | `priority` |
//! | free bytes < `spool.disk_free_soft_bytes`                      | ok   | ok     | 429 | `priority` |
//! | a real ENOSPC from the filesystem                              | 429  | 429    | 429 | `enospc`   |
//! | reserve spent, free < `disk_free_hard_bytes` + `reserve_bytes` | 429  | 429    | 429 | `reserve`  |
//!
//! `Retry-After` is the time the measured drain rate (bytes reclaimed by compaction per
//! second, smoothed) needs to bring the tripped quantity back under its mark, clamped to
//! 1..=60 s; with no drain measured yet it is 10 s, and once the drain has stalled (the rate
//! has decayed below a byte a second) it is 60 s. The rate is an exponentially weighted
//! average over time, not over samples: each sample weighs by the time it covers
//! ([`DRAIN_RATE_TAU`]), so a segment freed in a sample of a few microseconds (the sampler
//! catching up after a stall) counts as what it is, a segment in the last few seconds, not as
//! terabytes per second. The sampler refreshes the inputs every 100 ms, so the hot path only
//! reads atomics.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::SpoolConfig;
use crate::envelope::Priority;

pub const RETRY_AFTER_MIN_SECS: u64 = 1;
pub const RETRY_AFTER_MAX_SECS: u64 = 60;
pub const RETRY_AFTER_UNKNOWN_SECS: u64 = 10;
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Time constant of the drain rate's average: bytes reclaimed this long ago weigh 1/e of
/// bytes reclaimed now.
pub const DRAIN_RATE_TAU: Duration = Duration::from_secs(5);

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    /// The config key of the mark that tripped.
    pub limit: &'static str,
    pub limit_bytes: u64,
    pub current_bytes: u64,
    pub retry_after_secs: u64,
}

pub struct Backpressure {
    quota_soft_bytes: u64,
    quota_hard_bytes: u64,
    disk_free_soft_bytes: u64,
    disk_free_hard_bytes: u64,
    spool_bytes: AtomicU64,
    free_bytes: AtomicU64,
    /// f64 bits: smoothed bytes per second reclaimed.
    drain_rate: AtomicU64,
    /// Set once anything was reclaimed: from then on a rate near 0 means a stalled drain, not
    /// an unknown one.
    drain_measured: std::sync::atomic::AtomicBool,
}

impl Backpressure {
    pub fn new(cfg: &SpoolConfig) -> Backpressure {
        Backpressure {
            quota_soft_bytes: cfg.quota_soft_bytes,
            quota_hard_bytes: cfg.quota_hard_bytes,
            disk_free_soft_bytes: cfg.disk_free_soft_bytes,
            disk_free_hard_bytes: cfg.disk_free_hard_bytes,
            spool_bytes: AtomicU64::new(0),
            free_bytes: AtomicU64::new(u64::MAX),
            drain_rate: AtomicU64::new(0f64.to_bits()),
            drain_measured: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Feeds a new sample. `reclaimed_bytes` were freed since the previous sample, `elapsed` ago.
    pub fn sample(
        &self,
        spool_bytes: u64,
        free_bytes: u64,
        reclaimed_bytes: u64,
        elapsed: Duration,
    ) {
        self.spool_bytes.store(spool_bytes, Ordering::Relaxed);
        self.free_bytes.store(free_bytes, Ordering::Relaxed);
        if reclaimed_bytes > 0 {
            self.drain_measured.store(true, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        if secs > 0.0 {
            // The weight of this sample is the share of the time constant it covers, so its
            // contribution is about reclaimed / tau however short it was.
            let weight = 1.0 - (-secs / DRAIN_RATE_TAU.as_secs_f64()).exp();
            let instant = reclaimed_bytes as f64 / secs;
            let old = f64::from_bits(self.drain_rate.load(Ordering::Relaxed));
            let new = old + weight * (instant - old);
            self.drain_rate.store(new.to_bits(), Ordering::Relaxed);
        }
    }

    pub fn drain_rate_bytes_per_sec(&self) -> f64 {
        f64::from_bits(self.drain_rate.load(Ordering::Relaxed))
    }

    pub fn retry_after_secs(&self, excess_bytes: u64) -> u64 {
        let rate = self.drain_rate_bytes_per_sec();
        if rate < 1.0 {
            return if self.drain_measured.load(Ordering::Relaxed) {
                RETRY_AFTER_MAX_SECS
            } else {
                RETRY_AFTER_UNKNOWN_SECS
            };
        }
        ((excess_bytes as f64 / rate).ceil() as u64)
            .clamp(RETRY_AFTER_MIN_SECS, RETRY_AFTER_MAX_SECS)
    }

    fn refuse(
        &self,
        reason: &'static str,
        limit: &'static str,
        limit_bytes: u64,
        current_bytes: u64,
    ) -> Refusal {
        let excess = current_bytes.abs_diff(limit_bytes).max(1);
        Refusal {
            reason,
            limit,
            limit_bytes,
            current_bytes,
            retry_after_secs: self.retry_after_secs(excess),
        }
    }

    /// Admits or refuses a request of the given priority.
    pub fn check(&self, priority: Priority) -> Result<(), Refusal> {
        let spool = self.spool_bytes.load(Ordering::Relaxed);
        let free = self.free_bytes.load(Ordering::Relaxed);
        if spool >= self.quota_hard_bytes {
            return Err(self.refuse(
                "quota",
                "spool.quota_hard_bytes",
                self.quota_hard_bytes,
                spool,
            ));
        }
        if free < self.disk_free_hard_bytes {
            return Err(self.refuse(
                "disk",
                "spool.disk_free_hard_bytes",
                self.disk_free_hard_bytes,
                free,
            ));
        }
        if priority == Priority::Low {
            if spool >= self.quota_soft_bytes {
                return Err(self.refuse(
                    "priority",
                    "spool.quota_soft_bytes",
                    self.quota_soft_bytes,
                    spool,
                ));
            }
            if free < self.disk_free_soft_bytes {
                return Err(self.refuse(
                    "priority",
                    "spool.disk_free_soft_bytes",
                    self.disk_free_soft_bytes,
                    free,
                ));
            }
        }
        Ok(())
    }

    /// Below the hard marks (what `/readyz` reports).
    pub fn below_hard_marks(&self) -> bool {
        self.check(Priority::High).is_ok()
    }

    /// Free bytes on the data filesystem at the last sample.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// The refusal while the disk reserve is spent and less than `floor_bytes`
    /// (`spool.disk_free_hard_bytes + spool.reserve_bytes`) is free (`compaction::reserve`):
    /// that space is for forwarding and compaction, which free more. `limit_bytes` is the
    /// free space ingest waits for.
    pub fn reserve_spent(&self, floor_bytes: u64) -> Refusal {
        let free = self.free_bytes();
        Refusal {
            reason: "reserve",
            limit: "spool.reserve_bytes",
            limit_bytes: floor_bytes,
            current_bytes: free,
            retry_after_secs: self.retry_after_secs(floor_bytes.saturating_sub(free).max(1)),
        }
    }

    /// The refusal for a real ENOSPC from the filesystem.
    pub fn enospc(&self) -> Refusal {
        let free = self.free_bytes.load(Ordering::Relaxed);
        Refusal {
            reason: "enospc",
            limit: "filesystem",
            limit_bytes: 0,
            current_bytes: free,
            retry_after_secs: self.retry_after_secs(self.disk_free_hard_bytes.max(1)),
        }
    }
}

/// Free bytes available to unprivileged writers on the filesystem holding `path`.
pub fn filesystem_free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp() -> Backpressure {
        let cfg = SpoolConfig {
            quota_soft_bytes: 100,
            quota_hard_bytes: 200,
            disk_free_soft_bytes: 50,
            disk_free_hard_bytes: 10,
            ..SpoolConfig::default()
        };
        Backpressure::new(&cfg)
    }

    #[test]
    fn below_every_mark_everything_is_admitted() {
        let b = bp();
        b.sample(0, 1000, 0, Duration::from_millis(100));
        assert!(b.check(Priority::Low).is_ok());
    }

    #[test]
    fn above_the_soft_quota_only_low_priority_is_refused() {
        let b = bp();
        b.sample(150, 1000, 0, Duration::from_millis(100));
        assert_eq!(b.check(Priority::Low).unwrap_err().reason, "priority");
        assert!(b.check(Priority::Normal).is_ok());
        assert!(b.check(Priority::High).is_ok());
    }

    #[test]
    fn above_the_hard_quota_everything_is_refused() {
        let b = bp();
        b.sample(200, 1000, 0, Duration::from_millis(100));
        let r = b.check(Priority::High).unwrap_err();
        assert_eq!((r.reason, r.limit), ("quota", "spool.quota_hard_bytes"));
    }

    #[test]
    fn low_free_space_trips_the_disk_marks() {
        let b = bp();
        b.sample(0, 40, 0, Duration::from_millis(100));
        assert_eq!(b.check(Priority::Low).unwrap_err().reason, "priority");
        b.sample(0, 9, 0, Duration::from_millis(100));
        assert_eq!(b.check(Priority::Normal).unwrap_err().reason, "disk");
    }

    #[test]
    fn retry_after_follows_the_drain_rate() {
        let b = bp();
        assert_eq!(b.retry_after_secs(1000), RETRY_AFTER_UNKNOWN_SECS);
        // A steady 1,000 bytes a second for a minute.
        for _ in 0..600 {
            b.sample(0, 1000, 100, Duration::from_millis(100));
        }
        assert_eq!(b.retry_after_secs(4990), 5);
        assert_eq!(b.retry_after_secs(1_000_000), RETRY_AFTER_MAX_SECS);
        assert_eq!(b.retry_after_secs(1), RETRY_AFTER_MIN_SECS);
    }

    #[test]
    fn a_segment_freed_in_a_microsecond_sample_is_a_segment_not_terabytes_a_second() {
        let b = bp();
        for _ in 0..50 {
            b.sample(0, 1000, 100_000, Duration::from_millis(100));
        }
        // The sampler catching up after a stall: 64 MiB in a 10 µs sample.
        b.sample(0, 1000, 64 << 20, Duration::from_micros(10));
        // About 1 MB/s plus 64 MiB over the 5 s time constant: a GiB takes over a minute.
        assert_eq!(b.retry_after_secs(1 << 30), RETRY_AFTER_MAX_SECS);
    }

    #[test]
    fn a_drain_that_stalled_gets_the_longest_retry_after_not_the_unknown_one() {
        let b = bp();
        b.sample(0, 1000, 1000, Duration::from_secs(1));
        for _ in 0..600 {
            b.sample(0, 1000, 0, Duration::from_millis(100));
        }
        assert!(b.drain_rate_bytes_per_sec() < 1.0);
        assert_eq!(b.retry_after_secs(1 << 30), RETRY_AFTER_MAX_SECS);
    }

    #[test]
    fn free_bytes_of_a_real_filesystem_are_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(filesystem_free_bytes(dir.path()).unwrap() > 0);
    }
}
