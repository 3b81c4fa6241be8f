//! The ledger: the consumer's in-memory view of which acknowledged envelopes are still pending,
//! which of them are already sealed (their chain output is durable), and how many envelopes of
//! each segment are complete — the facts replay, takeover and compaction decide by.
//!
//! It is rebuilt at start-up by one pass over the spool ([`scan`]): every envelope record is
//! pending until a tombstone record names its position; every seal record's entries are sealed
//! until tombstoned. Tombstones always follow the envelope they complete in log order (they are
//! written after it was read back), so a single forward pass is enough.
//!
//! An **orphan** is a sealed, untombstoned envelope whose own record the scan did not find in
//! a segment that is there: its frame was damaged after its seal was durable. The seal holds
//! everything it is forwarded as, so it is counted pending at its position and the dispatcher
//! re-sends it from the seal where its record was, in log order (see
//! [`Ledger::orphans_between`]): the damage costs it nothing. Being pending in a segment that is
//! there, it keeps that segment and every later one (its seal's among them) from compaction,
//! and every rewind, which starts at the first segment, comes back to it. Envelopes of a
//! segment that is missing (removed by something other than compaction) are not orphans: they
//! are lost with their segment, which recovery reports. Orphans are found at the end of the
//! scan (a tombstone later in the log may still name them) and kept to [`ORPHANS_MAX`].
//!
//! Bounds: the ledger holds one small entry per pending envelope plus one forward record per
//! sealed-but-unconfirmed envelope (orphans included). Pending entries are bounded by the spool's quota
//! (`spool.quota_hard_bytes` over the smallest record), which is why each is kept small: 24
//! bytes in a per-segment array in log order (offset, payload bytes, since when, done), where
//! a map keyed by position cost about 100 bytes per envelope (measured with
//! `scripts/bench-replay.sh`), about 350 MB for a spool of 1 KiB envelopes at the default
//! 4 GiB quota, at the moment a restart has to replay it. Sealed entries are bounded by
//! `forward.workers × (1 + TOMBSTONES_IN_FLIGHT_MAX) × forward.batch_records_max`, since a
//! worker seals one batch at a time and keeps at most `TOMBSTONES_IN_FLIGHT_MAX` (4) confirmed
//! batches whose tombstones are still being written.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::chain::{ChainHead, SealedBatch, SharedRecord, Tombstone};

/// Orphans (see the module doc) a start keeps, and seals naming unknown positions the scan
/// holds until their tombstones show up: damage would have to reach this many sealed,
/// undelivered envelopes at once, which the sealed bound above keeps far off. Past it, the
/// rest are lost with the damage, as before orphans were re-sent, and said so.
pub const ORPHANS_MAX: usize = 65_536;
use crate::envelope::Envelope;
use crate::spool::{Position, RecordKind, RecordView, Spool, SpoolError};

/// A pending envelope's bookkeeping.
#[derive(Debug, Clone, Copy)]
pub struct PendingInfo {
    /// When it was acknowledged, as well as spoolgate knows: its `ts_ms`, never later than
    /// the time it was first read by the consumer.
    pub since_ms: u64,
    pub bytes: u32,
}

/// One envelope of a segment: where it is, its payload bytes, since when it is pending, and
/// whether its tombstone is written. 24 bytes. (The offset stays 64-bit: spoolgate writes no
/// segment past 4 GiB, but a segment file is not trusted to be one it wrote.)
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    since_ms: u64,
    bytes: u32,
    done: bool,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 24);

/// The envelopes of one segment in log order, complete or not, until compaction deletes the
/// segment. Envelopes are counted in log order (see [`Ledger::add_pending`]), so `entries`
/// is sorted by offset and found by binary search.
#[derive(Debug, Default)]
struct SegmentLedger {
    entries: Vec<Entry>,
    done_count: usize,
    /// Every entry before this index is done; moved forward lazily by `pending_stats`.
    first_open: usize,
}

impl SegmentLedger {
    /// Where the envelope at `offset` is (`Ok`), or would go (`Err`).
    fn search(&self, offset: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&offset, |e| e.offset)
    }

    fn find(&self, offset: u64) -> Option<usize> {
        self.search(offset).ok()
    }

    fn is_complete(&self) -> bool {
        self.done_count == self.entries.len()
    }
}

