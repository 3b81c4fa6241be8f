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
    /// Streams whose first record read was not seq 1 (only with [`Verifier::partial`]).
    pub streams_starting_later: usize,
    /// Records from before their stream's first record read that do not link to it (only with
    /// [`Verifier::partial`]): checked on their own (hash, slot, stream), not in the chain.
    pub unlinked_before_first: u64,
}

/// The state of a verification fed line by line, from one input or several in order.
#[derive(Debug)]
pub struct Verifier {
    /// Per stream, the hash of every sequence number seen so far.
    streams: HashMap<String, Seen>,
    summary: VerifySummary,
    /// [`LINE_BYTES_MAX`] unless set with [`Verifier::with_line_bytes_max`].
    line_bytes_max: usize,
    /// Whether a stream may start after seq 1 (see [`Verifier::partial`]).
    partial: bool,
}

/// The hashes of one stream's records `first_seq`, `first_seq + 1`, ... as seen so far.
#[derive(Debug)]
struct Seen {
    first_seq: u64,
    /// The `prev_hash` of record `first_seq`: what record `first_seq - 1` must hash to.
    first_prev: [u8; 32],
    hashes: std::collections::VecDeque<[u8; 32]>,
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
            partial: false,
        }
    }

    /// Lets a stream start at any seq: for output whose oldest files were removed (the file
    /// sink's consumer takes closed files away). The first record read of a stream anchors it:
    /// its `prev_hash` is taken as given, and everything after it is checked as usual. What
    /// was removed before it, and what may be missing after the last record read, cannot be
    /// checked from the output alone.
    pub fn partial(mut self) -> Verifier {
        self.partial = true;
        self
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
        line_holds_only(line, &rec).map_err(&broken)?;
        let seen = match self.streams.get_mut(rec.stream.as_str()) {
            Some(seen) => seen,
            None if self.partial || rec.seq == 1 => {
                if rec.seq > 1 {
                    self.summary.streams_starting_later += 1;
                }
                self.streams.insert(
                    rec.stream.clone(),
                    Seen {
                        first_seq: rec.seq,
                        first_prev: prev,
                        hashes: [hash].into(),
                    },
                );
                if rec.seq == 1 && prev != GENESIS {
                    return Err(broken("seq 1 must have a prev_hash of 64 zeros".into()));
                }
                self.summary.records += 1;
                return Ok(());
            }
            None => {
                return Err(broken(
                    "gap: previous record of this stream is seq 0 (with output whose oldest \
                     files were removed, verify --partial)"
                        .into(),
                ))
            }
        };
        // Every seq seen lies in first_seq ..= last, so the arithmetic below cannot overflow.
        let last = seen.first_seq + (seen.hashes.len() as u64 - 1);
        if rec.seq < seen.first_seq {
            // Only with --partial (otherwise the first is seq 1): a record from before the one
            // that anchored the stream, such as a redelivery of records whose first copies
            // were in a removed file. It extends the stream back if it links to it; otherwise
            // nothing read can vouch for it, and it is counted, not failed.
            if rec.seq == seen.first_seq - 1 && hash == seen.first_prev {
                seen.hashes.push_front(hash);
                seen.first_seq = rec.seq;
                seen.first_prev = prev;
            } else {
                self.summary.unlinked_before_first += 1;
                return Ok(());
            }
        } else if rec.seq <= last {
            if seen.hashes[(rec.seq - seen.first_seq) as usize] != hash {
                return Err(broken("delivered twice with different content".into()));
            }
            self.summary.duplicates += 1;
        } else if rec.seq - 1 == last {
            if Some(&prev) != seen.hashes.back() {
                return Err(broken(format!("prev_hash does not link to seq {last}")));
            }
            seen.hashes.push_back(hash);
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
        let read = std::io::Read::take(&mut reader, (line_bytes_max as u64).saturating_add(1))
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

/// Whether `line` holds exactly `rec`, which was decoded from it. The hash covers the record's
/// canonical bytes, not the line: without this, a key the record type ignores (an unknown one,
/// a null or empty field the writer omits), a field left out for its default, or a hash in
/// upper case would pass every chain check while the line says more than, or other than, the
/// record it chains. The file sink's lines are the record as [`write_record`] writes it, byte
/// for byte; any other rendering (key order, whitespace, escapes: a receiver that re-encodes
/// what the HTTP sink sent) must hold the same JSON values.
///
/// [`write_record`]: crate::forward::json::write_record
fn line_holds_only(line: &str, rec: &ForwardRecord) -> Result<(), String> {
    let mut written = Vec::with_capacity(line.len());
    crate::forward::json::write_record(&mut written, rec).map_err(|e| e.to_string())?;
    if written == line.as_bytes() {
        return Ok(());
    }
    // serde keeps the last of a repeated key, in the record and in the value alike, so the
    // comparison below would not see the first; a reader that keeps the first would.
    if let Some(path) = repeated_key(line) {
        return Err(format!(
            "the line holds other than the record its hash covers: {path} appears twice"
        ));
    }
    let read: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let expected: serde_json::Value =
        serde_json::from_slice(&written).map_err(|e| e.to_string())?;
    match first_difference(&read, &expected, "") {
        None => Ok(()),
        Some(difference) => Err(format!(
            "the line holds other than the record its hash covers: {difference}"
        )),
    }
}

/// The key path of the first key that an object in the JSON text `line` holds twice.
fn repeated_key(line: &str) -> Option<String> {
    use serde::de::{DeserializeSeed, Error, MapAccess, SeqAccess, Visitor};
    use std::cell::RefCell;

    /// Walks a JSON value, failing at the first repeated key. The path to where it is, one
    /// segment per level, is kept on one shared stack and only formatted then: a line is
    /// untrusted and may be hundreds of MiB, and a path copied into every element of a long
    /// array (under a long key) would cost its length per element.
    struct Walk<'s>(&'s RefCell<Vec<String>>);
    const REPEATED: &str = "repeated key: ";

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0usize;
            loop {
                self.0.borrow_mut().push(format!("[{i}]"));
                let more = seq.next_element_seed(Walk(self.0))?.is_some();
                self.0.borrow_mut().pop();
                if !more {
                    return Ok(());
                }
                i += 1;
            }
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                let segment = if self.0.borrow().is_empty() {
                    key.clone()
                } else {
                    format!(".{key}")
                };
                if !seen.insert(key) {
                    let path: String = self.0.borrow().concat();
                    return Err(A::Error::custom(format!("{REPEATED}{path}{segment}")));
                }
                self.0.borrow_mut().push(segment);
                map.next_value_seed(Walk(self.0))?;
                self.0.borrow_mut().pop();
            }
            Ok(())
        }
    }

    let path = RefCell::new(Vec::new());
    let mut de = serde_json::Deserializer::from_str(line);
    match Walk(&path).deserialize(&mut de) {
        Ok(()) => None,
        Err(e) => {
            let message = e.to_string();
            let path = message.strip_prefix(REPEATED)?;
            // serde_json adds " at line L column C" to a custom error.
            Some(
                path.rsplit_once(" at line ")
                    .map_or(path, |(p, _)| p)
                    .to_string(),
            )
        }
    }
}

