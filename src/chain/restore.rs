//! `spoolgate chain-heads`: reading and restoring the `chain-heads` checkpoint by hand.
//!
//! The daemon refuses to start from a damaged checkpoint (spool-format.md §8), because a
//! stream continued from a wrong head forks its chain. Moving the file aside is not a safe way
//! out: a stream with no seal left in the spool would start again at seq 1, and a sink that
//! deduplicates on `(stream, seq)`, as the README suggests, would drop the new records as
//! repeats of the old ones. The safe way out is to put back, for every stream, the last record
//! its sink received, which this module does:
//!
//! - [`heads_from_output`] reads them from the file sink's output: per stream, the record with
//!   the highest `seq`, its hash recomputed (a damaged line is never taken for a head). The
//!   output need not start at seq 1, since consumers take old files away.
//! - [`heads_to_json`] and [`heads_from_json`] are the exchange form, `{"<stream>": {"seq": n,
//!   "hash": "<64 hex>"}}`, which an HTTP sink's receiver can also produce from what it holds.
//! - [`import`] writes a checkpoint from such heads, under the spool's lock (so never beside a
//!   running daemon), and never moves an intact checkpoint's head backwards.
//!
//! Bound: one head per stream in memory, as in the daemon; output lines as in `verify`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::verify::{check_record, for_each_line_in_path};
use super::{ChainError, ChainHead, Chains, ForwardRecord, VerifyError};
use crate::spool::fs::FileSystem;

/// One head in the exchange form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadJson {
    pub seq: u64,
    /// Lowercase hex of the record's hash.
    pub hash: String,
}

/// The heads in the exchange form, sorted by stream name.
pub fn heads_to_json(chains: &Chains) -> BTreeMap<String, HeadJson> {
    chains
        .heads
        .iter()
        .map(|(stream, head)| {
            (
                stream.clone(),
                HeadJson {
                    seq: head.seq,
                    hash: hex::encode(head.hash),
                },
            )
        })
        .collect()
}

/// Reads heads in the exchange form; every `seq` must be at least 1 and every hash 64 hex
/// digits. The error names the stream.
pub fn heads_from_json(text: &str) -> Result<Chains, String> {
    let heads: BTreeMap<String, HeadJson> =
        serde_json::from_str(text).map_err(|e| format!("not a map of stream heads: {e}"))?;
    let mut chains = Chains::new();
    for (stream, head) in heads {
        if head.seq == 0 {
            return Err(format!("stream {stream:?}: seq must be at least 1"));
        }
        // A head at the last u64 leaves its stream no next sequence number.
        if head.seq == u64::MAX {
            return Err(format!("stream {stream:?}: seq must be below 2^64 - 1"));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&head.hash, &mut hash)
            .map_err(|e| format!("stream {stream:?}: hash is not 64 hex digits: {e}"))?;
        chains.advance(
            &stream,
            ChainHead {
                seq: head.seq,
                hash,
            },
        );
    }
    Ok(chains)
}

/// Per stream, the head of the record with the highest `seq` in file-sink output (a `.jsonl`
/// file or a directory of them), with the number of records read. Every record's hash is
/// recomputed, and two records with the same `(stream, seq)` must agree; gaps are allowed.
pub fn heads_from_output(path: &Path, line_bytes_max: usize) -> Result<(Chains, u64), VerifyError> {
    let mut chains = Chains::new();
    let mut records = 0u64;
    for_each_line_in_path(path, line_bytes_max, |line, at| {
        let rec: ForwardRecord =
            serde_json::from_str(line).map_err(|e| VerifyError::Malformed {
                at: at.clone(),
                reason: e.to_string(),
            })?;
        let (_, hash) =
            check_record(&rec).map_err(|reason| VerifyError::broken(&rec, &at, reason))?;
        if let Some(head) = chains.head(&rec.stream) {
            if head.seq == rec.seq && head.hash != hash {
                return Err(VerifyError::broken(
                    &rec,
                    &at,
                    "delivered twice with different content".into(),
                ));
            }
        }
        chains.advance(&rec.stream, ChainHead { seq: rec.seq, hash });
        records += 1;
        Ok(())
    })?;
    Ok((chains, records))
}

