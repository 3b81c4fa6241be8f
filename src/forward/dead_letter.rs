//! The dead-letter directory: batches a sink rejected for good, one JSON file each, with the
//! sink, the status, the reason and the records, written with fdatasync before the batch is
//! tombstoned. Files are never deleted by spoolgate; an operator inspects and replays or
//! removes them, and spoolgate logs every file it writes, so growth is visible.
//!
//! Bound: once the directory holds `forward.dead_letter_bytes_max` bytes or more, a write is
//! refused with [`DeadLetterError::Full`] and nothing is written, so the directory holds at
//! most that bound plus one file (one batch, at most `forward.batch_records_max` records).
//! Checking before the write rather than for the write's size means no batch is too large to
//! ever fit once files are removed. The worker keeps a refused batch pending and retries it with back-off, so a sink that rejects everything holds back only its
//! own slots' records in the spool (whose quota then answers 429) instead of moving them into a
//! directory that grows until the disk is full. Deleting files makes room again: a refused
//! write measures the directory afresh before it gives up, so the next retry sees the space.
//!
//! Why measure rather than count alone: the operator removes files behind spoolgate's back, and
//! files from earlier runs are there at start. A running total is kept between writes and
//! re-measured (one `read_dir`, rare: only when the total says the directory is full, and
//! after a failed write) so the common write costs no directory scan.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;

use crate::chain::SharedRecord;
use crate::spool::Position;

/// Why a batch was not dead-lettered.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(
        "dead-letter directory full: it holds {used_bytes} bytes, at or past \
         forward.dead_letter_bytes_max = {bytes_max}"
    )]
    Full { used_bytes: u64, bytes_max: u64 },
    #[error("dead-letter write failed: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct DeadLetter {
    dir: PathBuf,
    bytes_max: u64,
    counter: Arc<AtomicU64>,
    /// Bytes in the directory as of the last measurement plus what was written since; `None`
    /// until the first write measures it, and again after a failed write (which may have left a
    /// partial file). Held locked across a write so two workers cannot both take the last room.
    used_bytes: Arc<Mutex<Option<u64>>>,
    /// `spoolgate_dead_letter_bytes`, set whenever `used_bytes` is.
    gauge: Option<IntGauge>,
}

/// Bytes of the regular files directly in `dir`; 0 when it does not exist yet.
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut total = 0u64;
    for entry in entries {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total = total.saturating_add(meta.len());
        }
    }
    Ok(total)
}

impl DeadLetter {
    pub fn new(dir: &Path, bytes_max: u64) -> DeadLetter {
        DeadLetter {
            dir: dir.to_path_buf(),
            bytes_max,
            counter: Arc::new(AtomicU64::new(0)),
            used_bytes: Arc::new(Mutex::new(None)),
            gauge: None,
        }
    }

    /// Reports the directory's size through `gauge`, measured now and kept current.
    pub fn with_gauge(mut self, gauge: IntGauge) -> DeadLetter {
        if let Ok(bytes) = dir_bytes(&self.dir) {
            gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        self.gauge = Some(gauge);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn set_used(&self, used: &mut Option<u64>, bytes: u64) {
        *used = Some(bytes);
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    fn write_json(&self, body: &serde_json::Value) -> Result<PathBuf, DeadLetterError> {
        let text = serde_json::to_string_pretty(body).map_err(std::io::Error::from)?;
        let mut used = self
            .used_bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = match *used {
            Some(u) if u < self.bytes_max => u,
            _ => {
                let measured = dir_bytes(&self.dir)?;
                self.set_used(&mut used, measured);
                measured
            }
        };
        if current >= self.bytes_max {
            return Err(DeadLetterError::Full {
                used_bytes: current,
                bytes_max: self.bytes_max,
            });
        }
        match self.create(&text) {
            Ok(path) => {
                self.set_used(&mut used, current + text.len() as u64);
                Ok(path)
            }
            Err(e) => {
                *used = None;
                Err(e.into())
            }
        }
    }

    fn create(&self, text: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!(
            "dl-{}-{}-{n}.json",
            crate::ingest::now_ms(),
            std::process::id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    /// Keeps a batch a sink rejected.
    pub fn write(
        &self,
        sink: &str,
        status: u16,
        reason: &str,
        records: &[SharedRecord],
    ) -> Result<PathBuf, DeadLetterError> {
        self.write_json(&serde_json::json!({
            "sink": sink,
            "status": status,
            "reason": reason,
            "at_ms": crate::ingest::now_ms(),
            "records": records,
        }))
    }

    /// Keeps an envelope record that could not be decoded, as hex.
    pub fn write_raw(
        &self,
        position: Position,
        reason: &str,
        payload: &[u8],
    ) -> Result<PathBuf, DeadLetterError> {
        self.write_json(&serde_json::json!({
            "sink": null,
            "reason": reason,
            "position": position,
            "at_ms": crate::ingest::now_ms(),
            "payload_hex": hex::encode(payload),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(offset: u64) -> Position {
        Position { segment: 1, offset }
    }

    #[test]
    fn once_the_bound_is_reached_a_write_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dl_dir = dir.path().join("dl");
        let dl = DeadLetter::new(&dl_dir, 400);
        // The first file takes the directory past the bound (it was empty when the write was
        // checked); the next write is refused.
        let first = dl.write_raw(position(0), "bad", &[0u8; 200]).unwrap();
        let first_bytes = std::fs::metadata(&first).unwrap().len();
        assert!(first_bytes > 400, "{first_bytes}");
        match dl.write_raw(position(1), "bad", &[0u8; 200]) {
            Err(DeadLetterError::Full {
                used_bytes,
                bytes_max,
            }) => {
                assert_eq!(used_bytes, first_bytes);
                assert_eq!(bytes_max, 400);
            }
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(std::fs::read_dir(&dl_dir).unwrap().count(), 1);
    }

    #[test]
    fn files_already_in_the_directory_count_against_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("earlier.json"), vec![b'x'; 1_000]).unwrap();
        let gauge = IntGauge::new("dl_bytes", "test").unwrap();
        let dl = DeadLetter::new(dir.path(), 1_000).with_gauge(gauge.clone());
        assert_eq!(gauge.get(), 1_000);
        let err = dl.write_raw(position(0), "bad", &[0u8; 8]).unwrap_err();
        assert!(
            err.to_string()
                .contains("holds 1000 bytes, at or past forward.dead_letter_bytes_max = 1000"),
            "{err}"
        );
        // Just below the bound, a write of any size is taken.
        std::fs::write(dir.path().join("earlier.json"), vec![b'x'; 999]).unwrap();
        dl.write_raw(position(0), "bad", &[0u8; 8]).unwrap();
    }

    #[test]
    fn removing_files_makes_room_for_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let gauge = IntGauge::new("dl_bytes", "test").unwrap();
        let dl = DeadLetter::new(dir.path(), 400).with_gauge(gauge.clone());
        let first = dl.write_raw(position(0), "bad", &[0u8; 200]).unwrap();
        assert_eq!(gauge.get() as u64, std::fs::metadata(&first).unwrap().len());
        assert!(dl.write_raw(position(1), "bad", &[0u8; 200]).is_err());
        std::fs::remove_file(&first).unwrap();
        let second = dl.write_raw(position(1), "bad", &[0u8; 200]).unwrap();
        assert_eq!(
            gauge.get() as u64,
            std::fs::metadata(&second).unwrap().len()
        );
    }
}