/// Where `read` first differs from `expected`, by key path, with the two values (shortened).
fn first_difference(
    read: &serde_json::Value,
    expected: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    let show = |v: &Value| {
        let text = v.to_string();
        match text.char_indices().nth(60) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text,
        }
    };
    let key_path = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (read, expected) {
        (Value::Object(r), Value::Object(e)) => {
            for (key, value) in r {
                match e.get(key) {
                    None => return Some(format!("{} is not a field it has", key_path(key))),
                    Some(other) => {
                        if let Some(d) = first_difference(value, other, &key_path(key)) {
                            return Some(d);
                        }
                    }
                }
            }
            e.keys()
                .find(|key| !r.contains_key(*key))
                .map(|key| format!("{} is missing", key_path(key)))
        }
        _ if read == expected => None,
        _ => Some(format!(
            "{} is {} where the record has {}",
            if path.is_empty() { "the line" } else { path },
            show(read),
            show(expected)
        )),
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
    // The spec writes both in lower case; upper case decodes alike, so it is checked here.
    if rec
        .prev_hash
        .bytes()
        .chain(rec.hash.bytes())
        .any(|b| b.is_ascii_uppercase())
    {
        return Err("prev_hash and hash must be lowercase hex".into());
    }
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
                duplicates: 1,
                streams_starting_later: 0,
                unlinked_before_first: 0
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
    fn a_line_holding_a_key_twice_is_refused_whichever_copy_a_reader_would_keep() {
        let mut chains = crate::chain::Chains::new();
        let envelope = crate::envelope::Envelope {
            version: 1,
            id: "m".into(),
            source: "s".into(),
            meta: [("k".to_string(), serde_json::Value::from("real"))].into(),
            slot: crate::slots::slot_of("s"),
            ..Default::default()
        };
        let record = chains.seal(envelope).unwrap();
        let mut line = Vec::new();
        crate::forward::json::write_record(&mut line, &record).unwrap();
        let line = String::from_utf8(line).unwrap();
        assert_eq!(verify_jsonl(line.as_bytes()).unwrap().records, 1);
        let forged = line.replacen("{\"k\":\"real\"}", "{\"k\":\"forged\",\"k\":\"real\"}", 1);
        assert_ne!(forged, line, "the case changes the line");
        let err = verify_jsonl(forged.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("envelope.meta.k appears twice"), "{err}");
        // A field of the record itself: its decoding refuses that already.
        let (one, _) = two_lines();
        let err = verify_jsonl(
            one.replacen("{\"stream\"", "{\"seq\":9,\"stream\"", 1)
                .as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("duplicate field `seq`"), "{err}");
        assert_eq!(
            repeated_key(r#"{"a":[{"b":1,"c":{"d":2,"d":3}}]}"#).as_deref(),
            Some("a[0].c.d")
        );
        assert_eq!(repeated_key(r#"{"a":{"b":1},"c":{"b":1}}"#), None);
    }

    #[test]
    fn a_float_in_meta_reads_back_as_the_float_written_so_its_line_verifies() {
        // Floats whose shortest form serde_json's default parser reads back one step off
        // (serde-rs/json #1336, #937); with `float_roundtrip` they read back exactly.
        for x in [1.5777777777770001_f64, 0.09144338512092887] {
            let mut chains = crate::chain::Chains::new();
            let envelope = crate::envelope::Envelope {
                version: 1,
                id: "f".into(),
                source: "s".into(),
                meta: [("x".to_string(), serde_json::Value::from(x))].into(),
                slot: crate::slots::slot_of("s"),
                ..Default::default()
            };
            let record = chains.seal(envelope).unwrap();
            let mut line = Vec::new();
            crate::forward::json::write_record(&mut line, &record).unwrap();
            assert_eq!(verify_jsonl(line.as_slice()).unwrap().records, 1, "{x}");
        }
    }

    #[test]
    fn a_line_holding_more_or_other_than_the_record_its_hash_covers_is_refused() {
        let (one, _) = two_lines();
        let cases = [
            (
                one.replacen("{\"stream\"", "{\"approved\":true,\"stream\"", 1),
                "holds other than the record its hash covers: approved is not a field it has",
            ),
            (
                one.replacen("\"source\":\"s\"", "\"source\":\"s\",\"x\":1", 1),
                "covers: envelope.x is not a field it has",
            ),
            (
                one.replacen(",\"priority\":\"normal\"", "", 1),
                "covers: envelope.priority is missing",
            ),
            (
                one.replacen("\"source\":\"s\"", "\"source\":\"s\",\"tenant\":null", 1),
                "covers: envelope.tenant is not a field it has",
            ),
            (
                {
                    let rec: ForwardRecord = serde_json::from_str(&one).unwrap();
                    one.replacen(&rec.hash, &rec.hash.to_uppercase(), 1)
                },
                "must be lowercase hex",
            ),
        ];
        for (line, expected) in cases {
            assert_ne!(line, one, "the case changes the line");
            let err = match verify_jsonl(line.as_bytes()) {
                Ok(_) => panic!("{expected}: accepted {line}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(expected), "{expected}: {err}");
        }
        // The same record rendered otherwise (keys sorted, as a JSON library re-encoding what
        // the HTTP sink sent would) holds the same values and verifies.
        let value: serde_json::Value = serde_json::from_str(&one).unwrap();
        let resorted = serde_json::to_string(&value).unwrap();
        assert_ne!(resorted, one);
        assert_eq!(verify_jsonl(resorted.as_bytes()).unwrap().records, 1);
    }

    #[test]
    fn with_partial_a_stream_may_start_after_seq_1_and_is_checked_from_there() {
        let lines: Vec<String> = output_lines(6).into_iter().map(|(l, _)| l).collect();
        let read = |partial: bool, picked: &[usize]| {
            let mut verifier = Verifier::new();
            if partial {
                verifier = verifier.partial();
            }
            let input: String = picked
                .iter()
                .map(|&i| format!("{}\n", lines[i - 1]))
                .collect();
            verifier
                .read(input.as_bytes(), None)
                .map(|()| verifier.finish())
        };
        let summary = read(true, &[3, 4, 3, 5]).unwrap();
        assert_eq!(
            summary,
            VerifySummary {
                streams: 1,
                records: 4,
                duplicates: 1,
                streams_starting_later: 1,
                unlinked_before_first: 0
            }
        );
        assert_eq!(read(true, &[1, 2]).unwrap().streams_starting_later, 0);
        let err = read(false, &[3, 4]).unwrap_err().to_string();
        assert!(err.contains("gap") && err.contains("--partial"), "{err}");
        let err = read(true, &[3, 5]).unwrap_err().to_string();
        assert!(
            err.contains("gap: previous record of this stream is seq 3"),
            "{err}"
        );
        // Before the anchor: a record that links to it extends the stream back, one that
        // does not is counted (a redelivery whose first copy was in a removed file).
        let summary = read(true, &[5, 6, 3, 4, 5, 6]).unwrap();
        assert_eq!(summary.unlinked_before_first, 1, "{summary:?}");
        assert_eq!((summary.records, summary.duplicates), (5, 2), "{summary:?}");
        let summary = read(true, &[3, 2, 1, 4]).unwrap();
        assert_eq!(summary.unlinked_before_first, 0, "{summary:?}");
        assert_eq!(summary.records, 4, "{summary:?}");
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
