//! Dedup checkpoints: the dedup index entries of segments that compaction deletes.
//!
//! At start-up the dedup index is rebuilt from the envelopes still in the spool. Without more,
//! an id whose segment was compacted away would be forgotten by a restart, and a client's retry
//! of it (say, after a timeout that spanned the restart) would be written and forwarded a second
//! time under a new sequence number. So before compaction deletes segments, it writes the
//! entries of the envelopes in them that are still inside the dedup window to a checkpoint file
//! `dedup-<first kept segment, 20 digits>-<written ms, 20 digits>`, atomically (temp file,
//! fdatasync, rename, directory fsync); start-up loads every such file before it scans the
//! spool.
//!
//! Each entry is written once, by the pass that deletes its segment. Bounds: each file holds at
//! most `dedup_entries_max` entries (it is taken from the index) and at most
//! [`DEDUP_FILE_BYTES_MAX`] bytes. A file is removed once its write time has left the window,
//! or once newer files hold `dedup_entries_max` entries between them ([`Checkpoints`]), so all
//! files together hold less than twice `dedup_entries_max` entries: at the default of
//! 1,000,000, at most about 1.1 GB with the longest tenants and ids (256 bytes each), about
//! 150 MB with 36-byte ids and short tenants. A load keeps at most
//! `dedup_entries_max` entries in all (the index's own bound).
//!
//! A damaged or unreadable file is skipped with a warning and
//! `spoolgate_recovery_dedup_files_skipped_total`: the dedup index is a convenience for
//! retries, and losing part of it must never keep the daemon from starting. The format is in
//! spool-format.md §10.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spool::Position;

/// File name prefix; the rest is two 20-digit numbers.
pub const DEDUP_FILE_PREFIX: &str = "dedup-";
/// Magic bytes that start every dedup checkpoint.
pub const DEDUP_FILE_MAGIC: &[u8; 8] = b"SGDEDUP1";
/// A file larger than this is refused at load (and never written: the writer splits nothing,
/// it is bounded by `dedup_entries_max` x the key bound, far below this).
pub const DEDUP_FILE_BYTES_MAX: u64 = 1 << 30;

/// One remembered id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    /// `dedup::key(tenant, id)`.
    pub key: String,
    pub position: Position,
    pub slot: u16,
    /// Wall-clock time the id was accepted, in ms since the Unix epoch.
    pub accepted_ms: u64,
}

#[derive(Debug, Deserialize)]
struct Body {
    entries: Vec<DedupEntry>,
}

#[derive(Serialize)]
struct BodyRef<'a> {
    entries: &'a [DedupEntry],
}

#[derive(Debug, thiserror::Error)]
pub enum DedupFileError {
    #[error("dedup checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dedup checkpoint {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot encode a dedup checkpoint: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

fn file_name(first_kept: u64, written_ms: u64) -> String {
    format!("{DEDUP_FILE_PREFIX}{first_kept:020}-{written_ms:020}")
}

/// `(first_kept, written_ms)` from a checkpoint's file name.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(DEDUP_FILE_PREFIX)?;
    let (a, b) = rest.split_once('-')?;
    if a.len() != 20 || b.len() != 20 {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The bytes of a checkpoint: magic, CRC-32/ISO-HDLC of the body (u32 LE), body (msgpack).
pub fn encode(entries: &[DedupEntry]) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    let body = rmp_serde::to_vec_named(&BodyRef { entries })?;
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(DEDUP_FILE_MAGIC);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses checkpoint bytes; the reason names what is wrong.
pub fn decode(bytes: &[u8]) -> Result<Vec<DedupEntry>, String> {
    if bytes.len() < 12 || &bytes[..8] != DEDUP_FILE_MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let body = &bytes[12..];
    if crc32fast::hash(body) != crc {
        return Err("CRC mismatch".into());
    }
    let body: Body = rmp_serde::from_slice(body).map_err(|e| e.to_string())?;
    Ok(body.entries)
}

/// Writes one checkpoint atomically into `dir`.
pub fn write(
    dir: &Path,
    first_kept: u64,
    written_ms: u64,
    entries: &[DedupEntry],
) -> Result<PathBuf, DedupFileError> {
    let path = dir.join(file_name(first_kept, written_ms));
    let io = |source| DedupFileError::Io {
        path: path.clone(),
        source,
    };
    let bytes = encode(entries)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(io)?;
    tmp.as_file().sync_data().map_err(io)?;
    tmp.persist(&path).map_err(|e| io(e.error))?;
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        // The caller fails its pass and tries again under another name: a file left here
        // would be one more the next start loads and nothing counts or removes until then.
        if let Err(removal) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %removal, "could not remove a dedup checkpoint whose directory fsync failed; the next start loads it");
        }
        return Err(io(e));
    }
    Ok(path)
}

/// Every checkpoint in `dir`, oldest first, as `(path, written_ms)`.
pub fn list(dir: &Path) -> Result<Vec<(PathBuf, u64)>, DedupFileError> {
    let io = |source| DedupFileError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if let Some((first_kept, written_ms)) = name.to_str().and_then(parse_name) {
            out.push(((first_kept, written_ms), entry.path()));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|((_, w), p)| (p, w)).collect())
}

