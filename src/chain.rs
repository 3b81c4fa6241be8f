//! The hash chain: every stream (the envelope's tenant, or its source) gets gapless sequence
//! numbers from 1 and a SHA-256 link to its previous record.
//!
//! ```text
//! canonical = msgpack map { "stream": str, "seq": uint, "slot": uint, "envelope": Envelope v1 }
//! hash      = SHA-256( prev_hash (32 raw bytes; 32 zero bytes for seq 1) || canonical )
//! ```
//!
//! The exact layout and a worked example are in spool-format.md §8. Because the envelope's own
//! encoding is canonical (named keys in a fixed order, empty fields omitted, sorted maps), the
//! hash of a forwarded record can be recomputed by anyone from the JSON the file sink writes.
//!
//! **Determinism across crashes.** The chain is computed once per record, by the worker that
//! owns the record's slot, and is then made durable in a SEALED spool record before the record
//! leaves the process (see `forward::worker`). Replay re-sends sealed records byte for byte and
//! seals only records that were never sealed, continuing from heads that include every seal on
//! disk (plus the checkpoint written before compaction). So a record forwarded twice carries the
//! same sequence number, the same hashes and the same gate output, even if the rules changed in
//! between.
//!
//! Bound: one head (stream name, sequence number, 32-byte hash) per stream that has ever sent a
//! record, and ingest admits at most `ingest.streams_max` streams (see `ingest::streams`); heads
//! are checkpointed to `chain-heads` before compaction deletes seals. A worker seals a batch
//! against its own copy of its streams' heads and moves the shared heads only once the seal is
//! durable, so the shared heads (and every checkpoint of them) never run ahead of the seals on
//! disk.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{put_str, put_uint, Envelope};
use crate::spool::Position;

pub mod restore;
mod verify;
mod verify_spool;

pub use verify::{
    verify_jsonl, verify_path, Location, Verifier, VerifyError, VerifySummary, LINE_BYTES_MAX,
};
pub use verify_spool::{verify_spool, SpoolVerifySummary};

pub const GENESIS: [u8; 32] = [0u8; 32];

/// A sealed forward record as the pipeline passes it around: sealed once, then shared by the
/// ledger, the sink batch and retries without copying the envelope.
pub type SharedRecord = std::sync::Arc<ForwardRecord>;

/// What sinks receive, and one JSON line of the file sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardRecord {
    pub stream: String,
    pub seq: u64,
    /// Lowercase hex of the previous record's hash (64 zeros for seq 1).
    pub prev_hash: String,
    /// Lowercase hex of this record's hash.
    pub hash: String,
    pub slot: u16,
    pub envelope: Envelope,
}

impl ForwardRecord {
    /// The head this record leaves its stream at; `None` if its hash is not 64 hex digits.
    pub fn chain_head(&self) -> Option<ChainHead> {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&self.hash, &mut hash).ok()?;
        Some(ChainHead {
            seq: self.seq,
            hash,
        })
    }
}

/// The canonical record as a serde struct: the specification's field order, kept as the
/// oracle the hand-assembled encoding is tested against.
#[cfg(test)]
#[derive(Serialize)]
struct Canonical<'a> {
    stream: &'a str,
    seq: u64,
    slot: u16,
    envelope: &'a Envelope,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("cannot encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("cannot decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error(transparent)]
    Envelope(#[from] crate::envelope::EnvelopeError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The `chain-heads` checkpoint is unreadable. Nothing is guessed in its place: a stream
    /// continued from a wrong or missing head would fork its chain (a `seq` sent twice with
    /// different records, or a gap), which is worse than not starting.
    #[error(
        "the chain-heads checkpoint {path} is damaged ({reason}); spoolgate will not start \
         from it, because a stream continued from a wrong head would fork its chain. Restore \
         each stream's last delivered head with `spoolgate chain-heads import` (`spoolgate \
         chain-heads from-output` reads them from file-sink output), or a backup of the file. \
         Moving the file aside instead starts every stream with no seal left in the spool \
         again at seq 1, which a sink that deduplicates on (stream, seq) would drop \
         (spool-format.md, section 8)"
    )]
    CheckpointDamaged {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The `chain-heads` checkpoint is absent although compaction, which writes it before
    /// deleting anything, has deleted segments: it was lost or removed, and the heads of the
    /// streams whose seals left with those segments with it.
    #[error(
        "the chain-heads checkpoint {path} is missing, but the spool's oldest segment is \
         {first_segment}: compaction writes the checkpoint before it deletes any segment, so \
         it was lost or removed. spoolgate will not start without it, because a stream whose \
         seals were compacted would start again at seq 1, which a sink that deduplicates on \
         (stream, seq) would drop. Restore each stream's last delivered head with `spoolgate \
         chain-heads import` (`spoolgate chain-heads from-output` reads them from file-sink \
         output); if nothing from the deleted segments was ever forwarded, import {{}} \
         (spool-format.md, section 8)"
    )]
    CheckpointMissing {
        path: std::path::PathBuf,
        first_segment: u64,
    },
    /// Segments from the one compaction last kept on are gone, and with them the seals that
    /// say how far each stream got since the checkpoint's heads.
    #[error(
        "the spool {dir} is missing {missing}, which compaction kept when it last wrote the \
         chain-heads checkpoint: something other than compaction removed them, with the \
         acknowledged envelopes and the seals they held. spoolgate will not start on it, \
         because those seals say how far each stream's sequence got since the checkpoint: a \
         stream would go on from an older head and send sequence numbers a sink may already \
         have, with other records. Restore each stream's last delivered head with `spoolgate \
         chain-heads import` (`spoolgate chain-heads from-output` reads them from file-sink \
         output; if nothing from those segments was ever forwarded, import {{}}); the import \
         vouches for the spool as it is now, and the next start goes on (spool-format.md, \
         section 8)"
    )]
    SegmentsMissing {
        dir: std::path::PathBuf,
        /// "segments K to N" or "every segment from K on".
        missing: String,
    },
}

