//! Compaction: deleting segments whose envelopes are all complete.
//!
//! Segments are deleted oldest first, as a prefix, never the active one and never one the
//! dispatcher has not read past, each unlink made durable (directory fsync) before the next, so
//! that after a power loss too what is gone is a prefix. Prefix order is what makes deletion safe without rewriting
//! anything: a tombstone always sits in the same or a later segment than the envelope it
//! completes, so when segment N goes, every envelope its tombstones name is in N or older and
//! is gone too — no tombstone that still matters is ever deleted, and tombstones never pile up
//! beyond the segments that still hold pending work. Spool bytes on disk therefore stay
//! proportional to the span from the oldest pending envelope to the head of the log.
//!
//! Seal records leave with their segments too, and with them the evidence of each stream's
//! chain head. So before any deletion the chain heads are checkpointed to `chain-heads`
//! (atomically: temp file, fsync, rename, fsync of the directory); start-up loads the
//! checkpoint and then advances it with the seals still in the spool. The heads checkpointed
//! are those of *durable* seals, since workers move the shared heads only after their seal
//! append returns: every seal in a deleted segment is among them (its envelopes, all
//! tombstoned, were delivered after that), and no seal still on its way to disk is, so a crash
//! right after the checkpoint cannot make the restart skip a sequence number.
//!
//! The dedup index loses its start-up source the same way: ids are rebuilt from the envelopes
//! in the spool. So the same pass first writes the dedup entries of the envelopes in the
//! segments it is about to delete to a dedup checkpoint (see `ingest::dedup_file`), and removes
//! checkpoints whose entries have all left the window or that newer ones make redundant.
//!
//! Both checkpoints are new files, so a pass needs free space before it can free any. On a
//! filesystem another process has filled, the [`reserve`] gives it that space: the first pass
//! that fails for lack of space spends (empties) the reserve and runs again, one segment per
//! pass until the reserve is made again.
//!
//! A compaction pass runs after tombstones are written (the workers notify it) and at least
//! every [`COMPACTION_INTERVAL`]; the same loop refreshes the pending-work gauges, which every
//! scrape of `/metrics` refreshes too ([`PendingGauges`]).

pub mod reserve;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::chain::Chains;
use crate::forward::ledger::Ledger;
use crate::ingest::dedup_file;
use crate::ingest::server::stopped;
use crate::ingest::IngestState;
use crate::metrics::Metrics;
use crate::ring::Ring;
use crate::spool::Spool;

pub const COMPACTION_INTERVAL: Duration = Duration::from_secs(1);

pub struct Compactor {
    pub spool: Spool,
    pub ledger: Arc<Ledger>,
    /// The heads of durable seals, which the checkpoint saves. Workers move them only once a
    /// seal is durable (see `forward::worker`): a checkpoint naming a seal still on its way to
    /// disk, followed by a crash before it got there, would make the restart continue the
    /// stream past a sequence number nobody ever received.
    pub chains: Arc<Mutex<Chains>>,
    pub ring: Arc<Ring>,
    pub heads_path: PathBuf,
    /// Where dedup checkpoints go (the data directory).
    pub dedup_dir: PathBuf,
    /// The dedup checkpoints on disk, oldest first: loaded at start-up, then added to by each
    /// pass and pruned by age and by `dedup_entries_max` (see `Checkpoints::take_obsolete`).
    pub dedup_checkpoints: Arc<Mutex<dedup_file::Checkpoints>>,
    /// Holds the dedup index whose entries are checkpointed.
    pub ingest: Arc<IngestState>,
    /// Segments below this id have had their dedup entries checkpointed. Starts at the first
    /// segment present at start-up (older ones were checkpointed before they were deleted); it
    /// only grows.
    pub dedup_checkpointed_below: AtomicU64,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// Space held for passes on a full filesystem; made and spent only by [`Compactor::run`].
    pub reserve: Arc<reserve::Reserve>,
}