/// What [`import`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Streams in the checkpoint written.
    pub streams: usize,
    /// Streams whose head an intact previous checkpoint held further on, kept from it.
    pub kept_from_previous: usize,
    /// Whether a previous checkpoint was there but damaged (and so replaced).
    pub replaced_damaged: bool,
}

/// Why [`import`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0} has no spool directory: not a spoolgate data directory")]
    NotADataDir(std::path::PathBuf),
    #[error(
        "the spool in {0} is locked: stop the daemon first (a running daemon would overwrite \
         the checkpoint at its next compaction)"
    )]
    Locked(std::path::PathBuf),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes `heads` as `<data_dir>/chain-heads`, holding the spool's lock. An intact checkpoint
/// already there is merged in, taking the higher `seq` per stream: an import can add streams
/// and move heads forward, never back. A damaged one is replaced.
pub fn import(data_dir: &Path, mut heads: Chains) -> Result<ImportSummary, ImportError> {
    let spool_dir = data_dir.join("spool");
    if !spool_dir.is_dir() {
        return Err(ImportError::NotADataDir(data_dir.to_path_buf()));
    }
    let lock_path = spool_dir.join("LOCK");
    let _lock = crate::spool::fs::StdFs
        .lock(&lock_path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::WouldBlock => ImportError::Locked(data_dir.to_path_buf()),
            _ => ImportError::Io {
                path: lock_path.clone(),
                source,
            },
        })?;
    let path = data_dir.join(crate::daemon::CHAIN_HEADS_FILE);
    let (previous, replaced_damaged) = match Chains::load(&path) {
        Ok(previous) => (previous, false),
        Err(ChainError::CheckpointDamaged { .. }) => (Chains::new(), true),
        Err(e) => return Err(e.into()),
    };
    let mut kept_from_previous = 0;
    for (stream, head) in &previous.heads {
        if heads.head(stream).is_none_or(|h| h.seq < head.seq) {
            kept_from_previous += 1;
        }
        heads.advance(stream, *head);
    }
    // The spool as it is now is what the operator vouches for: a start checks its segments
    // against this, as against compaction's. An empty spool vouches for nothing older.
    heads.first_kept = crate::spool::oldest_segment(&crate::spool::fs::StdFs, &spool_dir)?;
    heads.save(&path)?;
    Ok(ImportSummary {
        streams: heads.len(),
        kept_from_previous,
        replaced_damaged,
    })
}

#[cfg(test)]
mod tests {
    use super::super::verify::output_lines;
    use super::*;

    fn head(seq: u64, byte: u8) -> ChainHead {
        ChainHead {
            seq,
            hash: [byte; 32],
        }
    }