/// The first bytes of a `chain-heads` checkpoint (spool-format.md §8), followed by the CRC-32
/// of the body, little-endian, and the body. Files written before 2026-12-03 are the body
/// alone; a body is a msgpack array, whose first byte is never `S`, so the two cannot be
/// confused.
pub const CHAIN_HEADS_MAGIC: &[u8; 8] = b"SGHEADS1";

/// The canonical bytes a record's hash covers.
pub fn canonical_bytes(
    stream: &str,
    seq: u64,
    slot: u16,
    envelope: &Envelope,
) -> Result<Vec<u8>, ChainError> {
    let mut out = canonical_head(stream, seq, slot);
    rmp_serde::encode::write_named(&mut out, envelope)?;
    Ok(out)
}

/// Msgpack writers with the smallest encodings, exactly as rmp-serde writes the same values.
/// The canonical bytes up to the envelope: `canonical = head || envelope bytes` (§8 of
/// spool-format.md), so the envelope is encoded once and shared with the seal entry.
fn canonical_head(stream: &str, seq: u64, slot: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(stream.len() + 40);
    out.push(0x84);
    put_str(&mut out, "stream");
    put_str(&mut out, stream);
    put_str(&mut out, "seq");
    put_uint(&mut out, seq);
    put_str(&mut out, "slot");
    put_uint(&mut out, u64::from(slot));
    put_str(&mut out, "envelope");
    out
}

/// A record's hash from its envelope's bytes: `SHA-256(prev || canonical)` with the canonical
/// bytes in two parts, so the envelope need not be copied behind its head.
fn chain_hash(
    prev: &[u8; 32],
    stream: &str,
    seq: u64,
    slot: u16,
    envelope_bytes: &[u8],
) -> [u8; 32] {
    Sha256::new()
        .chain_update(prev)
        .chain_update(canonical_head(stream, seq, slot))
        .chain_update(envelope_bytes)
        .finalize()
        .into()
}

