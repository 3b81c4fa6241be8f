//! `spoolgate verify`: checks forward records as a sink received them (spool-format.md §8,
//! "Forwarded records"): every stream gapless from 1, every link recomputed, and a record
//! delivered twice delivered identically. Streams may interleave, and redeliveries may come
//! in any order after the first copy.
//!
//! Bounds: the input is read one line at a time, a line at most [`LINE_BYTES_MAX`] bytes, and a
//! directory one file at a time in name order, so memory does not grow with the files' size.
//! What does grow is the state a gapless check needs: 32 bytes (the hash) per distinct record,
//! so that a later copy of any record can be compared with the first; 100 million records
//! hold 3.2 GB.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{canonical_bytes, link, ForwardRecord, GENESIS};

/// The longest line read as one forward record, unless `verify --line-bytes-max` says
/// otherwise. A record's envelope is at most `spool.record_bytes_max` of msgpack (1 MiB +
/// 64 KiB by default); as JSON, escaping can make a text up to six times longer, so this
/// covers records of 80 MiB even if every byte were escaped. Its purpose is to stop at a
/// file that is not line-structured at all rather than read it whole into memory.
pub const LINE_BYTES_MAX: usize = 512 * 1024 * 1024;

/// Where a record was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A line of a sink's output: the file (when a directory is verified) and its 1-based
    /// number.
    Line { file: Option<PathBuf>, line: usize },
    /// A SEALED record in a spool, by its frame's position.
    Spool { segment: u64, offset: u64 },
    /// The `chain-heads` checkpoint.
    Checkpoint(PathBuf),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Line {
                file: Some(file),
                line,
            } => write!(f, "{} line {line}", file.display()),
            Location::Line { file: None, line } => write!(f, "line {line}"),
            Location::Spool { segment, offset } => {
                write!(f, "seal in segment {segment} at offset {offset}")
            }
            Location::Checkpoint(path) => write!(f, "{}", path.display()),
        }
    }
}

/// What `verify` found wrong, naming the first broken stream and sequence number.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{at}: not a forward record: {reason}")]
    Malformed { at: Location, reason: String },
    #[error("stream {stream:?} seq {seq} ({at}): {reason}")]
    Broken {
        stream: String,
        seq: u64,
        at: Location,
        reason: String,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
}

