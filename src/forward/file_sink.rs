//! The embedded default sink: JSON lines (`{stream, seq, prev_hash, hash, slot, envelope}`) in
//! `out-<20-digit index>.jsonl` files, rotated at `file_bytes_max`, each batch written whole and
//! fdatasync'd before the sink reports success. On start it continues after the newest file.
//! A failed write is retryable; a batch that was half written before a crash is written again
//! whole, so a reader may see a record twice, always identically (verify accepts that).
//!
//! A crash (or a failed write) can leave a partial last line. Nothing in it was confirmed, so
//! before appending to a file the sink cuts it back to its last newline; otherwise the next
//! batch would be glued to the fragment and the file would hold a line no reader can parse.

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
        if path.exists() {
            let trimmed = trim_partial_line(&path)?;
            if trimmed > 0 {
                tracing::warn!(
                    file = %path.display(),
                    bytes = trimmed,
                    "file sink: cut a partial last line (an unconfirmed write before a crash or failure)"
                );
            }
        }
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

/// Cuts `path` back to just after its last newline (or to empty); returns the bytes removed.
fn trim_partial_line(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK_BYTES: u64 = 64 * 1024;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    // Scan backwards chunk by chunk: lines are bounded by the record size, not the file size.
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(CHUNK_BYTES);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if keep < len {
        file.set_len(keep)?;
        file.sync_data()?;
    }
    Ok(len - keep)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_last_line_is_cut_back_to_the_last_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        assert_eq!(trim_partial_line(&path).unwrap(), 5);
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(trim_partial_line(&path).unwrap(), 0);
        std::fs::write(&path, b"no newline at all").unwrap();
        assert_eq!(trim_partial_line(&path).unwrap(), 17);
        assert!(std::fs::read(&path).unwrap().is_empty());
    }

    #[test]
    fn a_batch_after_a_torn_line_starts_on_its_own_line() {
        let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file_name(1)), b"{\"torn\":").unwrap();
        let sink = FileSink::open("default", dir.path(), 1 << 20).unwrap();
        let record = crate::chain::Chains::new()
            .seal(crate::envelope::Envelope {
                version: 1,
                id: "x".into(),
                source: "s".into(),
                slot: crate::slots::slot_of("s"),
                ..Default::default()
            })
            .unwrap();
        rt.block_on(sink.deliver(&[SharedRecord::new(record)]))
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join(file_name(1))).unwrap();
        let summary = crate::chain::verify_jsonl(text.as_bytes()).unwrap();
        assert_eq!(summary.records, 1);
    }
}
