//! The embedded default sink: JSON lines (`{stream, seq, prev_hash, hash, slot, envelope}`) in
//! `out-<20-digit index>.jsonl` files, rotated at `file_bytes_max`, each batch written whole and
//! fdatasync'd before the sink reports success. On start it continues after the newest file.
//! A failed write is retryable; a batch that was half written before a crash is written again
//! whole, so a reader may see a record twice, always identically (verify accepts that).

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use super::sink::{DeliverFuture, Sink, SinkError};
use crate::chain::SharedRecord;

struct Current {
    index: u64,
    file: std::fs::File,
    bytes: u64,
}

pub struct FileSink {
    name: String,
    dir: PathBuf,
    file_bytes_max: u64,
    current: Mutex<Option<Current>>,
}

fn file_name(index: u64) -> String {
    format!("out-{index:020}.jsonl")
}

impl FileSink {
    pub fn open(name: &str, dir: &Path, file_bytes_max: u64) -> std::io::Result<FileSink> {
        std::fs::create_dir_all(dir)?;
        Ok(FileSink {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            file_bytes_max: file_bytes_max.max(1),
            current: Mutex::new(None),
        })
    }

    fn newest_index(&self) -> std::io::Result<u64> {
        let mut newest = 0;
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("out-"))
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                newest = newest.max(n);
            }
        }
        Ok(newest)
    }

    fn open_index(&self, index: u64) -> std::io::Result<Current> {
        let path = self.dir.join(file_name(index));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let bytes = file.metadata()?.len();
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(Current { index, file, bytes })
    }

    fn write_batch(
        &self,
        current: &mut Option<Current>,
        batch: &[SharedRecord],
    ) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(batch.len() * 512);
        for r in batch {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        if current.is_none() {
            let index = self.newest_index()?.max(1);
            *current = Some(self.open_index(index)?);
        }
        let needs_rotation = current
            .as_ref()
            .is_some_and(|c| c.bytes > 0 && c.bytes + buf.len() as u64 > self.file_bytes_max);
        if needs_rotation {
            let next = current.as_ref().map_or(1, |c| c.index + 1);
            *current = Some(self.open_index(next)?);
        }
        let c = current.as_mut().expect("opened above");
        c.file.write_all(&buf)?;
        c.file.sync_data()?;
        c.bytes += buf.len() as u64;
        Ok(())
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a> {
        Box::pin(async move {
            let mut current = self.current.lock().await;
            // The write and fdatasync block; this sink is the embedded default and its batches
            // are bounded, so block_in_place keeps it simple without a copy of the batch.
            let result = tokio::task::block_in_place(|| self.write_batch(&mut current, batch));
            result.map_err(|e| {
                // Start a fresh file handle next time: the old one may be in an unknown state.
                *current = None;
                SinkError::Retryable {
                    reason: format!("file sink {}: {e}", self.dir.display()),
                    retry_after: None,
                }
            })
        })
    }
}
