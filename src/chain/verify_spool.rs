//! `spoolgate verify DATA_DIR`: checks the chain evidence a spool holds, the way a reader with
//! only spool-format.md would (§8, "Sealed and tombstone payloads" and "The `chain-heads`
//! checkpoint").
//!
//! Every sealed entry must pass the checks a forwarded record passes (its hash recomputed from
//! `prev_hash` and its canonical bytes, its slot, its stream). Across entries, in log order:
//! a stream's seals are appended in sequence order (one worker owns a stream's slot at a time,
//! and it appends a batch's seal only after the previous one is durable), and compaction
//! deletes segments oldest first, so the seals left of a stream are a run of consecutive
//! sequence numbers, each linking to the one before. Where that run starts is what the
//! checkpoint vouches for: with no checkpoint head for the stream nothing was ever deleted and
//! the run starts at 1 from 32 zero bytes; with a head at seq `c`, the run starts at or before
//! `c + 1`, agrees with the head at `c`, and reaches at least `c`.
//!
//! Bounds: one segment in memory at a time, one small entry per stream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::verify::{check_record, Location, VerifyError};
use super::{ChainHead, Chains, SealedBatch, GENESIS};
use crate::spool::{Position, RecordKind};

/// What a verified spool holds.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SpoolVerifySummary {
    /// Streams with at least one seal in the spool.
    pub streams: usize,
    pub sealed_records: u64,
    /// Streams the `chain-heads` checkpoint names.
    pub checkpointed_streams: usize,
    /// Ranges recovery would drop as damaged (`spoolgate inspect` lists them); the frames in
    /// them are not checked.
    pub damaged_ranges: usize,
}

/// A stream's run of seals so far.
struct Run {
    first: u64,
    last: u64,
    last_hash: [u8; 32],
    /// Where its last seal was, for a report about what follows it.
    last_at: Position,
}

/// Verifies the seals of the spool in `dir`: a data directory (its `spool/` and
/// `chain-heads`) or a spool directory (its parent's `chain-heads`).
pub fn verify_spool(dir: &Path) -> Result<SpoolVerifySummary, VerifyError> {
    let (spool_dir, heads_path): (PathBuf, PathBuf) = if dir.join("spool").is_dir() {
        (dir.join("spool"), dir.join(crate::daemon::CHAIN_HEADS_FILE))
    } else {
        let parent = dir.parent().unwrap_or(Path::new("."));
        (
            dir.to_path_buf(),
            parent.join(crate::daemon::CHAIN_HEADS_FILE),
        )
    };
    let checkpoint = Chains::load(&heads_path).map_err(|e| VerifyError::Malformed {
        at: Location::Checkpoint(heads_path.clone()),
        reason: e.to_string(),
    })?;
    let mut runs: HashMap<String, Run> = HashMap::new();
    let mut summary = SpoolVerifySummary {
        checkpointed_streams: checkpoint.len(),
        ..SpoolVerifySummary::default()
    };
    let damaged = crate::spool::for_each_frame(&spool_dir, |position, kind, payload| {
        if kind != RecordKind::SEALED.0 {
            return Ok(());
        }
        let at = Location::Spool {
            segment: position.segment,
            offset: position.offset,
        };
        let batch = SealedBatch::decode(payload).map_err(|e| VerifyError::Malformed {
            at: at.clone(),
            reason: format!("seal does not decode: {e}"),
        })?;
        for entry in batch.entries {
            let rec = entry.record;
            let broken = |reason: String| VerifyError::broken(&rec, &at, reason);
            let (prev, hash) = check_record(&rec).map_err(&broken)?;
            let head = checkpoint.head(&rec.stream);
            if let Some(head) = head {
                if rec.seq == head.seq && hash != head.hash {
                    return Err(broken(format!(
                        "its hash differs from the checkpoint's head at seq {}",
                        head.seq
                    )));
                }
            }
            match runs.get_mut(rec.stream.as_str()) {
                Some(run) => {
                    if rec.seq <= run.last {
                        return Err(broken(format!(
                            "sealed again: this stream's seals had reached seq {} (at {})",
                            run.last,
                            Location::Spool {
                                segment: run.last_at.segment,
                                offset: run.last_at.offset
                            }
                        )));
                    }
                    if rec.seq != run.last + 1 {
                        return Err(broken(format!(
                            "gap: the previous seal of this stream is seq {}",
                            run.last
                        )));
                    }
                    if prev != run.last_hash {
                        return Err(broken(format!(
                            "prev_hash does not link to seq {}",
                            run.last
                        )));
                    }
                    run.last = rec.seq;
                    run.last_hash = hash;
                    run.last_at = position;
                }
                None => {
                    check_first_seal(rec.seq, &prev, head).map_err(&broken)?;
                    runs.insert(
                        rec.stream.clone(),
                        Run {
                            first: rec.seq,
                            last: rec.seq,
                            last_hash: hash,
                            last_at: position,
                        },
                    );
                }
            }
            summary.sealed_records += 1;
        }
        Ok(())
    })?;
    // A checkpoint is written before the segments it lets go are deleted, with the heads of
    // seals durable by then; seals after them in the log are never deleted before the next
    // checkpoint. So a stream with seals left has them at least up to its checkpointed head.
    let mut short: Vec<(&String, &Run, ChainHead)> = runs
        .iter()
        .filter_map(|(stream, run)| {
            checkpoint
                .head(stream)
                .filter(|head| run.last < head.seq)
                .map(|head| (stream, run, head))
        })
        .collect();
    short.sort_by(|a, b| a.0.cmp(b.0));
    if let Some((stream, run, head)) = short.first() {
        return Err(VerifyError::Broken {
            stream: (*stream).clone(),
            seq: head.seq,
            at: Location::Checkpoint(heads_path),
            reason: format!(
                "the checkpoint's head is seq {}, but this stream's seals in the spool end at seq {} (first {})",
                head.seq, run.last, run.first
            ),
        });
    }
    summary.streams = runs.len();
    summary.damaged_ranges = damaged.len();
    Ok(summary)
}

/// Where a stream's first seal in the spool may start (see the module doc).
fn check_first_seal(seq: u64, prev: &[u8; 32], head: Option<ChainHead>) -> Result<(), String> {
    match head {
        None if seq != 1 => Err(format!(
            "gap: this stream's first seal in the spool is seq {seq}, and no checkpoint head \
             vouches for the ones before it"
        )),
        None if *prev != GENESIS => Err("seq 1 does not link to 32 zero bytes".into()),
        None => Ok(()),
        Some(head) if seq > head.seq.saturating_add(1) => Err(format!(
            "gap: the checkpoint's head is seq {}, and this stream's first seal in the spool \
             is seq {seq}",
            head.seq
        )),
        Some(head) if seq == head.seq.saturating_add(1) && *prev != head.hash => Err(format!(
            "prev_hash does not link to the checkpoint's head at seq {}",
            head.seq
        )),
        Some(_) => Ok(()),
    }
}