impl Compactor {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        // Passes failed in a row. A full disk fails every pass (the checkpoints need a new
        // file) until space returns, up to one a second: the first failure of a run is logged
        // as an error, the rest only counted, and the end of the run is logged.
        let mut failed_passes = 0u64;
        // Set when the next pass should run at once: the reserve was just spent for it, or a
        // pass limited to one segment (the reserve being spent) deleted one and more may wait.
        let mut again = false;
        // Hold the reserve from the start, not only from the first pass.
        self.keep_reserve().await;
        loop {
            if !again {
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(COMPACTION_INTERVAL) => {}
                }
            } else if *stop.borrow() {
                return;
            }
            // While passes spend what the reserve gave back, making it again would take that
            // space from them; it is made again once a pass finds nothing more to delete.
            if !again {
                self.keep_reserve().await;
            }
            again = false;
            self.refresh_gauges();
            let one_segment = self.reserve.is_spent();
            match self.pass(one_segment).await {
                Ok(freed) => {
                    if failed_passes > 0 {
                        tracing::info!(failed_passes, "compaction passes succeed again");
                        failed_passes = 0;
                    }
                    again = one_segment && freed > 0;
                }
                Err(CompactionError::NoSpace(_))
                    if reserve::spend_when_full(Some(&self.reserve), "compaction").await =>
                {
                    again = true;
                }
                Err(e) => {
                    self.metrics.compaction_errors_total.inc();
                    if failed_passes == 0 {
                        tracing::error!(error = %e, "compaction pass failed; segments are kept and it will retry");
                    } else {
                        tracing::debug!(error = %e, failed_passes, "compaction pass failed again");
                    }
                    failed_passes += 1;
                }
            }
        }
    }

    /// Makes the reserve if it is not held and there is room (see [`reserve`]).
    async fn keep_reserve(&self) {
        let reserve = self.reserve.clone();
        let dir = self.dedup_dir.clone();
        let kept = tokio::task::spawn_blocking(move || {
            let free = crate::ingest::backpressure::filesystem_free_bytes(&dir)?;
            reserve.keep(free)
        })
        .await;
        match kept {
            Ok(Ok(_)) => {}
            // Not holding the reserve costs nothing until the filesystem is full; the next
            // pass tries again.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "could not make the disk reserve");
            }
            Err(e) => tracing::warn!(error = %e, "the disk reserve task failed"),
        }
    }

    fn refresh_gauges(&self) {
        self.gauges().refresh(&self.metrics);
    }

    /// What computes this compactor's pending-work gauges, for [`Metrics::render`] to refresh
    /// them at each scrape as well.
    pub fn gauges(&self) -> PendingGauges {
        PendingGauges {
            spool: self.spool.clone(),
            ledger: self.ledger.clone(),
            ring: self.ring.clone(),
        }
    }

    /// One pass: find the deletable prefix, checkpoint the chain heads and the dedup entries,
    /// delete. With `one_segment`, the prefix is cut to its first segment, which bounds the
    /// dedup checkpoint to one segment's entries. Returns the bytes freed.
    pub async fn pass(&self, one_segment: bool) -> Result<u64, CompactionError> {
        let segments = self.spool.segments();
        let ids: Vec<u64> = segments.iter().map(|s| s.id).collect();
        let Some(&active) = ids.last() else {
            return Ok(0);
        };
        let Some(mut below) = self.ledger.compactable_below(&ids, active) else {
            return Ok(0);
        };
        if one_segment {
            // Up to the next present segment, not `ids[0] + 1`: after a gap (a segment
            // removed by something else) that id names no file, and `first_kept` must name the
            // oldest segment kept.
            below = below.min(ids.get(1).copied().unwrap_or(below));
        }
        let mut snapshot = self
            .chains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // What the next start checks the oldest segment against (see `Chains::first_kept`).
        snapshot.first_kept = Some(below);
        let path = self.heads_path.clone();
        let spool = self.spool.clone();
        let ingest = self.ingest.clone();
        let dedup_dir = self.dedup_dir.clone();
        let from = self.dedup_checkpointed_below.load(Ordering::SeqCst);
        let checkpoints = self.dedup_checkpoints.clone();
        let window_ms = self
            .ingest
            .config
            .ingest
            .dedup_window_secs
            .saturating_mul(1000);
        let entries_max = self.ingest.config.ingest.dedup_entries_max;
        let freed = tokio::task::spawn_blocking(move || -> Result<u64, CompactionError> {
            snapshot.save(&path).map_err(|e| {
                let no_space = matches!(&e, crate::chain::ChainError::Io { source, .. } if is_no_space(source));
                CompactionError::checkpoint(no_space, e.to_string())
            })?;
            // The index walk takes the dedup lock briefly per pass; it runs here, off the
            // async workers, because it is proportional to the index size.
            let now_ms = crate::ingest::now_ms();
            let entries = ingest.dedup.entries_in_segments(from, below, now_ms);
            let mut checkpoints = checkpoints.lock().unwrap_or_else(|p| p.into_inner());
            if !entries.is_empty() {
                let path =
                    dedup_file::write(&dedup_dir, below, now_ms, &entries).map_err(|e| {
                        let no_space = matches!(&e, dedup_file::DedupFileError::Io { source, .. } if is_no_space(source));
                        CompactionError::checkpoint(no_space, e.to_string())
                    })?;
                checkpoints.push(dedup_file::Checkpoint {
                    path,
                    written_ms: now_ms,
                    entries: entries.len(),
                });
            }
            let freed = spool.remove_segments_below(below)?;
            // An obsolete checkpoint is only disk; failing to remove one must not fail the
            // pass that already deleted segments. Such a file is found again at the next start.
            for obsolete in checkpoints.take_obsolete(now_ms, window_ms, entries_max) {
                if let Err(e) = std::fs::remove_file(&obsolete.path) {
                    tracing::warn!(path = %obsolete.path.display(), error = %e, "could not remove an obsolete dedup checkpoint");
                }
            }
            Ok(freed)
        })
        .await
        .map_err(|e| CompactionError::Task(e.to_string()))??;
        self.dedup_checkpointed_below
            .fetch_max(below, Ordering::SeqCst);
        self.ledger.forget_below(below);
        let deleted = ids.iter().filter(|&&id| id < below).count() as u64;
        tracing::info!(
            segments = deleted,
            bytes = freed,
            first_kept = below,
            "compaction deleted completed segments"
        );
        self.refresh_gauges();
        Ok(freed)
    }
}

