//! Dead letters read back, for the operator: listing what the dead-letter directory holds and
//! re-sending a batch a sink rejected once what it refused is fixed (`spoolgate dead-letter`).
//!
//! A letter of a rejected batch holds the batch's forward records exactly as the worker sealed
//! them, so a re-send gives the sink the same records, with the same sequence numbers and
//! hashes, that it refused: the records fill the gap their rejection left in each stream, and a
//! sink that took them once after all (a 4xx answered after a partial write, say) gets
//! identical duplicates. The re-send goes through the sink's own encoder, so the body is byte
//! for byte what the daemon would have sent. Letters of envelopes that never reached a sink
//! (undecodable, unsealable, unclassifiable: no sink, no records) cannot be re-sent; they are
//! listed with their position and reason for the operator to act on.
//!
//! Nothing here runs in the daemon. A re-send takes one attempt per letter and reports its
//! outcome; it removes a letter only when asked to and only after the sink answered 2xx.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::chain::{ForwardRecord, SharedRecord};
use crate::forward::sink::{Sink, SinkError};
use crate::spool::Position;

/// A letter larger than this is refused rather than read: the daemon writes at most one batch
/// per letter (`forward.batch_bytes_max`, 64 MiB at most, about twice that as JSON).
pub const LETTER_BYTES_MAX: u64 = 512 << 20;

/// One dead-letter file as written by [`super::dead_letter::DeadLetter`].
#[derive(Debug, Deserialize)]
pub struct Letter {
    /// The sink that rejected the batch; `None` for an envelope that never reached a sink.
    pub sink: Option<String>,
    /// The sink's HTTP status; absent for an envelope that never reached a sink.
    #[serde(default)]
    pub status: Option<u16>,
    pub reason: String,
    pub at_ms: u64,
    /// The rejected batch, as sealed; empty for an envelope that never reached a sink.
    #[serde(default)]
    pub records: Vec<ForwardRecord>,
    /// Where the envelope that never reached a sink lies in the spool.
    #[serde(default)]
    pub position: Option<Position>,
}

impl Letter {
    /// Whether the letter holds a batch a sink rejected, which can be sent again.
    pub fn resendable(&self) -> bool {
        self.sink.is_some() && !self.records.is_empty()
    }