/// `SHA-256(prev || canonical)`.
pub fn link(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// Per-stream chain heads.
#[derive(Debug, Clone, Default)]
pub struct Chains {
    /// Hashed with foldhash, seeded per process: stream names are chosen by clients, and
    /// SipHash cost more than the lookup it guards for a map of at most `ingest.streams_max`.
    heads: HashMap<String, ChainHead, foldhash::fast::RandomState>,
    /// Set in a checkpoint compaction writes: the oldest segment it keeps, deleting the ones
    /// below right after the checkpoint is durable. A start that finds the oldest segment
    /// above it knows that segments were removed by something else (spool-format.md §8).
    /// `None` in checkpoints written before 2026-12-04 and in heads not read from one.
    pub first_kept: Option<u64>,
}

impl Chains {
    pub fn new() -> Chains {
        Chains::default()
    }

    pub fn head(&self, stream: &str) -> Option<ChainHead> {
        self.heads.get(stream).copied()
    }

    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// The names of every stream with a head.
    pub fn streams(&self) -> impl Iterator<Item = &str> {
        self.heads.keys().map(String::as_str)
    }

    /// Every stream's head, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ChainHead)> {
        self.heads
            .iter()
            .map(|(stream, head)| (stream.as_str(), *head))
    }

    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Sets a stream's head (or removes it), whatever it was.
    pub fn restore(&mut self, stream: &str, head: Option<ChainHead>) {
        match head {
            Some(h) => {
                self.heads.insert(stream.to_string(), h);
            }
            None => {
                self.heads.remove(stream);
            }
        }
    }

    /// Gives `envelope` the next sequence number and link of its stream. (The worker seals
    /// through a [`SealWriter`], which also writes the sealed entry.)
    pub fn seal(&mut self, envelope: Envelope) -> Result<ForwardRecord, ChainError> {
        let stream = envelope.stream().to_string();
        let prev = self.prev_of(&stream);
        let seq = prev.seq + 1;
        let slot = envelope.slot;
        let hash = chain_hash(&prev.hash, &stream, seq, slot, &envelope.encode()?);
        self.heads.insert(stream.clone(), ChainHead { seq, hash });
        let record = ForwardRecord {
            stream,
            seq,
            prev_hash: hex32(&prev.hash),
            hash: hex32(&hash),
            slot,
            envelope,
        };
        Ok(record)
    }

    /// The head a stream's next record links to: its current one, or genesis.
    fn prev_of(&self, stream: &str) -> ChainHead {
        self.heads.get(stream).copied().unwrap_or(ChainHead {
            seq: 0,
            hash: GENESIS,
        })
    }

    /// Advances a head past a record sealed earlier (found in the spool at start-up).
    pub fn observe(&mut self, record: &ForwardRecord) {
        if let Some(head) = record.chain_head() {
            self.advance(&record.stream, head);
        }
    }

    /// Moves a stream's head to `head` unless it is already at or past it.
    pub fn advance(&mut self, stream: &str, head: ChainHead) {
        match self.heads.get_mut(stream) {
            Some(current) if current.seq >= head.seq => {}
            Some(current) => *current = head,
            None => {
                self.heads.insert(stream.to_string(), head);
            }
        }
    }

    /// Writes all heads atomically: temp file, fdatasync, rename, directory fsync.
    pub fn save(&self, path: &Path) -> Result<(), ChainError> {
        let io = |source| ChainError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bytes = self.checkpoint_bytes()?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        std::io::Write::write_all(&mut tmp, &bytes).map_err(io)?;
        tmp.as_file().sync_data().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Loads a checkpoint; a missing file is an empty set of heads.
    pub fn load(path: &Path) -> Result<Chains, ChainError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Chains::new()),
            Err(source) => {
                return Err(ChainError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Chains::from_checkpoint_bytes(&bytes).map_err(|reason| ChainError::CheckpointDamaged {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// The bytes [`Chains::save`] writes: magic, CRC-32 of the body, and the body, a msgpack
    /// array of `[stream, {"seq", "hash"}]` sorted by stream name, followed by
    /// [`Chains::first_kept`] as a msgpack uint when it is set.
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>, ChainError> {
        let mut heads: Vec<(&String, &ChainHead)> = self.heads.iter().collect();
        heads.sort_by(|a, b| a.0.cmp(b.0));
        let mut body = rmp_serde::to_vec_named(&heads)?;
        if let Some(first_kept) = self.first_kept {
            rmp::encode::write_uint(&mut body, first_kept)
                .map_err(|e| ChainError::Encode(rmp_serde::encode::Error::InvalidValueWrite(e)))?;
        }
        let mut out = Vec::with_capacity(12 + body.len());
        out.extend_from_slice(CHAIN_HEADS_MAGIC);
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Reads checkpoint bytes, in the current form or the unversioned one written before
    /// 2026-12-03, and checks what the writer guarantees: the CRC (current form only), streams
    /// in strictly ascending order (so each once) and every `seq` at least 1. The error says
    /// which check failed.
    pub fn from_checkpoint_bytes(bytes: &[u8]) -> Result<Chains, String> {
        let body = match bytes.strip_prefix(CHAIN_HEADS_MAGIC.as_slice()) {
            Some(rest) => {
                let Some((crc, body)) = rest.split_first_chunk::<4>() else {
                    return Err(format!("{} bytes, shorter than its header", bytes.len()));
                };
                let (stored, computed) = (u32::from_le_bytes(*crc), crc32fast::hash(body));
                if stored != computed {
                    return Err(format!(
                        "CRC mismatch: stored {stored:#010x}, computed {computed:#010x}"
                    ));
                }
                body
            }
            None => bytes,
        };
        let mut rest = body;
        let heads: Vec<(String, ChainHead)> = rmp_serde::decode::from_read(&mut rest)
            .map_err(|e| format!("its body does not decode: {e}"))?;
        // After the heads, nothing (a checkpoint from before 2026-12-04, or one written by
        // `chain-heads import`) or exactly one uint: the oldest segment compaction kept.
        let first_kept = if rest.is_empty() {
            None
        } else {
            let value = rmp::decode::read_int::<u64, _>(&mut rest)
                .map_err(|e| format!("what follows its heads is not a segment id: {e:?}"))?;
            if !rest.is_empty() {
                return Err(format!(
                    "{} bytes follow its heads and segment id",
                    rest.len()
                ));
            }
            Some(value)
        };
        for pair in heads.windows(2) {
            if pair[0].0 >= pair[1].0 {
                return Err(format!(
                    "streams out of order: {:?} before {:?}",
                    pair[0].0, pair[1].0
                ));
            }
        }
        if let Some((stream, _)) = heads.iter().find(|(_, head)| head.seq == 0) {
            return Err(format!("stream {stream:?} has seq 0"));
        }
        // A head at the last u64 leaves its stream no next sequence number.
        if let Some((stream, _)) = heads.iter().find(|(_, head)| head.seq == u64::MAX) {
            return Err(format!(
                "stream {stream:?} has seq 2^64 - 1, which has no next"
            ));
        }
        Ok(Chains {
            heads: heads.into_iter().collect(),
            first_kept,
        })
    }
}

/// Payload of a SEALED spool record: the forward records of one batch, each with the spool
/// position of the envelope it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedBatch {
    pub entries: Vec<SealedEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedEntry {
    pub position: Position,
    pub record: ForwardRecord,
}

#[cfg(test)]
#[derive(Serialize)]
struct SealedEntryRef<'a> {
    position: Position,
    record: &'a ForwardRecord,
}

/// One sealed entry's msgpack bytes, as they appear inside a [`SealedBatch`].
#[cfg(test)]
fn encode_sealed_entry(position: Position, record: &ForwardRecord) -> Result<Vec<u8>, ChainError> {
    Ok(rmp_serde::to_vec_named(&SealedEntryRef {
        position,
        record,
    })?)
}

/// Room kept at the front of each payload for the batch's header: fixmap of 1, fixstr
/// `"entries"`, and at most five bytes of array header.
const SEAL_HEADER_ROOM: usize = 1 + 8 + 5;
/// Room counted for a payload's header when checking it against `record_bytes_max`.
const SEAL_HEADER_BYTES: usize = 64;

/// Seals a batch's envelopes straight into the payloads of its SEALED spool records.
///
/// Each entry is written once, where it ends up: the envelope is encoded into the payload
/// buffer behind its entry's prefix, hashed there, and the hash patched into the prefix (a
/// lowercase hex string has a fixed length). Before, the envelope was encoded into a buffer of
/// its own, copied into its entry's buffer, and that copied again into the batch payload: two
/// copies of every forwarded text, about 2.5% of the forwarding CPU. The bytes are the same as
/// `encode_sealed_entry` (a test oracle) and [`SealedBatch::encode`] give (a test holds them
/// equal).
///
/// Payloads are split so that each fits `record_bytes_max`, as separate SEALED records that
/// the worker appends one after another ([`SealWriter::finish_parts`]); an entry that cannot
/// fit a record on its own is refused.
pub struct SealWriter {
    /// Bounds each payload's stored length (`spool::format::stored_len`), as the spool does.
    record_bytes_max: usize,
    /// Bytes 0xF7 in `current`'s entries: each takes one more byte stored.
    current_stuffing: usize,
    /// Payloads already full, in order; each starts with its header.
    done: Vec<bytes::Bytes>,
    /// Entries in each payload of `done`.
    done_entries: Vec<usize>,
    /// The payload being filled: [`SEAL_HEADER_ROOM`] bytes, then its entries.
    current: Vec<u8>,
    /// Entries in `current`.
    entries: usize,
    /// What is left of the caller's size hint for the payloads not yet started: each new
    /// payload is allocated at its final size rather than grown from empty by doubling.
    hint_left_bytes: usize,
}

impl SealWriter {
    /// `capacity_bytes` is a hint for the first payload (about the batch's envelope bytes).
    pub fn new(record_bytes_max: u32, capacity_bytes: usize) -> SealWriter {
        let record_bytes_max = record_bytes_max as usize;
        let mut writer = SealWriter {
            record_bytes_max,
            current_stuffing: 0,
            done: Vec::new(),
            done_entries: Vec::new(),
            current: Vec::new(),
            entries: 0,
            hint_left_bytes: capacity_bytes,
        };
        writer.current = writer.empty_payload();
        writer
    }

    /// A payload with its header room and nothing else, sized from the hint.
    fn empty_payload(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(
            self.hint_left_bytes.min(self.record_bytes_max) + SEAL_HEADER_ROOM + SEAL_HEADER_BYTES,
        );
        payload.resize(SEAL_HEADER_ROOM, 0);
        payload
    }

    /// Gives `envelope` the next sequence number and link of its stream in `chains` and
    /// appends its sealed entry. On an error the chain head and the payloads are unchanged.
    pub fn seal(
        &mut self,
        chains: &mut Chains,
        position: Position,
        envelope: Envelope,
    ) -> Result<ForwardRecord, SealError> {
        let stream = envelope.stream().to_string();
        let prev = chains.prev_of(&stream);
        let seq = prev.seq + 1;
        let slot = envelope.slot;
        let prev_hash = hex32(&prev.hash);
        let start = self.current.len();
        let out = &mut self.current;
        out.reserve(envelope.encoded_len_hint() + stream.len() + 220);
        out.push(0x82);
        put_str(out, "position");
        if let Err(e) = rmp_serde::encode::write_named(out, &position) {
            out.truncate(start);
            return Err(ChainError::from(e).into());
        }
        put_str(out, "record");
        out.push(0x86);
        put_str(out, "stream");
        put_str(out, &stream);
        put_str(out, "seq");
        put_uint(out, seq);
        put_str(out, "prev_hash");
        put_str(out, &prev_hash);
        put_str(out, "hash");
        // A str 8 of 64 bytes, filled in once the envelope is hashed.
        out.extend_from_slice(&[0xd9, 64]);
        let hash_at = out.len();
        out.resize(hash_at + 64, b'0');
        put_str(out, "slot");
        put_uint(out, u64::from(slot));
        put_str(out, "envelope");
        let envelope_at = out.len();
        if let Err(e) = envelope.encode_into(out) {
            out.truncate(start);
            return Err(ChainError::from(e).into());
        }
        let hash = chain_hash(&prev.hash, &stream, seq, slot, &out[envelope_at..]);
        let hash_hex = hex32(&hash);
        out[hash_at..hash_at + 64].copy_from_slice(hash_hex.as_bytes());
        // Stored, each 0xF7 of the entry takes two bytes (spool-format.md §3).
        let entry_stuffing = crate::spool::format::stuffing(&out[start..]);
        let entry_bytes = out.len() - start + entry_stuffing;
        if entry_bytes + SEAL_HEADER_BYTES > self.record_bytes_max {
            out.truncate(start);
            return Err(SealError::TooLarge {
                len: entry_bytes,
                max: self.record_bytes_max,
                envelope: Box::new(envelope),
            });
        }
        if self.entries > 0
            && out.len() - SEAL_HEADER_ROOM
                + self.current_stuffing
                + entry_stuffing
                + SEAL_HEADER_BYTES
                > self.record_bytes_max
        {
            // This entry starts the next payload (once per `record_bytes_max` of entries).
            let entry = out.split_off(start);
            self.finish_current();
            self.current.extend_from_slice(&entry);
        }
        self.entries += 1;
        self.current_stuffing += entry_stuffing;
        // Updated in place when the stream has a head: no key to allocate per record.
        match chains.heads.get_mut(stream.as_str()) {
            Some(head) => *head = ChainHead { seq, hash },
            None => {
                chains.heads.insert(stream.clone(), ChainHead { seq, hash });
            }
        }
        Ok(ForwardRecord {
            stream,
            seq,
            prev_hash,
            hash: hash_hex,
            slot,
            envelope,
        })
    }

    /// Whether nothing was sealed yet.
    pub fn is_empty(&self) -> bool {
        self.entries == 0 && self.done.is_empty()
    }

    /// The payloads of the SEALED records, in order.
    pub fn finish(self) -> Vec<bytes::Bytes> {
        self.finish_parts()
            .into_iter()
            .map(|(payload, _)| payload)
            .collect()
    }

    /// The payloads of the SEALED records, in order, each with how many entries it holds:
    /// the first payload holds the first entries sealed, and so on.
    pub fn finish_parts(mut self) -> Vec<(bytes::Bytes, usize)> {
        if self.entries > 0 {
            // No payload follows: the empty one finish_current starts stays small.
            self.hint_left_bytes = 0;
            self.finish_current();
        }
        self.done.into_iter().zip(self.done_entries).collect()
    }

    /// Writes the header of `current` right-aligned in its room, moves it to `done` and
    /// starts an empty payload.
    fn finish_current(&mut self) {
        let mut header = Vec::with_capacity(SEAL_HEADER_ROOM);
        header.push(0x81);
        put_str(&mut header, "entries");
        let _ = rmp::encode::write_array_len(&mut header, self.entries as u32);
        let from = SEAL_HEADER_ROOM - header.len();
        self.current[from..SEAL_HEADER_ROOM].copy_from_slice(&header);
        self.hint_left_bytes = self
            .hint_left_bytes
            .saturating_sub(self.current.len() - SEAL_HEADER_ROOM);
        let next = self.empty_payload();
        let full = std::mem::replace(&mut self.current, next);
        self.done.push(bytes::Bytes::from(full).slice(from..));
        self.done_entries.push(self.entries);
        self.entries = 0;
        self.current_stuffing = 0;
    }
}

/// Why a record could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The envelope comes back (as gated) so that it can be dead-lettered.
    #[error("its sealed entry of {len} bytes cannot fit a spool record of at most {max} bytes (spool.record_bytes_max)")]
    TooLarge {
        len: usize,
        max: usize,
        envelope: Box<Envelope>,
    },
}

impl SealError {
    /// The envelope a [`SealError::TooLarge`] gives back.
    pub fn into_envelope(self) -> Option<Box<Envelope>> {
        match self {
            SealError::TooLarge { envelope, .. } => Some(envelope),
            SealError::Chain(_) => None,
        }
    }
}

/// Lowercase hex of a 32-byte hash. `hex::encode` builds its string one `char` at a time
/// through an iterator, which cost about 1.4% of the forwarding CPU for the two hashes of
/// every record; a table lookup into a buffer of the final size does not.
pub fn hex32(bytes: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    std::str::from_utf8(&out)
        .expect("hex digits are ASCII")
        .to_owned()
}

impl SealedBatch {
    pub fn encode(&self) -> Result<Vec<u8>, ChainError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }
    pub fn decode(bytes: &[u8]) -> Result<SealedBatch, ChainError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// Payload of a TOMBSTONE spool record: envelope positions whose delivery is complete, and
/// the head each stream of the records they name reached with them.
///
/// The heads are a second copy of what the seals already say, for the one case where the
/// seals cannot say it: a damaged seal frame that held its stream's latest records. Restoring
/// heads from the remaining seals alone would then move that stream back, and its next record
/// would take a sequence number the sink already has, with another record behind it. A
/// tombstone is written only after its seal was durable, so its heads never run ahead of the
/// chain; restoring takes, per stream, the highest of checkpoint, seals and tombstone heads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub positions: Vec<Position>,
    /// Absent (not an empty array) when there are none, as in tombstones written before
    /// 2026-12-04 and those of records that took no sequence number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heads: Vec<TombstoneHead>,
}

/// A stream's head as a tombstone records it: the highest `seq` among the records the
/// tombstone's batch sealed for that stream, and that record's hash (lowercase hex, as in a
/// sealed entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneHead {
    pub stream: String,
    pub seq: u64,
    pub hash: String,
}

impl TombstoneHead {
    /// The head of each stream among `records`: its highest `seq`, sorted by stream name.
    pub fn of_records<'a>(
        records: impl IntoIterator<Item = &'a ForwardRecord>,
    ) -> Vec<TombstoneHead> {
        let mut heads: BTreeMap<&str, &ForwardRecord> = BTreeMap::new();
        for r in records {
            let entry = heads.entry(r.stream.as_str()).or_insert(r);
            if r.seq > entry.seq {
                *entry = r;
            }
        }
        heads
            .into_values()
            .map(|r| TombstoneHead {
                stream: r.stream.clone(),
                seq: r.seq,
                hash: r.hash.clone(),
            })
            .collect()
    }

    /// As a [`ChainHead`]; `None` for a hash that is not 64 hex digits or a `seq` of 0,
    /// which restoring ignores (the seals and the checkpoint still count).
    pub fn chain_head(&self) -> Option<ChainHead> {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&self.hash, &mut hash).ok()?;
        (self.seq > 0).then_some(ChainHead {
            seq: self.seq,
            hash,
        })
    }
}