#[derive(Default)]
struct Inner {
    /// Every counted envelope, by segment: pending until its tombstone is written, then done
    /// until compaction deletes its segment ([`Ledger::forget_below`]).
    segments: BTreeMap<u64, SegmentLedger>,
    pending_count: u64,
    pending_bytes: u64,
    /// Hashed with foldhash: positions are spoolgate's own, and SipHash showed in profiles.
    sealed: HashMap<Position, SharedRecord, foldhash::fast::RandomState>,
    /// Every envelope before this position has been counted into `segments`.
    counted_up_to: Position,
    /// Pending orphans (see the module doc), until their tombstone is written.
    orphans: std::collections::BTreeSet<Position>,
}

#[derive(Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
    /// Envelopes added after the start-up scan (read live by the dispatcher), and their
    /// payload bytes: what the ring's timeline counts as read.
    live_added: std::sync::atomic::AtomicU64,
    live_added_bytes: std::sync::atomic::AtomicU64,
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
    /// Orphans found (see the module doc), re-sent from their seals.
    pub orphans: u64,
    /// Orphans past [`ORPHANS_MAX`], lost with the damage.
    pub orphans_dropped: u64,
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
        Self::add_pending_locked(&mut inner, self.live_counters(), position, info);
    }

    fn add_pending_locked(
        inner: &mut Inner,
        (live_added, live_added_bytes): (
            &std::sync::atomic::AtomicU64,
            &std::sync::atomic::AtomicU64,
        ),
        position: Position,
        info: PendingInfo,
    ) {
        if position < inner.counted_up_to {
            return;
        }
        let offset = position.offset;
        if !inner.segments.contains_key(&position.segment) {
            // The segment counted so far is complete: its array keeps its final length, not
            // the doubling slack of its growth.
            if let Some((_, last)) = inner.segments.iter_mut().next_back() {
                last.entries.shrink_to_fit();
            }
        }
        let segment = inner.segments.entry(position.segment).or_default();
        let entry = Entry {
            offset,
            since_ms: info.since_ms,
            bytes: info.bytes,
            done: false,
        };
        match segment.entries.last() {
            Some(last) if last.offset >= offset => {
                // Not reached by the dispatcher, which counts in log order; kept correct
                // rather than assumed, since a miscount would stall compaction.
                match segment.search(offset) {
                    Ok(_) => return,
                    Err(i) => {
                        segment.entries.insert(i, entry);
                        segment.first_open = segment.first_open.min(i);
                    }
                }
            }
            _ => segment.entries.push(entry),
        }
        if inner.counted_up_to != Position::default() {
            live_added_bytes.fetch_add(u64::from(info.bytes), std::sync::atomic::Ordering::Relaxed);
            live_added.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        inner.pending_count += 1;
        inner.pending_bytes += u64::from(info.bytes);
    }

    /// [`Ledger::add_pending`] then [`Ledger::counted_up_to`]`(next)` under one lock: what the
    /// dispatcher does for every live envelope.
    pub fn add_live(&self, position: Position, info: PendingInfo, next: Position) {
        let mut inner = self.lock();
        Self::add_pending_locked(&mut inner, self.live_counters(), position, info);
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

    /// Whether the envelope at `position` was counted at all, pending or done.
    pub fn is_known(&self, position: Position) -> bool {
        let inner = self.lock();
        inner
            .segments
            .get(&position.segment)
            .is_some_and(|s| s.find(position.offset).is_some())
    }

    /// Counts an orphan (see the module doc) pending at its position, with its seal.
    pub fn add_orphan(&self, position: Position, info: PendingInfo, seal: SharedRecord) {
        let mut inner = self.lock();
        let segment = inner.segments.entry(position.segment).or_default();
        let i = match segment.search(position.offset) {
            Ok(_) => return,
            Err(i) => i,
        };
        segment.entries.insert(
            i,
            Entry {
                offset: position.offset,
                since_ms: info.since_ms,
                bytes: info.bytes,
                done: false,
            },
        );
        segment.first_open = segment.first_open.min(i);
        inner.pending_count += 1;
        inner.pending_bytes += u64::from(info.bytes);
        inner.sealed.insert(position, seal);
        inner.orphans.insert(position);
    }

    /// The pending orphans at positions in `[from, to)`, in log order: the dispatcher sends
    /// each where its record would have been read.
    pub fn orphans_between(&self, from: Position, to: Position) -> Vec<Position> {
        if from >= to {
            return Vec::new();
        }
        self.lock().orphans.range(from..to).copied().collect()
    }

    pub fn is_pending(&self, position: Position) -> bool {
        let inner = self.lock();
        let Some(segment) = inner.segments.get(&position.segment) else {
            return false;
        };
        segment
            .find(position.offset)
            .is_some_and(|i| !segment.entries[i].done)
    }

    pub fn sealed(&self, position: Position) -> Option<SharedRecord> {
        self.lock().sealed.get(&position).cloned()
    }

    /// `None` when the record is not pending; otherwise its seal, if it has one: both read
    /// under one lock. Read apart, a tombstone completing the record in between (one a failed
    /// worker left running) would show it pending and unsealed, and it would be sealed again
    /// under a new sequence number and forwarded twice, differently.
    pub fn pending_seal(&self, position: Position) -> Option<Option<SharedRecord>> {
        let inner = self.lock();
        let segment = inner.segments.get(&position.segment)?;
        let i = segment.find(position.offset)?;
        if segment.entries[i].done {
            return None;
        }
        Some(inner.sealed.get(&position).cloned())
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
            let mut guard = self.lock();
            let inner = &mut *guard;
            for p in positions {
                released.extend(inner.sealed.remove(p));
                inner.orphans.remove(p);
                // A tombstone may name an envelope already complete (written twice after a
                // rewind) or in a segment compaction deleted: nothing to count then.
                let Some(segment) = inner.segments.get_mut(&p.segment) else {
                    continue;
                };
                let Some(i) = segment.find(p.offset) else {
                    continue;
                };
                let entry = &mut segment.entries[i];
                if !entry.done {
                    entry.done = true;
                    segment.done_count += 1;
                    inner.pending_count -= 1;
                    inner.pending_bytes -= u64::from(entry.bytes);
                }
            }
        }
        drop(released);
    }

    /// Pending count, pending bytes, and the oldest pending record's `since_ms`.
    pub fn pending_stats(&self) -> (u64, u64, Option<u64>) {
        Self::pending_stats_locked(&mut self.lock())
    }

    /// [`Ledger::pending_stats`] with [`Ledger::live_added`] and [`Ledger::live_added_bytes`]
    /// as of the same moment (they change only under the same lock): what the pending gauges
    /// need to add the envelopes not read yet without counting one twice.
    pub fn pending_snapshot(&self) -> ((u64, u64, Option<u64>), u64, u64) {
        let mut inner = self.lock();
        let stats = Self::pending_stats_locked(&mut inner);
        (stats, self.live_added(), self.live_added_bytes())
    }

    fn pending_stats_locked(inner: &mut Inner) -> (u64, u64, Option<u64>) {
        let mut oldest = None;
        for segment in inner.segments.values_mut() {
            while segment.first_open < segment.entries.len()
                && segment.entries[segment.first_open].done
            {
                segment.first_open += 1;
            }
            if let Some(entry) = segment.entries.get(segment.first_open) {
                oldest = Some(entry.since_ms);
                break;
            }
        }
        (inner.pending_count, inner.pending_bytes, oldest)
    }

    /// The longest prefix of `segments` (ids ascending) whose envelopes are all complete and
    /// which the consumer has read past. Returns the first id that must be kept.
    pub fn compactable_below(&self, segments: &[u64], active: u64) -> Option<u64> {
        let inner = self.lock();
        let mut keep_from = None;
        for &id in segments {
            let read_past = id < inner.counted_up_to.segment;
            let complete = inner
                .segments
                .get(&id)
                .is_none_or(SegmentLedger::is_complete);
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

    /// Forgets the envelopes of deleted segments (all complete: compaction deletes no other).
    pub fn forget_below(&self, segment: u64) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let kept = inner.segments.split_off(&segment);
        let forgotten = std::mem::replace(&mut inner.segments, kept);
        for (id, ledger) in forgotten {
            if ledger.is_complete() {
                continue;
            }
            debug_assert!(false, "segment {id} deleted with pending envelopes");
            // Should a pending envelope leave with its segment all the same, the totals must
            // not keep counting it.
            for entry in &ledger.entries {
                if !entry.done {
                    inner.pending_count -= 1;
                    inner.pending_bytes -= u64::from(entry.bytes);
                }
            }
        }
    }

    pub fn live_added(&self) -> u64 {
        self.live_added.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn live_added_bytes(&self) -> u64 {
        self.live_added_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn live_counters(&self) -> (&std::sync::atomic::AtomicU64, &std::sync::atomic::AtomicU64) {
        (&self.live_added, &self.live_added_bytes)
    }

    pub fn sealed_len(&self) -> usize {
        self.lock().sealed.len()
    }
}

/// When a record found at start-up was acknowledged, as best the spool tells: the client's
/// `ts_ms` (clients stamp envelopes as they send them), but never before its segment was
/// created (a client that backfills, or sends `ts_ms` 0, would otherwise make the backlog look
/// days old and fire the backlog alerts) and never in the future.
pub fn acknowledged_since(ts_ms: u64, segment_created_ms: Option<u64>, now_ms: u64) -> u64 {
    let since = ts_ms.min(now_ms);
    match segment_created_ms {
        Some(created) => since.max(created.min(now_ms)),
        None => since,
    }
}

/// Rebuilds the ledger from the spool in one pass, calling `on_envelope` for every envelope
/// record that decodes (the dedup index is rebuilt from the same pass) and `on_head` for every
/// sealed entry and every head a tombstone records (to advance chain heads: the caller keeps
/// the highest per stream). The daemon does the same during recovery
/// (`Spool::open_visiting` with a [`Scan`]), without reading the spool a second time.
pub fn scan(
    spool: &Spool,
    ledger: &Ledger,
    now_ms: u64,
    mut on_envelope: impl FnMut(&Envelope, Position),
    mut on_head: impl FnMut(&str, ChainHead),
) -> Result<ScanSummary, SpoolError> {
    let oldest = spool.segments().first().map(|s| s.id);
    let mut scan = Scan::new(ledger, now_ms, oldest);
    let mut reader = spool.reader(spool.first_position());
    while let Some(record) = reader.next_record()? {
        scan.record(
            RecordView {
                position: record.position,
                kind: record.kind,
                payload: &record.payload,
                next: record.next,
                segment_created_ms: None,
            },
            &mut on_envelope,
            &mut on_head,
        );
    }
    let segments: Vec<u64> = spool.segments().iter().map(|s| s.id).collect();
    Ok(scan.finish(spool.first_position(), &segments, on_envelope))
}

/// Pending envelopes of one segment, as the start-up scan counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentPending {
    /// Envelopes no tombstone names, orphans included: what compaction waits for.
    pub pending: u64,
    /// Of those, orphans (see the module doc): sealed envelopes whose own frame is damaged,
    /// which the next start re-sends from their seals.
    pub orphans: u64,
}

/// For `spoolgate inspect`: the pending envelopes of each segment in the spool directory `dir`,
/// read offline (no lock taken, nothing changed). The frames go through the start-up [`Scan`]
/// itself, not a copy of its rules, so inspect counts what a start would replay, orphans
/// included: an envelope is pending until a tombstone names it, a tombstone that does not
/// decode completes nothing, and a sealed, untombstoned entry whose envelope frame was not
/// found in a segment that is there is pending at its position. Memory is the ledger's 24
/// bytes per envelope, the sealed records of the pending envelopes, and one segment.
pub fn pending_in_spool(
    dir: &std::path::Path,
) -> Result<BTreeMap<u64, SegmentPending>, SpoolError> {
    let segments = crate::spool::segment_ids(dir)?;
    let ledger = Ledger::default();
    let mut scan = Scan::new(&ledger, 0, segments.first().copied());
    let (mut on_envelope, mut on_head) = (|_: &Envelope, _: Position| {}, |_: &str, _| {});
    crate::spool::for_each_frame(dir, |position, kind, payload| {
        scan.record(
            RecordView {
                position,
                kind: RecordKind(kind),
                payload,
                // The scan reads `next` only to know where it ended, which inspect does not
                // use; the frame's stored length, which would give it, is not at hand here.
                next: position,
                segment_created_ms: None,
            },
            &mut on_envelope,
            &mut on_head,
        );
        Ok::<(), SpoolError>(())
    })?;
    // Where an empty scan ends does not matter either: nothing is read after it.
    scan.finish(Position::default(), &segments, on_envelope);
    let inner = ledger.lock();
    let mut pending: BTreeMap<u64, SegmentPending> = inner
        .segments
        .iter()
        .map(|(&id, s)| {
            let counts = SegmentPending {
                pending: (s.entries.len() - s.done_count) as u64,
                orphans: 0,
            };
            (id, counts)
        })
        .collect();
    for position in &inner.orphans {
        pending.entry(position.segment).or_default().orphans += 1;
    }
    Ok(pending)
}

/// The pending envelopes of each segment in `dir`, orphans included, as
/// [`pending_in_spool`] counts them.
pub fn pending_by_segment(dir: &std::path::Path) -> Result<BTreeMap<u64, u64>, SpoolError> {
    Ok(pending_in_spool(dir)?
        .into_iter()
        .map(|(id, counts)| (id, counts.pending))
        .collect())
}

/// The start-up scan, one record at a time in log order: every envelope is counted pending,
/// seals attach their forward records to the envelopes still pending, tombstones complete
/// them.
pub struct Scan<'l> {
    ledger: &'l Ledger,
    now_ms: u64,
    summary: ScanSummary,
    /// Seal entries, not tombstoned so far, of envelopes the scan has not counted: orphans,
    /// unless a tombstone later in the log names them (see the module doc).
    orphans: BTreeMap<Position, SharedRecord>,
    /// The oldest segment in the spool directory: seals naming envelopes of an earlier one
    /// name what compaction deleted, all tombstoned, and are not orphans. Not the segment of
    /// the first record the scan reads: when no record of the oldest segment can be read (its
    /// frames all damaged, or the file cut short), a sealed, undelivered envelope of it would
    /// be taken for one compaction deleted, not re-sent, and its segment let go.
    oldest_segment: u64,
}

impl<'l> Scan<'l> {
    /// `oldest_segment`: the oldest segment present (see [`crate::spool::oldest_segment`]),
    /// `None` when there is none.
    pub fn new(ledger: &'l Ledger, now_ms: u64, oldest_segment: Option<u64>) -> Scan<'l> {
        Scan {
            ledger,
            now_ms,
            summary: ScanSummary::default(),
            orphans: BTreeMap::new(),
            // With no segment there is no record to scan either.
            oldest_segment: oldest_segment.unwrap_or(0),
        }
    }

    pub fn record(
        &mut self,
        record: RecordView<'_>,
        on_envelope: &mut impl FnMut(&Envelope, Position),
        on_head: &mut impl FnMut(&str, ChainHead),
    ) {
        let (ledger, summary) = (self.ledger, &mut self.summary);
        summary.end = record.next;
        match record.kind {
            RecordKind::ENVELOPE => {
                summary.envelopes += 1;
                // Only the id, stream, slot and time are needed here; the dispatcher decodes
                // the whole envelope when it forwards it.
                let since_ms = match Envelope::decode_without_text(record.payload) {
                    Ok(env) => {
                        on_envelope(&env, record.position);
                        acknowledged_since(env.ts_ms, record.segment_created_ms, self.now_ms)
                    }
                    Err(_) => {
                        summary.undecodable += 1;
                        self.now_ms
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
            RecordKind::SEALED => match SealedBatch::decode(record.payload) {
                Ok(batch) => {
                    for entry in batch.entries {
                        if let Some(head) = entry.record.chain_head() {
                            on_head(&entry.record.stream, head);
                        }
                        if ledger.is_pending(entry.position) {
                            ledger.record_sealed([(
                                entry.position,
                                std::sync::Arc::new(entry.record),
                            )]);
                        } else if entry.position.segment >= self.oldest_segment
                            && !ledger.is_known(entry.position)
                        {
                            if self.orphans.len() < ORPHANS_MAX {
                                self.orphans
                                    .insert(entry.position, std::sync::Arc::new(entry.record));
                            } else {
                                summary.orphans_dropped += 1;
                            }
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
            RecordKind::TOMBSTONE => match Tombstone::decode(record.payload) {
                Ok(t) => {
                    summary.tombstoned += t.positions.len() as u64;
                    ledger.complete(&t.positions);
                    for p in &t.positions {
                        self.orphans.remove(p);
                    }
                    for head in &t.heads {
                        if let Some(chain_head) = head.chain_head() {
                            on_head(&head.stream, chain_head);
                        }
                    }
                }
                Err(e) => {
                    summary.undecodable += 1;
                    tracing::error!(segment = record.position.segment, offset = record.position.offset, error = %e, "tombstone record does not decode; its records will be forwarded again");
                }
            },
            _ => {}
        }
    }

    /// Ends the scan; `first_position` is the open spool's, where an empty scan ends, and
    /// `segments` the ids of its segments. `on_envelope` sees each orphan's envelope, from its
    /// seal, as `record` showed it the envelopes it read (for the dedup index and the streams).
    pub fn finish(
        mut self,
        first_position: Position,
        segments: &[u64],
        mut on_envelope: impl FnMut(&Envelope, Position),
    ) -> ScanSummary {
        if self.summary.end == Position::default() {
            self.summary.end = first_position;
        }
        self.ledger.counted_up_to(self.summary.end);
        // What is left was sealed, never tombstoned, and its record not found. In a segment
        // that is not there it is lost with the segment (see the module doc).
        for (position, seal) in std::mem::take(&mut self.orphans) {
            if segments.binary_search(&position.segment).is_err() {
                continue;
            }
            // Pending since this start, as far as the age of the backlog goes: its segment's
            // creation time, which bounds a client's `ts_ms`, is not at hand here.
            let info = PendingInfo {
                since_ms: self.now_ms,
                bytes: 0,
            };
            on_envelope(&seal.envelope, position);
            self.ledger.add_orphan(position, info, seal);
            self.summary.orphans += 1;
        }
        let (pending, _, _) = self.ledger.pending_stats();
        self.summary.pending = pending;
        self.summary.sealed = self.ledger.sealed_len() as u64;
        self.summary
    }
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
    fn a_record_found_at_start_up_counts_as_pending_since_its_client_time_within_its_segments_life()
    {
        let (created, now) = (Some(1_000), 5_000);
        // A client stamping as it sends: its time.
        assert_eq!(acknowledged_since(1_200, created, now), 1_200);
        // A backfill, or ts_ms 0: not before the segment existed.
        assert_eq!(acknowledged_since(0, created, now), 1_000);
        // A clock ahead: not in the future.
        assert_eq!(acknowledged_since(9_000, created, now), 5_000);
        // No intact header: the client's time, at most now.
        assert_eq!(acknowledged_since(0, None, now), 0);
    }

    #[test]
    fn a_record_completed_with_its_seal_is_never_seen_pending_and_unsealed() {
        use crate::chain::{Chains, SharedRecord};
        let l = Ledger::default();
        let at = p(1, 64);
        l.add_live(
            at,
            PendingInfo {
                since_ms: 0,
                bytes: 10,
            },
            p(1, 128),
        );
        assert!(
            matches!(l.pending_seal(at), Some(None)),
            "pending, not yet sealed"
        );
        let record = Chains::new()
            .seal(crate::envelope::Envelope {
                id: "r".into(),
                source: "s".into(),
                ..Default::default()
            })
            .unwrap();
        l.record_sealed([(at, SharedRecord::new(record))]);
        assert!(
            matches!(l.pending_seal(at), Some(Some(_))),
            "pending with its seal"
        );
        l.complete(&[at]);
        assert!(l.pending_seal(at).is_none(), "complete: not pending at all");
        assert!(l.pending_seal(p(7, 64)).is_none(), "unknown: not pending");
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
    fn a_tombstone_naming_a_complete_or_unknown_envelope_changes_nothing() {
        let l = Ledger::default();
        l.add_pending(p(1, 64), info());
        l.add_pending(p(1, 128), info());
        l.complete(&[p(1, 64)]);
        l.complete(&[p(1, 64), p(1, 96), p(7, 64)]);
        assert_eq!(l.pending_stats(), (1, 10, Some(1)));
        assert!(!l.is_pending(p(1, 64)));
        assert!(l.is_pending(p(1, 128)));
    }

    #[test]
    fn the_oldest_pending_envelope_is_the_first_open_one_in_log_order() {
        let l = Ledger::default();
        for (i, offset) in [64, 128, 192].into_iter().enumerate() {
            l.add_pending(
                p(1, offset),
                PendingInfo {
                    since_ms: 100 + i as u64,
                    bytes: 10,
                },
            );
        }
        l.add_pending(
            p(2, 64),
            PendingInfo {
                since_ms: 50,
                bytes: 7,
            },
        );
        assert_eq!(l.pending_stats(), (4, 37, Some(100)));
        l.complete(&[p(1, 64), p(1, 192)]);
        assert_eq!(l.pending_stats(), (2, 17, Some(101)));
        l.complete(&[p(1, 128)]);
        assert_eq!(l.pending_stats(), (1, 7, Some(50)));
    }

    #[test]
    fn an_envelope_counted_out_of_log_order_is_counted_once_in_its_place() {
        let l = Ledger::default();
        l.add_pending(p(1, 128), info());
        l.add_pending(p(1, 64), info());
        l.add_pending(p(1, 64), info());
        assert_eq!(l.pending_stats().0, 2);
        l.complete(&[p(1, 64)]);
        assert!(l.is_pending(p(1, 128)));
        assert!(!l.is_pending(p(1, 64)));
        assert_eq!(l.pending_stats().0, 1);
    }

    #[test]
    fn an_envelope_past_four_gib_into_a_segment_file_is_counted_like_any_other() {
        // spoolgate writes no such segment, but a segment file is not trusted to be its own.
        let l = Ledger::default();
        l.add_pending(p(1, 64), info());
        l.add_pending(p(1, 5 << 30), info());
        assert!(l.is_pending(p(1, 5 << 30)));
        l.complete(&[p(1, 5 << 30)]);
        assert_eq!(l.pending_stats().0, 1);
        assert!(!l.is_pending(p(1, 5 << 30)));
    }

    #[test]
    fn forgetting_deleted_segments_keeps_the_totals_of_the_others() {
        let l = Ledger::default();
        l.add_pending(p(1, 64), info());
        l.add_pending(p(2, 64), info());
        l.counted_up_to(p(3, 0));
        l.complete(&[p(1, 64)]);
        assert_eq!(l.compactable_below(&[1, 2, 3], 3), Some(2));
        l.forget_below(2);
        assert_eq!(l.pending_stats(), (1, 10, Some(1)));
        assert!(l.is_pending(p(2, 64)));
        assert_eq!(l.compactable_below(&[2, 3], 3), None);
    }

    mod model {
        //! The ledger against the obvious model, a map from position to pending info, over
        //! random sequences of what the dispatcher, the workers and compaction do.
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Debug, Clone)]
        enum Op {
            /// Count the next envelope, `gap` frames on, in the same or the next segment.
            Add {
                next_segment: bool,
                gap: u8,
                bytes: u16,
                since_ms: u8,
            },
            /// Tombstone the envelopes at these indexes of those counted so far (repeats,
            /// and envelopes already complete, included).
            Complete(Vec<u8>),
            /// Compact what `compactable_below` allows.
            Compact,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (any::<bool>(), 1u8..4, 1u16..2000, any::<u8>()).prop_map(
                    |(next_segment, gap, bytes, since_ms)| Op::Add { next_segment, gap, bytes, since_ms }
                ),
                3 => proptest::collection::vec(any::<u8>(), 0..6).prop_map(Op::Complete),
                1 => Just(Op::Compact),
            ]
        }

        proptest! {
            #[test]
            fn the_ledger_agrees_with_a_map_of_pending_envelopes(ops in proptest::collection::vec(op(), 1..200)) {
                let ledger = Ledger::default();
                let mut model: BTreeMap<Position, PendingInfo> = BTreeMap::new();
                let mut counted: Vec<Position> = Vec::new();
                let mut segments: Vec<u64> = vec![1];
                let mut next = Position { segment: 1, offset: 64 };
                for op in ops {
                    match op {
                        Op::Add { next_segment, gap, bytes, since_ms } => {
                            if next_segment {
                                next = Position { segment: next.segment + 1, offset: 64 };
                                segments.push(next.segment);
                            }
                            let info = PendingInfo { since_ms: u64::from(since_ms), bytes: u32::from(bytes) };
                            ledger.add_live(next, info, Position { segment: next.segment, offset: next.offset + 32 });
                            model.insert(next, info);
                            counted.push(next);
                            next.offset += 32 * u64::from(gap);
                        }
                        Op::Complete(picks) => {
                            let positions: Vec<Position> = picks
                                .iter()
                                .filter_map(|&i| counted.get(usize::from(i) % counted.len().max(1)).copied())
                                .collect();
                            ledger.complete(&positions);
                            for position in &positions {
                                model.remove(position);
                            }
                        }
                        Op::Compact => {
                            let active = *segments.last().expect("a segment");
                            if let Some(below) = ledger.compactable_below(&segments, active) {
                                prop_assert!(model.keys().all(|p| p.segment >= below), "a pending envelope would be deleted");
                                ledger.forget_below(below);
                                segments.retain(|&s| s >= below);
                                counted.retain(|p| p.segment >= below);
                            }
                        }
                    }
                    let bytes: u64 = model.values().map(|i| u64::from(i.bytes)).sum();
                    let oldest = model.values().next().map(|i| i.since_ms);
                    prop_assert_eq!(ledger.pending_stats(), (model.len() as u64, bytes, oldest));
                    for position in &counted {
                        prop_assert_eq!(ledger.is_pending(*position), model.contains_key(position));
                    }
                }
            }
        }
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

    #[test]
    fn an_orphan_keeps_its_segment_and_the_ones_after_it_from_compaction_until_tombstoned() {
        use crate::chain::Chains;
        let ledger = Ledger::default();
        // Segments 4 to 7, every envelope counted complete; one envelope of segment 5 was
        // damaged after it was sealed (its seal is in segment 6): an orphan.
        for segment in [4, 5, 6] {
            ledger.add_pending(p(segment, 64), info());
            ledger.complete(&[p(segment, 64)]);
        }
        ledger.counted_up_to(p(7, 64));
        assert_eq!(ledger.compactable_below(&[4, 5, 6, 7], 7), Some(7));
        let seal = std::sync::Arc::new(
            Chains::new()
                .seal(crate::envelope::Envelope {
                    source: "s".into(),
                    slot: crate::slots::slot_of("s"),
                    ..Default::default()
                })
                .unwrap(),
        );
        ledger.add_orphan(p(5, 512), info(), seal.clone());
        assert!(ledger.is_pending(p(5, 512)));
        assert_eq!(ledger.pending_seal(p(5, 512)), Some(Some(seal)));
        assert_eq!(ledger.pending_stats().0, 1);
        assert_eq!(ledger.orphans_between(p(4, 64), p(6, 64)), vec![p(5, 512)]);
        assert_eq!(
            ledger.orphans_between(p(5, 520), p(7, 64)),
            Vec::<Position>::new()
        );
        assert_eq!(ledger.compactable_below(&[4, 5, 6, 7], 7), Some(5));
        ledger.forget_below(5);
        assert!(ledger.is_pending(p(5, 512)), "compaction kept it");
        ledger.complete(&[p(5, 512)]);
        assert_eq!(ledger.pending_stats().0, 0);
        assert_eq!(
            ledger.orphans_between(p(4, 64), p(7, 64)),
            Vec::<Position>::new()
        );
        assert_eq!(ledger.compactable_below(&[5, 6, 7], 7), Some(7));
    }
}