impl VerifyError {
    /// What is wrong with `rec`, read at `at`.
    pub(super) fn broken(rec: &ForwardRecord, at: &Location, reason: String) -> VerifyError {
        VerifyError::Broken {
            stream: rec.stream.clone(),
            seq: rec.seq,
            at: at.clone(),
            reason,
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct VerifySummary {
    pub streams: usize,
    pub records: u64,
    pub duplicates: u64,
}

/// The state of a verification fed line by line, from one input or several in order.
#[derive(Debug)]
pub struct Verifier {
    /// Per stream, the hash of every sequence number seen so far (index seq - 1).
    streams: HashMap<String, Vec<[u8; 32]>>,
    summary: VerifySummary,
    /// [`LINE_BYTES_MAX`] unless set with [`Verifier::with_line_bytes_max`].
    line_bytes_max: usize,
}

impl Default for Verifier {
    fn default() -> Verifier {
        Verifier::new()
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier {
            streams: HashMap::new(),
            summary: VerifySummary::default(),
            line_bytes_max: LINE_BYTES_MAX,
        }
    }

    pub fn with_line_bytes_max(line_bytes_max: usize) -> Verifier {
        Verifier {
            line_bytes_max,
            ..Verifier::new()
        }
    }

    /// Checks a file, or every `*.jsonl` file of a directory in name order (the file sink's
    /// names sort in the order it wrote them), as if they were one input.
    pub fn read_path(&mut self, path: &Path) -> Result<(), VerifyError> {
        let line_bytes_max = self.line_bytes_max;
        for_each_line_in_path(path, line_bytes_max, |line, at| self.record(line, at))
    }

    /// Checks every line of `reader`; `file` names it in errors.
    pub fn read(&mut self, reader: impl BufRead, file: Option<&Path>) -> Result<(), VerifyError> {
        let line_bytes_max = self.line_bytes_max;
        for_each_line(reader, file, line_bytes_max, |line, at| {
            self.record(line, at)
        })
    }

    /// Checks one line holding one forward record.
    pub fn record(&mut self, line: &str, at: Location) -> Result<(), VerifyError> {
        let rec: ForwardRecord = match serde_json::from_str(line) {
            Ok(rec) => rec,
            Err(e) => {
                return Err(VerifyError::Malformed {
                    at,
                    reason: e.to_string(),
                })
            }
        };
        let broken = |reason: String| VerifyError::broken(&rec, &at, reason);
        let (prev, hash) = check_record(&rec).map_err(&broken)?;
        let seen = match self.streams.get_mut(rec.stream.as_str()) {
            Some(seen) => seen,
            None => self.streams.entry(rec.stream.clone()).or_default(),
        };
        let last = seen.len() as u64;
        if rec.seq <= last {
            if seen[(rec.seq - 1) as usize] != hash {
                return Err(broken("delivered twice with different content".into()));
            }
            self.summary.duplicates += 1;
        } else if rec.seq == last + 1 {
            let expected_prev = if last == 0 {
                GENESIS
            } else {
                seen[(last - 1) as usize]
            };
            if prev != expected_prev {
                return Err(broken(format!("prev_hash does not link to seq {last}")));
            }
            seen.push(hash);
        } else {
            return Err(broken(format!(
                "gap: previous record of this stream is seq {last}"
            )));
        }
        self.summary.records += 1;
        Ok(())
    }

    pub fn finish(self) -> VerifySummary {
        VerifySummary {
            streams: self.streams.len(),
            ..self.summary
        }
    }
}

/// Calls `f` with every non-blank line of a file, or of every `*.jsonl` file of a directory in
/// name order (the file sink's names sort in the order it wrote them), as if they were one
/// input, with where it was read. A line longer than `line_bytes_max` bytes, or not UTF-8, is
/// an error rather than read whole into memory.
pub(super) fn for_each_line_in_path(
    path: &Path,
    line_bytes_max: usize,
    mut f: impl FnMut(&str, Location) -> Result<(), VerifyError>,
) -> Result<(), VerifyError> {
    if !path.is_dir() {
        let reader = std::io::BufReader::new(std::fs::File::open(path)?);
        return for_each_line(reader, None, line_bytes_max, f);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("jsonl"))
        .collect();
    files.sort();
    for file in files {
        let reader = std::io::BufReader::new(std::fs::File::open(&file)?);
        for_each_line(reader, Some(&file), line_bytes_max, &mut f)?;
    }
    Ok(())
}

/// [`for_each_line_in_path`] for one reader; `file` names it in locations.
fn for_each_line(
    mut reader: impl BufRead,
    file: Option<&Path>,
    line_bytes_max: usize,
    mut f: impl FnMut(&str, Location) -> Result<(), VerifyError>,
) -> Result<(), VerifyError> {
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        line += 1;
        let at = || Location::Line {
            file: file.map(Path::to_path_buf),
            line,
        };
        // One byte more than the bound, to tell a line of exactly the bound from a longer one.
        let read = std::io::Read::take(&mut reader, line_bytes_max as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if read == 0 {
            return Ok(());
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > line_bytes_max {
            return Err(VerifyError::Malformed {
                at: at(),
                reason: format!("line longer than {line_bytes_max} bytes"),
            });
        }
        let text = std::str::from_utf8(&buf).map_err(|e| VerifyError::Malformed {
            at: at(),
            reason: format!("not UTF-8: {e}"),
        })?;
        if text.trim().is_empty() {
            continue;
        }
        f(text, at())?;
    }
}

/// What one forward record must hold on its own, wherever it was read: its envelope belongs
/// to its stream, its slot is the stream's, its sequence number starts at 1, and its hash is
/// SHA-256 of its `prev_hash` and its canonical bytes. Returns `(prev_hash, hash)`.
pub(super) fn check_record(rec: &ForwardRecord) -> Result<([u8; 32], [u8; 32]), String> {
    if rec.envelope.stream() != rec.stream {
        return Err(format!(
            "envelope belongs to stream {:?}",
            rec.envelope.stream()
        ));
    }
    let mut prev = [0u8; 32];
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&rec.prev_hash, &mut prev)
        .map_err(|e| format!("prev_hash is not 32 hex bytes: {e}"))?;
    hex::decode_to_slice(&rec.hash, &mut hash)
        .map_err(|e| format!("hash is not 32 hex bytes: {e}"))?;
    let canonical = canonical_bytes(&rec.stream, rec.seq, rec.slot, &rec.envelope)
        .map_err(|e| e.to_string())?;
    if link(&prev, &canonical) != hash {
        return Err("hash does not match SHA-256(prev_hash || canonical bytes)".into());
    }
    if rec.slot != crate::slots::slot_of(&rec.stream) {
        return Err(format!(
            "slot {} is not the stream's slot {}",
            rec.slot,
            crate::slots::slot_of(&rec.stream)
        ));
    }
    if rec.seq == 0 {
        return Err("sequence numbers start at 1".into());
    }
    Ok((prev, hash))
}

/// Checks JSON lines of forward records from one input.
pub fn verify_jsonl(reader: impl BufRead) -> Result<VerifySummary, VerifyError> {
    let mut verifier = Verifier::new();
    verifier.read(reader, None)?;
    Ok(verifier.finish())
}

/// `verify_jsonl` over a file or a directory (see [`Verifier::read_path`]).
pub fn verify_path(path: &Path) -> Result<VerifySummary, VerifyError> {
    let mut verifier = Verifier::new();
    verifier.read_path(path)?;
    Ok(verifier.finish())
}

/// Records 1..=n of stream `s` (ids `r1`, `r2`, ..., text "some text"), each as the file
/// sink writes its line, with its hash. For tests of what reads sink output.
#[cfg(test)]
pub(super) fn output_lines(n: usize) -> Vec<(String, [u8; 32])> {
    let mut chains = crate::chain::Chains::new();
    (1..=n)
        .map(|i| {
            let envelope = crate::envelope::Envelope {
                version: 1,
                id: format!("r{i}"),
                source: "s".into(),
                text: Some("some text".into()),
                ts_ms: 1_700_000_000_000,
                slot: crate::slots::slot_of("s"),
                ..Default::default()
            };
            let record = chains.seal(envelope).unwrap();
            let mut line = Vec::new();
            crate::forward::json::write_record(&mut line, &record).unwrap();
            let hash = chains.head("s").unwrap().hash;
            (String::from_utf8(line).unwrap(), hash)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two records of stream `s`, as the file sink writes them.
    fn two_lines() -> (String, String) {
        let lines = output_lines(2);
        (lines[0].0.clone(), lines[1].0.clone())
    }

    #[test]
    fn records_split_across_files_verify_as_one_input_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = two_lines();
        std::fs::write(dir.path().join("000001.jsonl"), format!("{one}\n")).unwrap();
        // The second file without a final newline: its last line still counts.
        std::fs::write(dir.path().join("000002.jsonl"), format!("{two}\n{one}")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a record").unwrap();
        let summary = verify_path(dir.path()).unwrap();
        assert_eq!(
            summary,
            VerifySummary {
                streams: 1,
                records: 3,
                duplicates: 1
            }
        );

        std::fs::write(dir.path().join("000003.jsonl"), "\n{\"stream\":").unwrap();
        let err = verify_path(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{} line 2: not a forward record",
                dir.path().join("000003.jsonl").display()
            )),
            "{err}"
        );
    }

    #[test]
    fn a_gap_between_files_is_reported_at_the_record_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, two) = two_lines();
        std::fs::write(dir.path().join("000001.jsonl"), format!("{two}\n")).unwrap();
        let err = verify_path(dir.path()).unwrap_err();
        match err {
            VerifyError::Broken {
                stream, seq, at, ..
            } => {
                assert_eq!((stream.as_str(), seq), ("s", 2));
                assert_eq!(
                    at,
                    Location::Line {
                        file: Some(dir.path().join("000001.jsonl")),
                        line: 1
                    }
                );
            }
            other => panic!("{other}"),
        }
        assert!(verify_path(&dir.path().join("000001.jsonl"))
            .unwrap_err()
            .to_string()
            .contains("(line 1): gap: previous record of this stream is seq 0"),);
    }

    #[test]
    fn a_line_longer_than_the_bound_is_refused_and_one_at_the_bound_is_read() {
        let (one, two) = two_lines();
        let mut verifier = Verifier::with_line_bytes_max(one.len().max(two.len()));
        verifier
            .read(format!("{one}\n{two}\n").as_bytes(), None)
            .unwrap();
        let mut verifier = Verifier::with_line_bytes_max(one.len() - 1);
        let err = verifier
            .read(format!("{one}\n").as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "line 1: not a forward record: line longer than {} bytes",
                one.len() - 1
            )
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_malformed_with_its_number() {
        let (one, _) = two_lines();
        let mut input = format!("{one}\n").into_bytes();
        input.extend_from_slice(b"\xff\xfe\n");
        let err = verify_jsonl(&input[..]).unwrap_err().to_string();
        assert!(
            err.starts_with("line 2: not a forward record: not UTF-8"),
            "{err}"
        );
    }
}
