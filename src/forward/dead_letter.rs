//! The dead-letter directory: batches a sink rejected for good, one JSON file each, with the
//! sink, the status, the reason and the records, written with fdatasync before the batch is
//! tombstoned. Files are never deleted by spoolgate; an operator inspects and replays or
//! removes them. Bound: each file holds one batch (at most `forward.batch_records_max`
//! records); spoolgate logs every file it writes, so growth is visible, and the directory lives
//! on the data filesystem, whose free space the disk watermarks watch.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::chain::SharedRecord;
use crate::spool::Position;

#[derive(Clone)]
pub struct DeadLetter {
    dir: PathBuf,
    counter: Arc<AtomicU64>,
}

impl DeadLetter {
    pub fn new(dir: &Path) -> DeadLetter {
        DeadLetter {
            dir: dir.to_path_buf(),
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_json(&self, body: &serde_json::Value) -> std::io::Result<PathBuf> {
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
        f.write_all(serde_json::to_string_pretty(body)?.as_bytes())?;
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
    ) -> std::io::Result<PathBuf> {
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
    ) -> std::io::Result<PathBuf> {
        self.write_json(&serde_json::json!({
            "sink": null,
            "reason": reason,
            "position": position,
            "at_ms": crate::ingest::now_ms(),
            "payload_hex": hex::encode(payload),
        }))
    }
}
