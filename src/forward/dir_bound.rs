//! A byte bound on a directory that spoolgate writes into but does not empty: the file sink's
//! output and the dead letters, which someone else takes away.
//!
//! Rule: a write is refused once the directory already holds the bound, and allowed below it
//! whatever its size, so the directory holds at most the bound plus one write, and no write is
//! too large to ever be allowed once files are removed.
//!
//! Why measure rather than count alone: files are removed behind spoolgate's back, and files
//! from earlier runs are there at start. A running total is kept between writes and measured
//! again (one `read_dir`) only when it is unknown (before the first write, after a failed one,
//! which may have left a partial file) or says the bound is reached, so the common write costs
//! no directory scan and a refusal always looks at the directory as it is now.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prometheus::IntGauge;

#[derive(Debug, thiserror::Error)]
pub enum BoundError {
    #[error("it holds {used_bytes} bytes, at or past its bound of {bytes_max}")]
    Full { used_bytes: u64, bytes_max: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct DirBound {
    dir: PathBuf,
    bytes_max: u64,
    /// Which file names count against the bound.
    counts: fn(&OsStr) -> bool,
    /// Bytes of the counted files as last measured plus what was written since; `None` when
    /// unknown. Held locked across a write, so two writers cannot both take the last room.
    used_bytes: Mutex<Option<u64>>,
    /// Set whenever `used_bytes` is known.
    gauge: Option<IntGauge>,
}

impl DirBound {
    pub fn new(dir: &Path, bytes_max: u64, counts: fn(&OsStr) -> bool) -> DirBound {
        DirBound {
            dir: dir.to_path_buf(),
            bytes_max,
            counts,
            used_bytes: Mutex::new(None),
            gauge: None,
        }
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// Reports the directory's size through `gauge`, measured now and kept current.
    pub fn with_gauge(mut self, gauge: IntGauge) -> DirBound {
        if let Ok(bytes) = self.measure() {
            gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        self.gauge = Some(gauge);
        self
    }

    /// Bytes of the counted regular files directly in the directory; 0 when it does not exist.
    fn measure(&self) -> std::io::Result<u64> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut total = 0u64;
        for entry in entries {
            let entry = entry?;
            if !(self.counts)(&entry.file_name()) {
                continue;
            }
            // A file removed between the listing and this look (by whoever takes the files
            // away, which is when a full directory is measured) holds no bytes.
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
        Ok(total)
    }

    fn set_used(&self, used: &mut Option<u64>, bytes: u64) {
        *used = Some(bytes);
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// Runs `write`, which adds `bytes` to the directory, unless the directory already holds
    /// the bound; then nothing runs and the answer is [`BoundError::Full`].
    pub fn write<T>(
        &self,
        bytes: u64,
        write: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T, BoundError> {
        let mut used = self
            .used_bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = match *used {
            Some(u) if u < self.bytes_max => u,
            _ => {
                let measured = self.measure()?;
                self.set_used(&mut used, measured);
                measured
            }
        };
        if current >= self.bytes_max {
            return Err(BoundError::Full {
                used_bytes: current,
                bytes_max: self.bytes_max,
            });
        }
        match write() {
            Ok(out) => {
                self.set_used(&mut used, current.saturating_add(bytes));
                Ok(out)
            }
            Err(e) => {
                *used = None;
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_file(_: &OsStr) -> bool {
        true
    }

    fn add_file(dir: &Path, name: &str, bytes: usize) -> std::io::Result<()> {
        std::fs::write(dir.join(name), vec![b'x'; bytes])
    }

    #[test]
    fn below_the_bound_any_write_runs_and_at_it_none_does() {
        let dir = tempfile::tempdir().unwrap();
        let bound = DirBound::new(dir.path(), 1_000, every_file);
        bound.write(999, || add_file(dir.path(), "a", 999)).unwrap();
        // 999 < 1,000: a write of any size still runs, and takes the directory past the bound.
        bound.write(500, || add_file(dir.path(), "b", 500)).unwrap();
        match bound.write(1, || -> std::io::Result<()> { panic!("must not run") }) {
            Err(BoundError::Full {
                used_bytes,
                bytes_max,
            }) => assert_eq!((used_bytes, bytes_max), (1_499, 1_000)),
            other => panic!("expected Full, got {other:?}"),
        }
    }

    #[test]
    fn only_counted_files_count_and_removed_ones_are_seen_when_full() {
        let dir = tempfile::tempdir().unwrap();
        add_file(dir.path(), "other.txt", 5_000).unwrap();
        add_file(dir.path(), "out-1", 600).unwrap();
        let gauge = IntGauge::new("dir_bytes", "test").unwrap();
        let bound = DirBound::new(dir.path(), 1_000, |n| {
            n.to_str().is_some_and(|n| n.starts_with("out-"))
        })
        .with_gauge(gauge.clone());
        assert_eq!(gauge.get(), 600);
        bound
            .write(600, || add_file(dir.path(), "out-2", 600))
            .unwrap();
        assert_eq!(gauge.get(), 1_200);
        assert!(bound.write(1, || Ok(())).is_err());
        std::fs::remove_file(dir.path().join("out-1")).unwrap();
        bound.write(1, || Ok(())).unwrap();
        assert_eq!(gauge.get(), 601);
    }

    /// The directory whose files `removes_what_it_counts` deletes as it is asked about them.
    static REMOVING_IN: Mutex<Option<PathBuf>> = Mutex::new(None);

    fn removes_what_it_counts(name: &OsStr) -> bool {
        if let Some(dir) = REMOVING_IN.lock().unwrap().as_ref() {
            let _ = std::fs::remove_file(dir.join(name));
        }
        true
    }

    #[test]
    fn a_file_removed_while_the_directory_is_measured_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        add_file(dir.path(), "taken-away", 2_000).unwrap();
        *REMOVING_IN.lock().unwrap() = Some(dir.path().to_path_buf());
        let bound = DirBound::new(dir.path(), 1_000, removes_what_it_counts);
        let measured = bound.write(10, || Ok(()));
        *REMOVING_IN.lock().unwrap() = None;
        measured.unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_total_to_be_measured_again() {
        let dir = tempfile::tempdir().unwrap();
        let bound = DirBound::new(dir.path(), 1_000, every_file);
        let failed = bound.write(10, || {
            add_file(dir.path(), "partial", 700)?;
            Err::<(), _>(std::io::Error::other("disk said no"))
        });
        assert!(matches!(failed, Err(BoundError::Io(_))));
        // The partial file's 700 bytes are measured, not the 10 the write announced: below the
        // bound, so the next write runs, and after it the directory is past the bound.
        bound
            .write(400, || add_file(dir.path(), "next", 400))
            .unwrap();
        match bound.write(1, || Ok(())) {
            Err(BoundError::Full { used_bytes, .. }) => assert_eq!(used_bytes, 1_100),
            other => panic!("expected Full, got {other:?}"),
        }
    }
}
