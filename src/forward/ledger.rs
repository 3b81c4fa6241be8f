//! The ledger: the consumer's in-memory view of which acknowledged envelopes are still pending,
//! which of them are already sealed (their chain output is durable), and how many envelopes of
//! each segment are complete — the facts replay, takeover and compaction decide by.
//!
//! It is rebuilt at start-up by one pass over the spool ([`scan`]): every envelope record is
//! pending until a tombstone record names its position; every seal record's entries are sealed
//! until tombstoned. Tombstones always follow the envelope they complete in log order (they are
//! written after it was read back), so a single forward pass is enough.
//!
//! Bounds: the ledger holds one small entry per pending envelope plus one forward record per
//! sealed-but-unconfirmed envelope. Pending entries are bounded by the spool's quota
//! (`spool.quota_hard_bytes` over the smallest record); sealed entries by
//! `forward.workers × (1 + TOMBSTONES_IN_FLIGHT_MAX) × forward.batch_records_max`, since a
//! worker seals one batch at a time and keeps at most `TOMBSTONES_IN_FLIGHT_MAX` (4) confirmed
//! batches whose tombstones are still being written.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::chain::{ForwardRecord, SealedBatch, SharedRecord, Tombstone};
use crate::envelope::Envelope;
use crate::spool::{Position, RecordKind, Spool, SpoolError};

/// A pending envelope's bookkeeping.
#[derive(Debug, Clone, Copy)]
pub struct PendingInfo {
    /// When it was acknowledged, as well as spoolgate knows: its `ts_ms`, never later than
    /// the time it was first read by the consumer.
    pub since_ms: u64,
    pub bytes: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SegmentTally {
    pub envelopes: u64,
    pub done: u64,
}

#[derive(Default)]
struct Inner {
    pending: BTreeMap<Position, PendingInfo>,
    pending_bytes: u64,
    /// Hashed with foldhash: positions are spoolgate's own, and SipHash showed in profiles.
    sealed: HashMap<Position, SharedRecord, foldhash::fast::RandomState>,
    tallies: BTreeMap<u64, SegmentTally>,
    /// Every envelope before this position has been counted into `tallies`.
    counted_up_to: Position,
}

#[derive(Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
    /// Envelopes added after the start-up scan (read live by the dispatcher).
    live_added: std::sync::atomic::AtomicU64,
}

/// What the start-up scan found besides the ledger.
#[derive(Debug, Default)]
pub struct ScanSummary {
    pub envelopes: u64,
    pub pending: u64,
    pub sealed: u64,
    pub tombstoned: u64,
    /// Envelope or control records whose payload did not decode although their CRC held.
    pub undecodable: u64,
    pub end: Position,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each critical section finishes its mutation before anything can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a newly read envelope as pending (idempotent: a rewind re-reads envelopes).
    pub fn add_pending(&self, position: Position, info: PendingInfo) {
        let mut inner = self.lock();
        Self::add_pending_locked(&mut inner, &self.live_added, position, info);
    }