    /// Each stream of the batch with its lowest and highest sequence number, in stream order.
    pub fn stream_ranges(&self) -> Vec<(String, u64, u64)> {
        let mut ranges: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
        for r in &self.records {
            let e = ranges.entry(&r.stream).or_insert((r.seq, r.seq));
            e.0 = e.0.min(r.seq);
            e.1 = e.1.max(r.seq);
        }
        ranges
            .into_iter()
            .map(|(s, (lo, hi))| (s.to_string(), lo, hi))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LetterError {
    // The cause is in the message rather than a `source`, so that a chain printed whole
    // (anyhow's `{:#}`) does not say it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {len} bytes, over the {max} a dead letter can hold")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("{path}: not a dead letter: {error}")]
    Malformed {
        path: PathBuf,
        error: serde_json::Error,
    },
}

/// Reads one letter.
pub fn read_letter(path: &Path) -> Result<Letter, LetterError> {
    let io = |error| LetterError::Io {
        path: path.to_path_buf(),
        error,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > LETTER_BYTES_MAX {
        return Err(LetterError::TooLarge {
            path: path.to_path_buf(),
            len,
            max: LETTER_BYTES_MAX,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    serde_json::from_slice(&bytes).map_err(|error| LetterError::Malformed {
        path: path.to_path_buf(),
        error,
    })
}

/// The letters in `dir`, oldest first (by the time, process and counter their names hold);
/// unfinished temporary files and anything else in the directory are left out.
pub fn letters_in(dir: &Path) -> Result<Vec<PathBuf>, LetterError> {
    let io = |error| LetterError::Io {
        path: dir.to_path_buf(),
        error,
    };
    let mut found: Vec<((u64, u64, u64), PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(key) = name.to_str().and_then(letter_order) else {
            continue;
        };
        found.push((key, entry.path()));
    }
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// `dl-<ms>-<pid>-<n>.json` as `(ms, pid, n)`, the order letters were written in.
fn letter_order(name: &str) -> Option<(u64, u64, u64)> {
    let mut parts = name.strip_prefix("dl-")?.strip_suffix(".json")?.split('-');
    let mut next = || parts.next()?.parse::<u64>().ok();
    let key = (next()?, next()?, next()?);
    parts.next().is_none().then_some(key)
}

/// Sends a letter's records to `sink` in one batch, as the worker did. One attempt: the
/// caller reports a refusal, and the letter stays for the next try.
pub async fn resend(letter: &Letter, sink: &dyn Sink) -> Result<usize, SinkError> {
    let batch: Vec<SharedRecord> = letter
        .records
        .iter()
        .cloned()
        .map(std::sync::Arc::new)
        .collect();
    sink.deliver(&batch).await?;
    Ok(batch.len())
}

/// Removes a letter after its batch was re-sent, and makes the removal durable, so that a
/// crash right after cannot bring back a letter whose records the sink already has (which a
/// second re-send would only duplicate, identically).
pub fn remove_letter(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    // A bare file name has the empty path as its parent: the current directory.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::forward::dead_letter::DeadLetter;

    fn record(stream: &str, seq: u64) -> SharedRecord {
        Arc::new(ForwardRecord {
            stream: stream.into(),
            seq,
            prev_hash: "0".repeat(64),
            hash: format!("{seq:064x}"),
            slot: 7,
            envelope: crate::envelope::Envelope {
                id: format!("{stream}-{seq}"),
                source: stream.into(),
                text: Some("hello".into()),
                ..Default::default()
            },
        })
    }

    #[test]
    fn a_letter_reads_back_as_the_records_and_reason_it_was_written_with() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path(), 1 << 20);
        let batch = vec![record("a", 3), record("b", 1), record("a", 4)];
        let path = dl.write("default", 400, "no such field", &batch).unwrap();
        let letter = read_letter(&path).unwrap();
        assert_eq!(letter.sink.as_deref(), Some("default"));
        assert_eq!(letter.status, Some(400));
        assert_eq!(letter.reason, "no such field");
        let records: Vec<ForwardRecord> = batch.iter().map(|r| (**r).clone()).collect();
        assert_eq!(letter.records, records);
        assert!(letter.resendable());
        assert_eq!(
            letter.stream_ranges(),
            vec![("a".to_string(), 3, 4), ("b".to_string(), 1, 1)]
        );
    }

    #[test]
    fn a_letter_of_an_envelope_that_never_reached_a_sink_is_listed_but_not_resendable() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path(), 1 << 20);
        let at = Position {
            segment: 2,
            offset: 64,
        };
        let path = dl.write_raw(at, "does not decode", b"\x01\x02").unwrap();
        let letter = read_letter(&path).unwrap();
        assert_eq!(letter.sink, None);
        assert_eq!(letter.position, Some(at));
        assert!(!letter.resendable());
    }

    #[test]
    fn letters_are_listed_in_the_order_they_were_written_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "dl-1700000000000-12-10.json",
            "dl-1700000000000-12-9.json",
            "dl-1699999999999-99-0.json",
            ".dl-1700000000001-12-11.json.tmp",
            "notes.txt",
            "dl-x-1-2.json",
        ] {
            std::fs::write(dir.path().join(name), "{}").unwrap();
        }
        let names: Vec<String> = letters_in(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "dl-1699999999999-99-0.json",
                "dl-1700000000000-12-9.json",
                "dl-1700000000000-12-10.json"
            ]
        );
    }

    #[test]
    fn a_file_that_is_not_a_letter_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dl-1-1-1.json");
        std::fs::write(&path, "{\"sink\": 3}").unwrap();
        let err = read_letter(&path).unwrap_err().to_string();
        assert!(err.contains("dl-1-1-1.json: not a dead letter"), "{err}");
    }
}