impl Tombstone {
    pub fn encode(&self) -> Result<Vec<u8>, ChainError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }
    pub fn decode(bytes: &[u8]) -> Result<Tombstone, ChainError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex32_is_lowercase_hex_like_the_hex_crate() {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(37).wrapping_add(0xa5);
        }
        assert_eq!(hex32(&b), hex::encode(b));
        assert_eq!(hex32(&[0xff; 32]), "f".repeat(64));
    }

    /// Seals `count` envelopes per stream with a [`SealWriter`], heads starting at sequence
    /// numbers across every msgpack integer width, positions past 2^32.
    fn seal_with_writer(
        record_bytes_max: u32,
        count: u64,
    ) -> (Vec<bytes::Bytes>, Vec<SealedEntry>) {
        let mut chains = Chains::new();
        let mut writer = SealWriter::new(record_bytes_max, 0);
        let mut entries = Vec::new();
        let streams = ["a", "ä-stream", &"s".repeat(40), &"t".repeat(300)];
        for (i, stream) in streams.iter().enumerate() {
            let head_seq = [0u64, 126, 127, 255, 65_535, 1 << 40][i % 6];
            chains.restore(
                stream,
                (head_seq > 0).then_some(ChainHead {
                    seq: head_seq,
                    hash: [7u8; 32],
                }),
            );
            for j in 0..count {
                let mut e = env(stream, &"x".repeat((j % 4) as usize * 100));
                e.tenant = Some(stream.to_string());
                e.slot = crate::slots::slot_of(stream);
                let position = Position {
                    segment: 1 << (i * 11),
                    offset: 64 + (j << (i * 10)),
                };
                let record = writer.seal(&mut chains, position, e).unwrap();
                entries.push(SealedEntry { position, record });
            }
        }
        (writer.finish(), entries)
    }

    #[test]
    fn a_sealed_payload_written_in_place_is_the_serde_encoding_of_its_batch() {
        for count in [1u64, 3, 4, 5] {
            // 4 streams: 4, 12, 16 and 20 entries, so every array header size up to 16 shows.
            let (payloads, entries) = seal_with_writer(u32::MAX, count);
            assert_eq!(payloads.len(), 1);
            assert_eq!(
                payloads[0].as_ref(),
                SealedBatch { entries }.encode().unwrap().as_slice(),
                "{count} per stream"
            );
        }
    }

    #[test]
    fn sealed_hashes_link_the_canonical_bytes_of_each_record() {
        let (_, entries) = seal_with_writer(u32::MAX, 3);
        for SealedEntry { record, .. } in entries {
            let prev = if record.seq == 1 {
                GENESIS
            } else {
                let mut h = [0u8; 32];
                hex::decode_to_slice(&record.prev_hash, &mut h).unwrap();
                h
            };
            let canonical =
                canonical_bytes(&record.stream, record.seq, record.slot, &record.envelope).unwrap();
            let oracle = rmp_serde::to_vec_named(&Canonical {
                stream: &record.stream,
                seq: record.seq,
                slot: record.slot,
                envelope: &record.envelope,
            })
            .unwrap();
            assert_eq!(canonical, oracle);
            assert_eq!(hex::encode(link(&prev, &canonical)), record.hash);
        }
    }

    #[test]
    fn sealed_payloads_are_split_to_fit_a_record_and_keep_entry_order() {
        let max = 2_000u32;
        let (payloads, entries) = seal_with_writer(max, 8);
        assert!(payloads.len() > 4, "{} payloads", payloads.len());
        let mut decoded = Vec::new();
        for (k, payload) in payloads.iter().enumerate() {
            assert!(
                payload.len() <= max as usize,
                "payload {k}: {}",
                payload.len()
            );
            let batch = SealedBatch::decode(payload).unwrap();
            assert_eq!(payload.as_ref(), batch.encode().unwrap().as_slice());
            if let Some(next) = entries.get(decoded.len() + batch.entries.len()) {
                // Greedy: the next entry would not have fitted this payload.
                let next_len = encode_sealed_entry(next.position, &next.record)
                    .unwrap()
                    .len();
                assert!(payload.len() + next_len + SEAL_HEADER_BYTES > max as usize);
            }
            decoded.extend(batch.entries);
        }
        assert_eq!(decoded, entries);
    }

    #[test]
    fn sealed_payloads_count_each_0xf7_twice_against_the_record_bound() {
        // Each entry's `meta` holds 150 values -9, each the byte 0xF7, each stored as two.
        let max = 2_000u32;
        let stored = crate::spool::format::stored_len;
        let mut chains = Chains::new();
        let mut writer = SealWriter::new(max, 0);
        let mut entries = Vec::new();
        for j in 0..12u64 {
            let mut e = env("a", "text");
            e.meta.insert("n".into(), serde_json::json!(vec![-9; 150]));
            let position = Position {
                segment: 1,
                offset: 64 + j * 512,
            };
            let record = writer.seal(&mut chains, position, e).unwrap();
            entries.push(SealedEntry { position, record });
        }
        let parts = writer.finish_parts();
        let payloads: Vec<_> = parts.iter().map(|(p, _)| p.clone()).collect();
        let mut decoded = Vec::new();
        for (payload, count) in &parts {
            assert!(stored(payload) <= max as usize, "{}", stored(payload));
            let batch = SealedBatch::decode(payload).unwrap();
            assert_eq!(
                batch.entries.len(),
                *count,
                "each part says how many entries it holds"
            );
            if let Some(next) = entries.get(decoded.len() + batch.entries.len()) {
                let next = encode_sealed_entry(next.position, &next.record).unwrap();
                assert!(stored(payload) + stored(&next) + SEAL_HEADER_BYTES > max as usize);
            }
            decoded.extend(batch.entries);
        }
        assert_eq!(decoded, entries);
        // Counted by their plain length, the same entries would have packed tighter.
        assert!(payloads.iter().any(|p| p.len() + 300 < stored(p)));
    }

    #[test]
    fn an_entry_too_large_for_a_record_is_refused_and_leaves_the_chain_as_it_was() {
        let mut chains = Chains::new();
        let mut writer = SealWriter::new(600, 0);
        let position = Position {
            segment: 1,
            offset: 64,
        };
        writer
            .seal(&mut chains, position, env("a", "short"))
            .unwrap();
        let err = writer
            .seal(&mut chains, position, env("a", &"x".repeat(600)))
            .unwrap_err();
        assert!(matches!(err, SealError::TooLarge { max: 600, .. }), "{err}");
        assert_eq!(chains.head("a").unwrap().seq, 1);
        let payloads = writer.finish();
        assert_eq!(payloads.len(), 1);
        assert_eq!(SealedBatch::decode(&payloads[0]).unwrap().entries.len(), 1);
    }

    fn env(stream: &str, text: &str) -> Envelope {
        Envelope {
            version: 1,
            id: text.into(),
            source: stream.into(),
            text: Some(text.into()),
            ts_ms: 1_700_000_000_000,
            slot: crate::slots::slot_of(stream),
            ..Default::default()
        }
    }

    #[test]
    fn seal_numbers_each_stream_from_one_and_links_to_the_previous_hash() {
        let mut c = Chains::new();
        let a1 = c.seal(env("a", "x")).unwrap();
        let b1 = c.seal(env("b", "y")).unwrap();
        let a2 = c.seal(env("a", "z")).unwrap();
        assert_eq!((a1.seq, b1.seq, a2.seq), (1, 1, 2));
        assert_eq!(a1.prev_hash, hex::encode(GENESIS));
        assert_eq!(a2.prev_hash, a1.hash);
    }

    #[test]
    fn restore_undoes_a_seal() {
        let mut c = Chains::new();
        c.seal(env("a", "x")).unwrap();
        let before = c.head("a");
        c.seal(env("a", "y")).unwrap();
        c.restore("a", before);
        assert_eq!(c.seal(env("a", "z")).unwrap().seq, 2);
    }

    #[test]
    fn observe_takes_the_highest_sequence_number() {
        let mut c = Chains::new();
        let r1 = Chains::new().seal(env("a", "x")).unwrap();
        let mut other = Chains::new();
        other.seal(env("a", "x")).unwrap();
        let r2 = other.seal(env("a", "y")).unwrap();
        c.observe(&r2);
        c.observe(&r1);
        assert_eq!(c.head("a").unwrap().seq, 2);
    }

    #[test]
    fn checkpoints_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Chains::new();
        c.seal(env("a", "x")).unwrap();
        c.seal(env("b", "x")).unwrap();
        let path = dir.path().join("chain-heads");
        c.save(&path).unwrap();
        let loaded = Chains::load(&path).unwrap();
        assert_eq!(loaded.head("a"), c.head("a"));
        assert_eq!(loaded.len(), 2);
        assert!(Chains::load(&dir.path().join("missing"))
            .unwrap()
            .is_empty());
    }

    fn two_heads() -> Chains {
        let mut c = Chains::new();
        c.seal(env("a", "x")).unwrap();
        c.seal(env("a", "y")).unwrap();
        c.seal(env("b", "x")).unwrap();
        c
    }

    #[test]
    fn a_checkpoint_starts_with_its_magic_and_the_crc_of_its_body() {
        let bytes = two_heads().checkpoint_bytes().unwrap();
        assert_eq!(&bytes[..8], CHAIN_HEADS_MAGIC);
        let crc = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&bytes[12..]));
    }

    #[test]
    fn a_change_to_any_byte_of_a_checkpoint_is_refused() {
        let bytes = two_heads().checkpoint_bytes().unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[i] ^= flip;
                assert!(
                    Chains::from_checkpoint_bytes(&damaged).is_err(),
                    "byte {i} xor {flip:#04x} was accepted"
                );
            }
        }
        for len in 0..bytes.len() {
            assert!(
                Chains::from_checkpoint_bytes(&bytes[..len]).is_err(),
                "a checkpoint cut to {len} bytes was accepted"
            );
        }
    }

    #[test]
    fn a_checkpoint_written_before_it_had_a_header_is_still_read() {
        let c = two_heads();
        let mut heads: Vec<(&String, &ChainHead)> = c.heads.iter().collect();
        heads.sort_by(|a, b| a.0.cmp(b.0));
        let unversioned = rmp_serde::to_vec_named(&heads).unwrap();
        let loaded = Chains::from_checkpoint_bytes(&unversioned).unwrap();
        assert_eq!(loaded.head("a"), c.head("a"));
        assert_eq!(loaded.head("b"), c.head("b"));
        assert_eq!(loaded.len(), 2);
    }

    #[test]
    fn a_checkpoint_that_breaks_what_the_writer_guarantees_is_refused() {
        let head = |seq| ChainHead { seq, hash: [7; 32] };
        let unversioned = |heads: &[(&str, ChainHead)]| rmp_serde::to_vec_named(heads).unwrap();
        let out_of_order = unversioned(&[("b", head(1)), ("a", head(1))]);
        let twice = unversioned(&[("a", head(1)), ("a", head(2))]);
        let seq_zero = unversioned(&[("a", head(0))]);
        let not_heads = rmp_serde::to_vec_named(&vec![1u8, 2, 3]).unwrap();
        for (bytes, want) in [
            (out_of_order, "out of order"),
            (twice, "out of order"),
            (seq_zero, "seq 0"),
            (not_heads, "does not decode"),
        ] {
            let err = Chains::from_checkpoint_bytes(&bytes).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn a_checkpoint_carries_the_oldest_segment_compaction_kept_and_reads_without_it() {
        let mut c = two_heads();
        let without = c.checkpoint_bytes().unwrap();
        assert_eq!(
            Chains::from_checkpoint_bytes(&without).unwrap().first_kept,
            None
        );
        c.first_kept = Some(300);
        let with = c.checkpoint_bytes().unwrap();
        // The heads, then the id as a msgpack uint (0xcd: uint16).
        assert_eq!(with[12..with.len() - 3], without[12..]);
        assert_eq!(with[with.len() - 3..], [0xcd, 0x01, 0x2c]);
        let loaded = Chains::from_checkpoint_bytes(&with).unwrap();
        assert_eq!(loaded.first_kept, Some(300));
        // A build from before `first_kept` decodes the body with `from_slice`, which stops
        // after the heads: it reads the new form too.
        let older: Vec<(String, ChainHead)> = rmp_serde::from_slice(&with[12..]).unwrap();
        assert_eq!(older.len(), 2);
        assert_eq!(loaded.head("a"), c.head("a"));
        // Anything else after the heads is damage, CRC or not.
        let mut body = without[12..].to_vec();
        body.extend_from_slice(&[0xa1, b'x']);
        let mut bad = CHAIN_HEADS_MAGIC.to_vec();
        bad.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bad.extend_from_slice(&body);
        assert!(Chains::from_checkpoint_bytes(&bad).is_err());
        body.truncate(without.len() - 12);
        body.extend_from_slice(&[0x05, 0x06]);
        let mut bad = CHAIN_HEADS_MAGIC.to_vec();
        bad.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bad.extend_from_slice(&body);
        assert!(Chains::from_checkpoint_bytes(&bad).is_err());
    }

    #[test]
    fn loading_a_damaged_checkpoint_names_the_file_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chain-heads");
        two_heads().save(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = Chains::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("CRC mismatch"), "{err}");
        assert!(err.contains("spoolgate chain-heads import"), "{err}");
    }

    #[test]
    fn sealed_and_tombstone_payloads_round_trip() {
        let rec = Chains::new().seal(env("a", "x")).unwrap();
        let b = SealedBatch {
            entries: vec![SealedEntry {
                position: Position {
                    segment: 1,
                    offset: 64,
                },
                record: rec,
            }],
        };
        assert_eq!(SealedBatch::decode(&b.encode().unwrap()).unwrap(), b);
        let t = Tombstone {
            positions: vec![Position {
                segment: 2,
                offset: 8,
            }],
            heads: vec![],
        };
        assert_eq!(Tombstone::decode(&t.encode().unwrap()).unwrap(), t);
        let with_heads = Tombstone {
            heads: TombstoneHead::of_records([&b.entries[0].record]),
            ..t
        };
        assert_eq!(
            Tombstone::decode(&with_heads.encode().unwrap()).unwrap(),
            with_heads
        );
    }
}