    fn add_pending_locked(
        inner: &mut Inner,
        live_added: &std::sync::atomic::AtomicU64,
        position: Position,
        info: PendingInfo,
    ) {
        if position < inner.counted_up_to {
            return;
        }
        if inner.counted_up_to != Position::default() {
            live_added.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        inner.tallies.entry(position.segment).or_default().envelopes += 1;
        inner.pending_bytes += u64::from(info.bytes);
        inner.pending.insert(position, info);
    }

    /// [`Ledger::add_pending`] then [`Ledger::counted_up_to`]`(next)` under one lock: what the
    /// dispatcher does for every live envelope.
    pub fn add_live(&self, position: Position, info: PendingInfo, next: Position) {
        let mut inner = self.lock();
        Self::add_pending_locked(&mut inner, &self.live_added, position, info);
        if next > inner.counted_up_to {
            inner.counted_up_to = next;
        }
    }

    /// Marks every envelope before `position` as counted.
    pub fn counted_up_to(&self, position: Position) {
        let mut inner = self.lock();
        if position > inner.counted_up_to {
            inner.counted_up_to = position;
        }
    }

    pub fn counted_position(&self) -> Position {
        self.lock().counted_up_to
    }

    pub fn is_pending(&self, position: Position) -> bool {
        self.lock().pending.contains_key(&position)
    }

    pub fn sealed(&self, position: Position) -> Option<SharedRecord> {
        self.lock().sealed.get(&position).cloned()
    }

    pub fn record_sealed(&self, entries: impl IntoIterator<Item = (Position, SharedRecord)>) {
        let mut inner = self.lock();
        for (p, r) in entries {
            inner.sealed.insert(p, r);
        }
    }

    /// Marks positions complete (their tombstone is written).
    pub fn complete(&self, positions: &[Position]) {
        // The sealed records usually hold their last reference here; freeing them (envelope,
        // gate output) is the larger part of this call, so it happens after the lock is
        // released, where the dispatcher and the other workers do not wait for it.
        let mut released = Vec::with_capacity(positions.len());
        {
            let mut inner = self.lock();
            for p in positions {
                released.extend(inner.sealed.remove(p));
                if let Some(info) = inner.pending.remove(p) {
                    inner.pending_bytes -= u64::from(info.bytes);
                    inner.tallies.entry(p.segment).or_default().done += 1;
                }
            }
        }
        drop(released);
    }

    /// Pending count, pending bytes, and the oldest pending record's `since_ms`.
    pub fn pending_stats(&self) -> (u64, u64, Option<u64>) {
        let inner = self.lock();
        let oldest = inner.pending.values().next().map(|i| i.since_ms);
        (inner.pending.len() as u64, inner.pending_bytes, oldest)
    }

    /// The longest prefix of `segments` (ids ascending) whose envelopes are all complete and
    /// which the consumer has read past. Returns the first id that must be kept.
    pub fn compactable_below(&self, segments: &[u64], active: u64) -> Option<u64> {
        let inner = self.lock();
        let mut keep_from = None;
        for &id in segments {
            let read_past = id < inner.counted_up_to.segment;
            let complete = inner.tallies.get(&id).is_none_or(|t| t.done == t.envelopes);
            if id >= active || !read_past || !complete {
                keep_from = Some(id);
                break;
            }
        }
        let first_kept = keep_from.unwrap_or(active);
        match segments.first() {
            Some(&first) if first < first_kept => Some(first_kept),
            _ => None,
        }
    }

    /// Forgets the tallies of deleted segments.
    pub fn forget_below(&self, segment: u64) {
        let mut inner = self.lock();
        inner.tallies = inner.tallies.split_off(&segment);
    }

    pub fn live_added(&self) -> u64 {
        self.live_added.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn sealed_len(&self) -> usize {
        self.lock().sealed.len()
    }
}

/// Rebuilds the ledger from the spool in one pass, calling `on_envelope` for every envelope
/// record that decodes (the dedup index is rebuilt from the same pass) and `on_seal` for every
/// sealed record (to advance chain heads).
pub fn scan(
    spool: &Spool,
    ledger: &Ledger,
    now_ms: u64,
    mut on_envelope: impl FnMut(&Envelope, Position),
    mut on_seal: impl FnMut(&ForwardRecord),
) -> Result<ScanSummary, SpoolError> {
    let mut summary = ScanSummary::default();
    let mut reader = spool.reader(spool.first_position());
    while let Some(record) = reader.next_record()? {
        summary.end = record.next;
        match record.kind {
            RecordKind::ENVELOPE => {
                summary.envelopes += 1;
                let since_ms = match Envelope::decode(&record.payload) {
                    Ok(env) => {
                        on_envelope(&env, record.position);
                        env.ts_ms.min(now_ms)
                    }
                    Err(_) => {
                        summary.undecodable += 1;
                        now_ms
                    }
                };
                ledger.add_pending(
                    record.position,
                    PendingInfo {
                        since_ms,
                        bytes: record.payload.len() as u32,
                    },
                );
            }
            RecordKind::SEALED => match SealedBatch::decode(&record.payload) {
                Ok(batch) => {
                    for entry in batch.entries {
                        on_seal(&entry.record);
                        if ledger.is_pending(entry.position) {
                            ledger.record_sealed([(
                                entry.position,
                                std::sync::Arc::new(entry.record),
                            )]);
                        }
                    }
                }
                Err(e) => {
                    // A seal that does not decode cannot be re-forwarded identically. Its
                    // envelopes will be sealed afresh; report it loudly.
                    summary.undecodable += 1;
                    tracing::error!(segment = record.position.segment, offset = record.position.offset, error = %e, "seal record does not decode");
                }
            },
            RecordKind::TOMBSTONE => match Tombstone::decode(&record.payload) {
                Ok(t) => {
                    summary.tombstoned += t.positions.len() as u64;
                    ledger.complete(&t.positions);
                }
                Err(e) => {
                    summary.undecodable += 1;
                    tracing::error!(segment = record.position.segment, offset = record.position.offset, error = %e, "tombstone record does not decode; its records will be forwarded again");
                }
            },
            _ => {}
        }
    }
    if summary.end == Position::default() {
        summary.end = spool.first_position();
    }
    ledger.counted_up_to(summary.end);
    let (pending, _, _) = ledger.pending_stats();
    summary.pending = pending;
    summary.sealed = ledger.sealed_len() as u64;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(segment: u64, offset: u64) -> Position {
        Position { segment, offset }
    }

    fn info() -> PendingInfo {
        PendingInfo {
            since_ms: 1,
            bytes: 10,
        }
    }

    #[test]
    fn completing_every_envelope_of_a_read_segment_makes_it_compactable() {
        let l = Ledger::default();
        l.add_pending(p(1, 64), info());
        l.add_pending(p(2, 64), info());
        l.counted_up_to(p(3, 64));
        assert_eq!(l.compactable_below(&[1, 2, 3], 3), None);
        l.complete(&[p(1, 64)]);
        assert_eq!(l.compactable_below(&[1, 2, 3], 3), Some(2));
        l.complete(&[p(2, 64)]);
        assert_eq!(l.compactable_below(&[1, 2, 3], 3), Some(3));
    }

    #[test]
    fn the_active_segment_and_unread_segments_are_never_compactable() {
        let l = Ledger::default();
        l.counted_up_to(p(2, 0));
        assert_eq!(l.compactable_below(&[1, 2, 3], 3), Some(2));
        assert_eq!(l.compactable_below(&[3], 3), None);
    }

    #[test]
    fn a_rewind_does_not_count_envelopes_twice() {
        let l = Ledger::default();
        l.add_pending(p(1, 64), info());
        l.counted_up_to(p(1, 100));
        l.add_pending(p(1, 64), info());
        assert_eq!(l.pending_stats().0, 1);
        l.complete(&[p(1, 64)]);
        assert_eq!(l.pending_stats(), (0, 0, None));
    }

    #[test]
    fn adding_a_live_envelope_counts_it_once_and_moves_the_counted_position() {
        let l = Ledger::default();
        l.add_live(p(1, 64), info(), p(1, 100));
        assert_eq!(l.counted_position(), p(1, 100));
        assert!(l.is_pending(p(1, 64)));
        // Read again after a rewind: below the counted position, so not counted twice.
        l.add_live(p(1, 64), info(), p(1, 100));
        assert_eq!(l.pending_stats().0, 1);
        l.add_live(p(1, 100), info(), p(1, 150));
        assert_eq!(l.counted_position(), p(1, 150));
        assert_eq!(l.pending_stats().0, 2);
    }
}