/// The gauges of pending work (`spoolgate_spool_pending_records`, `..._pending_bytes`,
/// `..._oldest_pending_age_seconds`, `spoolgate_spool_segments`), computed from the ledger, the
/// ring and the spool. The compaction loop refreshes them after each pass; the daemon also has
/// every scrape refresh them, so that a scrape between passes (up to [`COMPACTION_INTERVAL`]
/// apart when no tombstone wakes the loop) does not read figures from before a change: a
/// backlog that has just built up must not read as empty.
#[derive(Clone)]
pub struct PendingGauges {
    spool: Spool,
    ledger: Arc<Ledger>,
    ring: Arc<Ring>,
}

impl PendingGauges {
    pub fn refresh(&self, m: &Metrics) {
        // Envelopes the dispatcher has not read yet (all of them with forwarding disabled, or
        // while it waits for room) are pending too, though not in the ledger; the ring knows
        // them. The ledger's figures and its count of what was read come from one snapshot,
        // so that no envelope is counted both in the ledger and as unread.
        let mut stats = (0, 0, None);
        let unread = self.ring.unread_with(|| {
            let (pending, read_envelopes, read_bytes) = self.ledger.pending_snapshot();
            stats = pending;
            (read_envelopes, read_bytes)
        });
        let (pending, bytes, oldest) = stats;
        m.spool_pending_records
            .set((pending + unread.envelopes) as i64);
        m.spool_pending_bytes.set((bytes + unread.bytes) as i64);
        let oldest = match (oldest, unread.oldest_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let age = oldest.map_or(0.0, |since| {
            crate::ingest::now_ms().saturating_sub(since) as f64 / 1000.0
        });
        m.spool_oldest_pending_age_seconds.set(age);
        m.spool_segments_active
            .set(self.spool.segments().len() as i64);
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
}

#[derive(Debug, thiserror::Error)]
pub enum CompactionError {
    #[error("checkpoint before deletion failed: {0}")]
    Checkpoint(String),
    /// A checkpoint could not be written because the filesystem is full (ENOSPC).
    #[error("checkpoint before deletion failed, the filesystem is full: {0}")]
    NoSpace(String),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("blocking task failed: {0}")]
    Task(String),
}

impl CompactionError {
    fn checkpoint(no_space: bool, message: String) -> CompactionError {
        if no_space {
            CompactionError::NoSpace(message)
        } else {
            CompactionError::Checkpoint(message)
        }
    }
}