    #[test]
    fn heads_survive_the_exchange_form() {
        let mut c = Chains::new();
        c.advance("b", head(3, 0xab));
        c.advance("a", head(1, 0x01));
        let text = serde_json::to_string(&heads_to_json(&c)).unwrap();
        assert!(text.starts_with(r#"{"a":{"seq":1,"hash":"0101"#), "{text}");
        let back = heads_from_json(&text).unwrap();
        assert_eq!(back.head("a"), c.head("a"));
        assert_eq!(back.head("b"), c.head("b"));
    }

    #[test]
    fn the_exchange_form_refuses_what_is_not_a_head() {
        let zeros = "0".repeat(64);
        for (text, want) in [
            (
                format!(r#"{{"a":{{"seq":0,"hash":"{zeros}"}}}}"#),
                "at least 1",
            ),
            (r#"{"a":{"seq":1,"hash":"abc"}}"#.to_string(), "64 hex"),
            (
                format!(r#"{{"a":{{"seq":18446744073709551615,"hash":"{zeros}"}}}}"#),
                "below 2^64 - 1",
            ),
            (
                format!(r#"{{"a":{{"seq":1,"hash":"{zeros}","x":1}}}}"#),
                "not a map",
            ),
            ("[1,2]".to_string(), "not a map"),
        ] {
            let err = heads_from_json(&text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn the_head_read_from_output_is_its_highest_record_even_without_the_first_ones() {
        let dir = tempfile::tempdir().unwrap();
        let lines = output_lines(5);
        // The oldest file taken away by a consumer; the newest holds a redelivery of seq 4.
        let text = |range: std::ops::Range<usize>| {
            range
                .map(|i| format!("{}\n", lines[i].0))
                .collect::<String>()
        };
        std::fs::write(dir.path().join("2.jsonl"), text(2..4)).unwrap();
        std::fs::write(dir.path().join("3.jsonl"), text(3..5)).unwrap();
        let (chains, records) = heads_from_output(dir.path(), 1 << 20).unwrap();
        assert_eq!(records, 4);
        assert_eq!(chains.head("s"), Some(head_of(5, lines[4].1)));
    }

    fn head_of(seq: u64, hash: [u8; 32]) -> ChainHead {
        ChainHead { seq, hash }
    }

    #[test]
    fn a_damaged_line_is_never_taken_for_a_head() {
        let dir = tempfile::tempdir().unwrap();
        let lines = output_lines(2);
        let damaged = lines[1].0.replace("some text", "some test");
        std::fs::write(
            dir.path().join("1.jsonl"),
            format!("{}\n{damaged}\n", lines[0].0),
        )
        .unwrap();
        let err = heads_from_output(dir.path(), 1 << 20).unwrap_err();
        assert!(matches!(err, VerifyError::Broken { seq: 2, .. }), "{err}");
    }

    fn data_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("spool")).unwrap();
        dir
    }

    #[test]
    fn an_import_moves_heads_forward_and_never_back() {
        let dir = data_dir();
        let path = dir.path().join("chain-heads");
        let mut previous = Chains::new();
        previous.advance("a", head(5, 1));
        previous.advance("b", head(2, 2));
        previous.save(&path).unwrap();
        let mut new = Chains::new();
        new.advance("a", head(3, 3));
        new.advance("b", head(4, 4));
        new.advance("c", head(1, 5));
        let summary = import(dir.path(), new).unwrap();
        assert_eq!(
            summary,
            ImportSummary {
                streams: 3,
                kept_from_previous: 1,
                replaced_damaged: false
            }
        );
        let written = Chains::load(&path).unwrap();
        assert_eq!(written.head("a"), Some(head(5, 1)));
        assert_eq!(written.head("b"), Some(head(4, 4)));
        assert_eq!(written.head("c"), Some(head(1, 5)));
    }

    #[test]
    fn an_import_replaces_a_damaged_checkpoint() {
        let dir = data_dir();
        let path = dir.path().join("chain-heads");
        let mut previous = Chains::new();
        previous.advance("a", head(9, 1));
        previous.save(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let mut new = Chains::new();
        new.advance("a", head(7, 2));
        let summary = import(dir.path(), new).unwrap();
        assert!(summary.replaced_damaged);
        assert_eq!(Chains::load(&path).unwrap().head("a"), Some(head(7, 2)));
    }

    #[test]
    fn an_import_beside_a_process_holding_the_spool_lock_writes_nothing() {
        let dir = data_dir();
        let _held = crate::spool::fs::StdFs
            .lock(&dir.path().join("spool").join("LOCK"))
            .unwrap();
        let mut new = Chains::new();
        new.advance("a", head(1, 1));
        let err = import(dir.path(), new).unwrap_err();
        assert!(matches!(err, ImportError::Locked(_)), "{err}");
        assert!(!dir.path().join("chain-heads").exists());
    }

    #[test]
    fn an_import_into_a_directory_without_a_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = import(dir.path(), Chains::new()).unwrap_err();
        assert!(matches!(err, ImportError::NotADataDir(_)), "{err}");
    }
}