/// Reads one checkpoint.
pub fn read(path: &Path) -> Result<Vec<DedupEntry>, DedupFileError> {
    let io = |source| DedupFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > DEDUP_FILE_BYTES_MAX {
        return Err(DedupFileError::Damaged {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, over the limit of {DEDUP_FILE_BYTES_MAX}"),
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    decode(&bytes).map_err(|reason| DedupFileError::Damaged {
        path: path.to_path_buf(),
        reason,
    })
}

/// One checkpoint file on disk, as compaction keeps track of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub written_ms: u64,
    /// Entries in the file (0 for a file that could not be read).
    pub entries: usize,
}

/// The checkpoints compaction has written or start-up found, oldest first, and the rule for
/// which of them are still worth keeping.
#[derive(Debug, Default)]
pub struct Checkpoints {
    files: std::collections::VecDeque<Checkpoint>,
    entries: usize,
}

impl Checkpoints {
    pub fn push(&mut self, checkpoint: Checkpoint) {
        self.entries += checkpoint.entries;
        self.files.push_back(checkpoint);
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Takes out the checkpoints that no longer serve, for the caller to delete: those written
    /// more than `window_ms` ago (every entry in them is older still), and the oldest ones
    /// whose entries a load would evict anyway because the newer files already hold
    /// `entries_max`. What stays is at most `entries_max` entries plus one file's worth, which
    /// is the bound on the disk they use.
    pub fn take_obsolete(
        &mut self,
        now_ms: u64,
        window_ms: u64,
        entries_max: usize,
    ) -> Vec<Checkpoint> {
        let mut obsolete = Vec::new();
        while let Some(oldest) = self.files.front() {
            let expired = now_ms.saturating_sub(oldest.written_ms) > window_ms;
            let shadowed = self.entries - oldest.entries >= entries_max;
            if !expired && !shadowed {
                break;
            }
            let oldest = self.files.pop_front().expect("front exists");
            self.entries -= oldest.entries;
            obsolete.push(oldest);
        }
        obsolete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> DedupEntry {
        DedupEntry {
            key: format!("t\0id-{n}"),
            position: Position {
                segment: 3,
                offset: 64 + n * 100,
            },
            slot: (n % 1024) as u16,
            accepted_ms: 1_700_000_000_000 + n,
        }
    }

    #[test]
    fn a_written_checkpoint_reads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<DedupEntry> = (0..100).map(entry).collect();
        let path = write(dir.path(), 4, 1_700_000_000_500, &entries).unwrap();
        assert_eq!(read(&path).unwrap(), entries);
        assert_eq!(
            list(dir.path()).unwrap(),
            vec![(path, 1_700_000_000_500u64)]
        );
    }

    #[test]
    fn a_changed_byte_is_reported_as_damage_not_read_as_entries() {
        let mut bytes = encode(&[entry(1), entry(2)]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        assert_eq!(decode(&bytes), Err("CRC mismatch".to_string()));
        assert_eq!(decode(b"not a file"), Err("bad magic".to_string()));
    }

    #[test]
    fn checkpoints_are_listed_oldest_first_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 9, 5_000, &[entry(2)]).unwrap();
        write(dir.path(), 5, 1_000, &[entry(1)]).unwrap();
        std::fs::write(dir.path().join("dedup-unrelated"), b"x").unwrap();
        let listed: Vec<u64> = list(dir.path()).unwrap().iter().map(|l| l.1).collect();
        assert_eq!(listed, vec![1_000, 5_000]);
    }

    fn checkpoint(written_ms: u64, entries: usize) -> Checkpoint {
        Checkpoint {
            path: PathBuf::from(format!("dedup-{written_ms}")),
            written_ms,
            entries,
        }
    }

    #[test]
    fn a_checkpoint_is_obsolete_once_its_write_time_left_the_window() {
        let mut c = Checkpoints::default();
        c.push(checkpoint(1_000, 5));
        c.push(checkpoint(5_000, 5));
        assert!(c.take_obsolete(4_000, 3_000, 100).is_empty());
        let gone = c.take_obsolete(7_000, 3_000, 100);
        assert_eq!(gone, vec![checkpoint(1_000, 5)]);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn old_checkpoints_are_obsolete_once_newer_ones_hold_entries_max() {
        let mut c = Checkpoints::default();
        for (n, written_ms) in [1_000u64, 2_000, 3_000, 4_000].into_iter().enumerate() {
            c.push(checkpoint(written_ms, 40 + n));
        }
        // 40 + 41 + 42 + 43 entries; the newest two (85) are not 100, the newest three are.
        let gone = c.take_obsolete(4_000, 60_000, 100);
        assert_eq!(gone, vec![checkpoint(1_000, 40)]);
        assert_eq!(c.len(), 3);
        assert!(c.take_obsolete(4_000, 60_000, 100).is_empty());
        // An unreadable file (0 entries) goes by its age only.
        c.push(checkpoint(4_500, 0));
        assert!(c.take_obsolete(4_500, 60_000, 200).is_empty());
    }
}
