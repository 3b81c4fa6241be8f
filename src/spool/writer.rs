//! Group commit: the one thread that writes segments.
//!
//! Appenders send requests over a bounded channel; the writer takes everything waiting (up to
//! the batch bounds), turns it into as few writes as the segment boundaries allow — normally
//! exactly one — and at most one fdatasync per write, then answers every request of the batch.
//! Nothing is answered before its bytes are written, and in `always` mode (or for a synced
//! request) nothing is answered before the fdatasync returned.
//!
//! With preallocation, creating a segment means reserving `segment_bytes_max` bytes of blocks
//! (or, with `preallocate_zeros`, writing that many zeros: about 200 ms for 64 MiB here) and
//! syncing them, which would stall every appender at each rotation. So
//! right after each rotation (and, for the segment a spool opens with, once it is half full) a
//! helper thread prepares the next one (allocate, header, fdatasync, directory fsync) and the
//! next rotation only takes it over. A prepared segment on
//! disk is an ordinary empty segment to recovery (spool-format.md §4, row 3), so a crash at any
//! point of the preparation costs nothing; at most one is prepared at a time.
//!
//! After answering a commit the writer may also write zeros a bounded distance past its offset
//! in the active segment ([`Writer::zero_ahead`]), so the next appends land on written blocks.
//! Those bytes lie past everything acknowledged, so they too are what recovery reads as the
//! preallocated end of the data.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::format::{self, SegmentHeader, HEADER_LEN};
use super::fs::SegmentFile;
use super::{Durability, Position, Record, RecordKind, SegMeta, Shared, SpoolError};

type Reply = oneshot::Sender<Result<Vec<Position>, SpoolError>>;

/// Runs on the writer thread once a request's records are durable, with their positions, and
/// before any reader or the ring can see them. Dropped without running when the request fails.
pub type CommitHook = Box<dyn FnOnce(&[Position]) + Send>;

enum Request {
    Append {
        records: Vec<(RecordKind, Bytes)>,
        /// Each payload's stored length (`format::stored_len`), from `precheck`: the writer
        /// thread neither scans the payloads again to size their frames nor to stuff them.
        stored: Vec<u32>,
        synced: bool,
        hook: Option<CommitHook>,
        reply: Reply,
    },
    /// Interval mode: time to fdatasync whatever is written.
    Tick,
    Close(oneshot::Sender<Result<(), SpoolError>>),
}

pub(crate) struct WriterHandle {
    shared: Arc<Shared>,
    tx: std::sync::Mutex<Option<mpsc::Sender<Request>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn sender(h: &WriterHandle) -> Result<mpsc::Sender<Request>, SpoolError> {
    h.tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or(SpoolError::Closed)
}

impl WriterHandle {
    /// Refuses what must not be written; each payload's stored length.
    fn precheck(&self, records: &[(RecordKind, Bytes)]) -> Result<Vec<u32>, SpoolError> {
        if let Some(reason) = self.shared.poison_reason() {
            return Err(SpoolError::Poisoned(reason));
        }
        let max = self.shared.opts.record_bytes_max;
        let mut stored = Vec::with_capacity(records.len());
        for (_, payload) in records {
            // The bound is on the bytes a frame stores (a stuffed payload is longer).
            let len = format::stored_len(payload);
            if len > max as usize {
                return Err(SpoolError::TooLarge { len, max });
            }
            stored.push(len as u32);
        }
        Ok(stored)
    }

    pub async fn append(
        &self,
        records: Vec<(RecordKind, Bytes)>,
        synced: bool,
        hook: Option<CommitHook>,
    ) -> Result<Vec<Position>, SpoolError> {
        let stored = self.precheck(&records)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        sender(self)?
            .send(Request::Append {
                records,
                stored,
                synced,
                hook,
                reply,
            })
            .await
            .map_err(|_| self.reply_lost())?;
        rx.await.map_err(|_| self.reply_lost())?
    }

    /// Why a request's reply was dropped unanswered. The writer answers every request it takes
    /// unless it stops: at `close` (requests queued behind the close are dropped), or when its
    /// thread panics. A panic poisons the spool here, before the appender learns of it, so its
    /// client gets 503 from a spool that `/readyz` reports as not ready.
    fn reply_lost(&self) -> SpoolError {
        if self.tx.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            return SpoolError::Closed;
        }
        self.shared.set_poison(
            "the spool writer thread stopped without answering (it panicked; see the log)".into(),
        );
        SpoolError::Poisoned(self.shared.poison_reason().unwrap_or_default())
    }

    pub fn append_blocking(
        &self,
        records: Vec<(RecordKind, Bytes)>,
        synced: bool,
    ) -> Result<Vec<Position>, SpoolError> {
        let stored = self.precheck(&records)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        sender(self)?
            .blocking_send(Request::Append {
                records,
                stored,
                synced,
                hook: None,
                reply,
            })
            .map_err(|_| SpoolError::Closed)?;
        rx.blocking_recv().map_err(|_| self.reply_lost())?
    }

    /// Append requests queued for the writer thread and not yet taken by it.
    pub fn queued_requests(&self) -> usize {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    pub fn close(&self) -> Result<(), SpoolError> {
        let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            // Closed already: the answer is the same as the first close's.
            return match self.shared.poison_reason() {
                Some(reason) => Err(SpoolError::Poisoned(reason)),
                None => Ok(()),
            };
        };
        let (reply, rx) = oneshot::channel();
        let sent = tx.blocking_send(Request::Close(reply)).is_ok();
        drop(tx);
        let result = if sent {
            rx.blocking_recv().unwrap_or(Ok(()))
        } else {
            Ok(())
        };
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A writer that died (its panic poisons the spool) answered nothing, or was gone
        // before the request: that is no clean close.
        match (result, self.shared.poison_reason()) {
            (Ok(()), Some(reason)) => Err(SpoolError::Poisoned(reason)),
            (result, _) => result,
        }
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        // Dropping the sender lets the writer thread drain and exit; waiting for it means the
        // directory lock is released by the time the last handle is gone.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Request>,
    active: u64,
    file: Arc<dyn SegmentFile>,
    offset: u64,
    /// Written but not yet fdatasync'd (interval and never modes).
    dirty: bool,
    /// When the last fdatasync (or the open) was: interval mode syncs after a batch once
    /// `fsync_interval_ms` has passed since, whether or not a tick got into the queue.
    synced_at: Instant,
    /// The next segment, being prepared by a helper thread (preallocation only).
    prepared: Option<Prepared>,
    /// The helper thread releasing old segments' cached pages (`release_behind`); at most
    /// one runs at a time. `None` until the first release.
    releasing: Option<std::thread::JoinHandle<()>>,
    /// Segments below this have been released or were never cached by this process. Set at
    /// open to the oldest segment; only moves forward.
    released_below: u64,
    /// Everything of the active segment from `offset` up to here is known to be written zeros
    /// (see [`Writer::zero_ahead`]). Set at open to `offset` (nothing beyond it is known) and
    /// at each rotation; only ever moves forward within a segment.
    zeroed_to: u64,
    /// The zeros `zero_ahead` writes from: at most [`super::fs::ZERO_CHUNK_BYTES`], allocated
    /// at the first use and kept.
    zeros: Vec<u8>,
    _lock: Box<dyn Send + Sync>,
}

struct Prepared {
    id: u64,
    handle: std::thread::JoinHandle<Result<Arc<dyn SegmentFile>, CreateError>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The directory lock (a field, dropped after this) must outlive the helper's writes.
        if let Some(p) = self.prepared.take() {
            let _ = p.handle.join();
        }
        if let Some(h) = self.releasing.take() {
            let _ = h.join();
        }
    }
}

pub(crate) fn start(
    shared: Arc<Shared>,
    lock: Box<dyn Send + Sync>,
    end: Position,
) -> Result<WriterHandle, SpoolError> {
    let (tx, rx) = mpsc::channel(shared.opts.queue_depth_max);
    let file = shared
        .segments_read()
        .get(&end.segment)
        .map(|m| m.file.clone())
        .ok_or_else(|| {
            SpoolError::Invalid(format!(
                "active segment {} missing after recovery",
                end.segment
            ))
        })?;
    let writer = Writer {
        shared: shared.clone(),
        rx,
        active: end.segment,
        file,
        offset: end.offset,
        dirty: false,
        synced_at: Instant::now(),
        prepared: None,
        releasing: None,
        released_below: shared.segments_read().keys().next().copied().unwrap_or(1),
        zeroed_to: end.offset,
        zeros: Vec::new(),
        _lock: lock,
    };
    shared
        .cache_released_below
        .store(writer.released_below, std::sync::atomic::Ordering::SeqCst);
    if let Durability::Interval(every) = shared.opts.durability {
        // The ticker holds only a weak sender: a strong one would keep the channel open after
        // the last handle is dropped, and the writer (and `Drop`, which joins it) would wait
        // for ever.
        let tick = tx.downgrade();
        std::thread::Builder::new()
            .name("spool-fsync-tick".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(tx) = tick.upgrade() else { return };
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Request::Tick) {
                    return;
                }
            })
            .map_err(|e| SpoolError::Invalid(format!("cannot start the fsync ticker: {e}")))?;
    }
    let on_panic = shared.clone();
    let thread = std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || {
            // A panic here (a bug, or a commit hook or observer failing after an fdatasync)
            // drops the replies of the requests in hand, whose appenders then see `Closed`.
            // Poisoning says so to `/readyz` and to every later append, rather than leave a
            // spool that reports ready and refuses everything.
            let run = std::panic::AssertUnwindSafe(|| writer.run());
            if let Err(panic) = std::panic::catch_unwind(run) {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                on_panic.set_poison(format!("the spool writer thread panicked: {what}"));
            }
        })
        .map_err(|e| SpoolError::Invalid(format!("cannot start the writer thread: {e}")))?;
    Ok(WriterHandle {
        shared,
        tx: std::sync::Mutex::new(Some(tx)),
        thread: std::sync::Mutex::new(Some(thread)),
    })
}

struct Pending {
    records: Vec<(RecordKind, Bytes)>,
    synced: bool,
    hook: Option<CommitHook>,
    reply: Reply,
    /// Each record's payload length as stored (see `Request::Append`).
    stored: Vec<u32>,
    bytes: u64,
}

impl Pending {
    /// Answers the appender with `err`, after dropping its hook: what the hook releases when
    /// dropped (reserved dedup ids) is then free by the time the appender answers its client.
    fn fail(mut self, err: SpoolError) {
        drop(self.hook.take());
        let _ = self.reply.send(Err(err));
    }
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(28)
}

impl Writer {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut batch: Vec<Pending> = Vec::new();
            let mut tick = false;
            let mut close = None;
            let mut records = 0usize;
            let mut bytes = 0u64;
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Append {
                        records: r,
                        stored,
                        synced,
                        hook,
                        reply,
                    } => {
                        let b: u64 = stored.iter().map(|&s| format::frame_len(s as usize)).sum();
                        records += r.len();
                        bytes += b;
                        batch.push(Pending {
                            records: r,
                            synced,
                            hook,
                            reply,
                            stored,
                            bytes: b,
                        });
                    }
                    Request::Tick => tick = true,
                    Request::Close(reply) => {
                        close = Some(reply);
                        break;
                    }
                }
                if records >= self.shared.opts.commit_batch_records_max
                    || bytes >= self.shared.opts.commit_batch_bytes_max as u64
                {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            // The ticker's requests share the bounded queue and are dropped when it is full,
            // that is under load; so a batch also syncs once the interval has passed.
            let interval_due = matches!(
                self.shared.opts.durability,
                Durability::Interval(every) if self.synced_at.elapsed() >= every
            );
            if (tick || interval_due || close.is_some()) && self.dirty {
                if let Err(e) = self.sync() {
                    self.shared.set_poison(format!("fdatasync failed: {e}"));
                }
            }
            if let Some(reply) = close {
                let result = match self.shared.poison_reason() {
                    Some(r) => Err(SpoolError::Poisoned(r)),
                    None => {
                        self.mark_clean_close();
                        Ok(())
                    }
                };
                let _ = reply.send(result);
                return;
            }
        }
        // All senders are gone: flush what interval mode left unsynced. Nobody is left to
        // answer, so a failure can only be logged (and poisons the spool for any reader).
        if self.dirty {
            if let Err(e) = self.sync() {
                tracing::error!(error = %e, "the final fdatasync failed: appends acknowledged since the last one may be lost");
                self.shared
                    .set_poison(format!("final fdatasync failed: {e}"));
            }
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        let started = Instant::now();
        self.file.sync_data()?;
        self.shared
            .metrics
            .spool_fsync_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        self.dirty = false;
        self.synced_at = Instant::now();
        Ok(())
    }

    /// Writes `batch` in as few groups as segment boundaries allow.
    fn commit(&mut self, batch: Vec<Pending>) {
        let mut group: Vec<Pending> = Vec::new();
        let mut group_bytes = 0u64;
        let mut rest = batch.into_iter();
        while let Some(p) = rest.next() {
            if let Some(reason) = self.shared.poison_reason() {
                p.fail(SpoolError::Poisoned(reason));
                continue;
            }
            // Every segment keeps room for the rotation frame that will end it.
            if self.offset + group_bytes + p.bytes + format::ROTATION_FRAME_BYTES_MAX
                > self.shared.opts.segment_bytes_max
            {
                if !group.is_empty() {
                    self.write_group(std::mem::take(&mut group));
                    group_bytes = 0;
                }
                if let Err(e) = self.rotate() {
                    p.fail(clone_err(&e));
                    for q in rest.by_ref() {
                        q.fail(clone_err(&e));
                    }
                    return;
                }
            }
            group_bytes += p.bytes;
            group.push(p);
        }
        if !group.is_empty() {
            self.write_group(group);
        }
    }

    fn write_group(&mut self, mut group: Vec<Pending>) {
        // A group queued behind one whose write or fdatasync failed is refused, not written
        // after it: nothing more is acknowledged once the spool may have lost data (a second
        // fdatasync of the same file may well succeed, the kernel having reported the error
        // once and marked the failed pages clean).
        if let Some(reason) = self.shared.poison_reason() {
            for p in group {
                p.fail(SpoolError::Poisoned(reason.clone()));
            }
            return;
        }
        let start = self.offset;
        let total: u64 = group.iter().map(|p| p.bytes).sum();
        let mut buf = Vec::with_capacity(total as usize);
        let mut committed: Vec<Record> = Vec::new();
        let mut positions: Vec<Vec<Position>> = Vec::with_capacity(group.len());
        for p in &mut group {
            let mut mine = Vec::with_capacity(p.records.len());
            // The payloads move on to the observer: nothing of a request needs them once they
            // are framed, whether the commit succeeds or fails.
            for ((kind, payload), &stored) in
                std::mem::take(&mut p.records).into_iter().zip(&p.stored)
            {
                let at = start + buf.len() as u64;
                format::encode_frame_stored(kind.0, &payload, stored as usize, &mut buf);
                let position = Position {
                    segment: self.active,
                    offset: at,
                };
                mine.push(position);
                committed.push(Record {
                    position,
                    kind,
                    payload,
                    next: Position {
                        segment: self.active,
                        offset: start + buf.len() as u64,
                    },
                });
            }
            positions.push(mine);
        }
        debug_assert_eq!(buf.len() as u64, total, "frame lengths add up");
        let path = self.shared.segment_path(self.active);
        if let Err(e) = self.file.write_all_at(&buf, start) {
            let err = if is_enospc(&e) && self.undo(start, total).is_ok() {
                self.shared.metrics.spool_full_errors_total.inc();
                SpoolError::Full(format!(
                    "writing {} bytes to {}: {e}",
                    total,
                    path.display()
                ))
            } else {
                self.void(start);
                self.shared
                    .set_poison(format!("write to {} failed: {e}", path.display()));
                SpoolError::Poisoned(self.shared.poison_reason().unwrap_or_default())
            };
            for p in group {
                p.fail(clone_err(&err));
            }
            return;
        }
        self.dirty = true;
        let must_sync =
            self.shared.opts.durability == Durability::Always || group.iter().any(|p| p.synced);
        if must_sync {
            if let Err(e) = self.sync() {
                self.void(start);
                self.shared
                    .set_poison(format!("fdatasync of {} failed: {e}", path.display()));
                let reason = self.shared.poison_reason().unwrap_or_default();
                for p in group {
                    p.fail(SpoolError::Poisoned(reason.clone()));
                }
                return;
            }
        }
        self.offset = start + total;
        self.prepare_next_if_half_full();
        if let Some(meta) = self.shared.segments_write().get_mut(&self.active) {
            meta.data_end = self.offset;
            meta.file_bytes = meta.file_bytes.max(self.offset);
        }
        let m = &self.shared.metrics;
        m.spool_appends_total.inc_by(committed.len() as u64);
        m.spool_append_bytes_total.inc_by(total);
        m.spool_commit_batch_records.observe(committed.len() as f64);
        // Hooks first: what they record (the dedup index's positions) must be in place before
        // the durable end moves and the ring is fed, that is before the records can be
        // forwarded, tombstoned and compacted.
        for (p, pos) in group.iter_mut().zip(&positions) {
            if let Some(hook) = p.hook.take() {
                hook(pos);
            }
        }
        self.shared.durable.send_replace(Position {
            segment: self.active,
            offset: self.offset,
        });
        if let Some(observer) = &self.shared.observer {
            observer.on_commit(committed);
        }
        for (p, pos) in group.into_iter().zip(positions) {
            let _ = p.reply.send(Ok(pos));
        }
        self.zero_ahead(total);
    }

    /// Keeps the active segment zero-filled `zero_ahead_bytes` ahead of the write offset, so
    /// that appends overwrite written blocks rather than `fallocate`'s unwritten ones: an
    /// fdatasync after a write into unwritten blocks must also commit their conversion to the
    /// journal, a second I/O (and on a VM a second device notification) for every group
    /// commit. Zeroing ahead converts them in steps of `zero_ahead_bytes` or more, each made
    /// durable by the next group's fdatasync, so that cost is paid about once per step instead
    /// of once per commit, and never as the 64 MiB burst of `preallocate_zeros` that queued in
    /// front of the acknowledging fdatasyncs. It runs after the group's appenders were
    /// answered: the zeros delay the next group, not this one.
    ///
    /// It only pays while commits are small: a group of `zero_ahead_bytes` or more (large
    /// batches) would mostly land past the zeroed bytes anyway, its conversion is shared by
    /// that many bytes, and the zeros would be one more copy of every byte through the page
    /// cache (end to end, 100-envelope batches were 2-4% slower with it). So after such a
    /// group it does nothing.
    ///
    /// Only bytes past `offset` are written, where nothing acknowledged can be; to recovery
    /// they are the zeros a preallocated segment reads as anyway (spool-format.md §4, row 3).
    /// ENOSPC (blocks that were not reserved after all) ends zeroing for this segment and is
    /// otherwise harmless: the data write that needs those blocks will report it. Any other
    /// error is a failing device and poisons the spool, as a data write error would.
    fn zero_ahead(&mut self, group_bytes: u64) {
        let ahead = self.shared.opts.zero_ahead_bytes;
        let max = self.shared.opts.segment_bytes_max;
        if !self.shared.opts.preallocate
            || self.shared.opts.preallocate_zeros
            || group_bytes >= ahead
        {
            return;
        }
        self.zeroed_to = self.zeroed_to.max(self.offset);
        if self.zeroed_to >= (self.offset + ahead).min(max) {
            return;
        }
        let target = (self.offset + 2 * ahead).min(max);
        if self.zeros.is_empty() {
            let len = (2 * ahead).min(super::fs::ZERO_CHUNK_BYTES as u64) as usize;
            self.zeros = vec![0u8; len];
        }
        while self.zeroed_to < target {
            let n = (target - self.zeroed_to).min(self.zeros.len() as u64);
            debug_assert!(
                self.zeroed_to >= self.offset,
                "zeros never cover written data"
            );
            if let Err(e) = self
                .file
                .write_all_at(&self.zeros[..n as usize], self.zeroed_to)
            {
                if is_enospc(&e) {
                    self.zeroed_to = max;
                } else {
                    let path = self.shared.segment_path(self.active);
                    self.shared.set_poison(format!(
                        "writing zeros ahead in {} failed: {e}",
                        path.display()
                    ));
                }
                return;
            }
            self.zeroed_to += n;
            self.dirty = true;
        }
    }

    /// After an ENOSPC write: zero what may have been written, so no partial frame is left to
    /// be read, and (without preallocation) give the space back.
    fn undo(&mut self, start: u64, len: u64) -> std::io::Result<()> {
        if self.shared.opts.preallocate {
            self.file.write_all_at(&vec![0u8; len as usize], start)?;
        } else {
            self.file.set_len(start)?;
        }
        self.file.sync_data()
    }

    /// Best effort: leaves a marker so the next start drops the unacknowledged range at
    /// `offset` of the active segment (see the module doc).
    fn void(&self, offset: u64) {
        let dir = &self.shared.opts.dir;
        let marker = dir.join(format!("void-{:020}-{:020}", self.active, offset));
        // The spool is poisoned either way; without a durable marker the next start may find
        // the refused batch in the page cache and keep it, so say so where an operator looks.
        let made = self
            .shared
            .fs
            .create(&marker)
            .and_then(|_| self.shared.fs.sync_dir(dir));
        if let Err(e) = made {
            tracing::error!(
                segment = self.active,
                offset,
                error = %e,
                "could not record that the batch from here was refused: a restart keeps it \
                 (and makes it durable) if the page cache still holds it"
            );
        }
    }

    /// Best effort: records the writer's last position as the spool's durable end (see
    /// [`super::mark_durable`]), so that the next start can tell damage to the last
    /// acknowledged frames from a write torn by a power loss (spool-format.md §4, row 14).
    /// Called only once the final fdatasync succeeded and nothing can be appended any more; a
    /// marker that cannot be made costs only that detection, so the close still succeeds.
    fn mark_clean_close(&self) {
        let end = Position {
            segment: self.active,
            offset: self.offset,
        };
        if let Err(e) = super::mark_durable(self.shared.fs.as_ref(), &self.shared.opts.dir, end) {
            tracing::warn!(
                segment = end.segment,
                offset = end.offset,
                error = %e,
                "could not record the durable end at the close: damage to the records \
                 appended since the start would read as a torn tail at the next start"
            );
        }
    }

    /// Starts a new segment: allocate (if preallocating), header, fdatasync, directory fsync.
    /// Starts preparing the next segment once the active one is half full (preallocation only).
    fn prepare_next_if_half_full(&mut self) {
        if self.offset >= self.shared.opts.segment_bytes_max / 2 {
            self.prepare_next();
        }
    }

    /// Starts preparing the segment after the active one, unless one is being prepared.
    fn prepare_next(&mut self) {
        if !self.shared.opts.preallocate || self.prepared.is_some() {
            return;
        }
        let id = self.active + 1;
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("spool-prepare".into())
            .spawn(move || {
                let created = create_segment(&shared.opts, shared.fs.as_ref(), &shared.metrics, id);
                if let Ok(file) = &created {
                    // It occupies the disk from now on, not from the rotation: the quota and
                    // `spoolgate_spool_disk_bytes` count it (`Spool::disk_bytes`).
                    let bytes = file.len().unwrap_or(shared.opts.segment_bytes_max);
                    shared
                        .prepared_bytes
                        .store(bytes, std::sync::atomic::Ordering::SeqCst);
                }
                created
            });
        // If no thread can be started, rotation simply creates the segment itself.
        if let Ok(handle) = spawned {
            self.prepared = Some(Prepared { id, handle });
        }
    }

    /// Drops the cached pages of the segments that have fallen `cached_behind_bytes` behind
    /// and that the consumer has read past (or that are `cached_unread_bytes_max` behind; see
    /// [`segments_to_release`]). Nothing reads them in the common case: consumers take records
    /// from the ring, and a restart's replay finds a cold cache anyway. Kept, they would fill the
    /// host's page cache with the spool (the segments stay until compaction); released, they
    /// are also the pages the next appends reuse, where fresh pages are dear (see
    /// benches/results/HISTORY.md, "the other changes of 2026-11-30"). Advice only: a refusal costs memory, never data, so it is logged and
    /// ignored.
    ///
    /// It runs on a helper thread: freeing 64 MiB of pages took ~15 ms, a stall every appender
    /// would wait out at each rotation. If the previous release is still running, this
    /// rotation releases nothing and the next one takes the segments this one would have.
    fn release_behind(&mut self) {
        let read = self
            .shared
            .read_segment
            .load(std::sync::atomic::Ordering::Relaxed);
        let ids = segments_to_release(&self.shared.opts, self.active, self.released_below, read);
        if ids.is_empty() || self.releasing.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let files: Vec<(u64, Arc<dyn SegmentFile>)> = {
            let segments = self.shared.segments_read();
            ids.clone()
                .filter_map(|id| segments.get(&id).map(|m| (id, m.file.clone())))
                .collect()
        };
        self.released_below = ids.end;
        self.shared
            .cache_released_below
            .store(ids.end, std::sync::atomic::Ordering::SeqCst);
        if files.is_empty() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("spool-release".into())
            .spawn(move || {
                for (id, file) in files {
                    if let Err(e) = file.release_cache() {
                        tracing::debug!(segment = id, error = %e, "could not release a segment's cached pages");
                    }
                }
            });
        self.releasing = spawned.ok();
    }

    /// Moves appends to the next segment: takes over the prepared one (or creates it), then
    /// ends the active one with a rotation frame naming it ([`Writer::end_active`]). The new
    /// segment exists, header and directory entry synced, before anything names it, so a
    /// rotation frame never names a segment that a crash could leave uncreated.
    fn rotate(&mut self) -> Result<(), SpoolError> {
        // A group before this one in the batch may just have poisoned the spool: nothing
        // more is written, not even the rotation frame (see `write_group`).
        if let Some(reason) = self.shared.poison_reason() {
            return Err(SpoolError::Poisoned(reason));
        }
        let id = self.active + 1;
        let create_here = |w: &Writer| {
            create_segment(&w.shared.opts, w.shared.fs.as_ref(), &w.shared.metrics, id)
        };
        let created = match self.prepared.take() {
            Some(p) if p.id == id => match p.handle.join() {
                // The helper ran when the segment was half full: a full disk or a shortage of
                // descriptors it met then may be over now, so it is tried again here rather
                // than refusing this batch for a past condition (both left nothing behind).
                Ok(Err(CreateError::Full(_) | CreateError::Busy(_))) => create_here(self),
                Ok(result) => result,
                Err(_) => Err(CreateError::Io(format!("preparing segment {id} panicked"))),
            },
            other => {
                if let Some(p) = other {
                    let _ = p.handle.join();
                }
                create_segment(
                    &self.shared.opts,
                    self.shared.fs.as_ref(),
                    &self.shared.metrics,
                    id,
                )
            }
        };
        // Joined: a prepared segment is in the segment map from here on, or gone.
        self.shared
            .prepared_bytes
            .store(0, std::sync::atomic::Ordering::SeqCst);
        let file = match created {
            Ok(f) => f,
            Err(CreateError::Full(why)) => return Err(SpoolError::Full(why)),
            Err(CreateError::Busy(why)) => return Err(SpoolError::Busy(why)),
            Err(CreateError::Io(why)) => {
                self.shared.set_poison(why);
                return Err(SpoolError::Poisoned(
                    self.shared.poison_reason().unwrap_or_default(),
                ));
            }
        };
        self.end_active(id)?;
        let path = self.shared.segment_path(id);
        let file_bytes = file.len().unwrap_or(HEADER_LEN);
        self.shared.segments_write().insert(
            id,
            SegMeta {
                path,
                file: file.clone(),
                file_bytes,
                data_end: HEADER_LEN,
                damaged: Vec::new(),
            },
        );
        self.active = id;
        self.file = file;
        self.offset = HEADER_LEN;
        self.zeroed_to = if self.shared.opts.preallocate_zeros {
            self.shared.opts.segment_bytes_max
        } else {
            HEADER_LEN
        };
        // A whole segment's worth of appends is the time the helper has to prepare the next.
        self.prepare_next();
        self.release_behind();
        self.shared
            .metrics
            .spool_segments_active
            .set(self.shared.segments_read().len() as i64);
        Ok(())
    }
}

impl Writer {
    /// Ends the active segment before appends move on to segment `next`: a rotation frame
    /// naming `next` (spool-format.md §3), then one fdatasync covering it and whatever interval
    /// mode left unsynced, so the segment's data is durable before any of the next one's. Only
    /// after this does the durable end move into `next`, so a reader reaches the frame (and
    /// skips it) before it reads on.
    ///
    /// The frame is what lets recovery tell that the newest segment was removed (§4, row 9).
    /// It is no acknowledged data: if the filesystem has no room for it (without
    /// preallocation; the writer keeps room for it in every segment otherwise) the segment
    /// ends without one and only that detection is lost. Any other write error, or a failed
    /// fdatasync, poisons the spool, as it would for data, and the void marker has the next
    /// start zero the frame: a half-written one in a segment that is no longer the newest
    /// would read as damaged acknowledged data.
    fn end_active(&mut self, next: u64) -> Result<(), SpoolError> {
        let frame = format::Rotation { next_segment: next }.frame();
        let at = self.offset;
        let len = frame.len() as u64;
        let path = self.shared.segment_path(self.active);
        let poison = |w: &mut Writer, why: String| {
            w.void(at);
            w.shared.set_poison(why);
            SpoolError::Poisoned(w.shared.poison_reason().unwrap_or_default())
        };
        let mut ended = false;
        match self.file.write_all_at(&frame, at) {
            Ok(()) => {
                self.dirty = true;
                ended = true;
            }
            Err(e) if is_enospc(&e) => {
                if let Err(e) = self.undo(at, len) {
                    let why = format!("undoing a rotation frame in {} failed: {e}", path.display());
                    return Err(poison(self, why));
                }
                tracing::warn!(
                    segment = self.active,
                    next_segment = next,
                    "no room for the rotation frame: this segment ends without one, so a \
                     start could not tell if the next one were removed"
                );
            }
            Err(e) => {
                let why = format!(
                    "writing the rotation frame to {} failed: {e}",
                    path.display()
                );
                return Err(poison(self, why));
            }
        }
        if self.dirty {
            if let Err(e) = self.sync() {
                let why = format!(
                    "fdatasync of {} before rotation failed: {e}",
                    path.display()
                );
                return Err(poison(self, why));
            }
        }
        if ended {
            self.offset = at + len;
            if let Some(meta) = self.shared.segments_write().get_mut(&self.active) {
                meta.data_end = self.offset;
                meta.file_bytes = meta.file_bytes.max(self.offset);
            }
        }
        Ok(())
    }
}

/// Why a segment could not be created.
pub(crate) enum CreateError {
    /// The filesystem is full; the partial file was removed.
    Full(String),
    /// The process or the system has no file descriptor to spare (EMFILE, ENFILE): to create
    /// the file (so nothing of it exists) or to fsync its directory (it was removed again);
    /// a later attempt may succeed.
    Busy(String),
    /// Anything else.
    Io(String),
}

/// Whether `e` says no file descriptor was free, before anything was created.
fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

/// Creates segment `id` ready for appends: allocate (if preallocating), header, fdatasync,
/// directory fsync. A full disk removes the partial file.
pub(crate) fn create_segment(
    opts: &super::SpoolOptions,
    fs: &dyn super::fs::FileSystem,
    metrics: &crate::metrics::Metrics,
    id: u64,
) -> Result<Arc<dyn SegmentFile>, CreateError> {
    let path = super::segment_path(&opts.dir, id);
    let fail = |what: &str, e: std::io::Error| -> CreateError {
        if is_enospc(&e) {
            let _ = fs.remove(&path);
            let _ = fs.sync_dir(&opts.dir);
            metrics.spool_full_errors_total.inc();
            CreateError::Full(format!("{what} {}: {e}", path.display()))
        } else {
            CreateError::Io(format!("{what} {} failed: {e}", path.display()))
        }
    };
    // A file of this id can only be what an earlier failed attempt of this process left when
    // it could not remove it (a start adopts every segment file it finds, and no one else
    // creates them while the spool's lock is held): nothing names it and nothing in it was
    // acknowledged, so it goes, once, rather than poisoning the spool.
    let created = match fs.create(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            tracing::warn!(path = %path.display(), "removing what an earlier failed attempt to create this segment left");
            fs.remove(&path).and_then(|()| fs.create(&path))
        }
        other => other,
    };
    // Out of descriptors (a burst of connections, say) is no failure of the disk: the open
    // failed before it created anything, so no write was lost and nothing needs poisoning.
    let file = created.map_err(|e| {
        if is_out_of_descriptors(&e) {
            CreateError::Busy(format!("creating {}: {e}", path.display()))
        } else {
            fail("creating", e)
        }
    })?;
    if opts.preallocate {
        let allocated = if opts.preallocate_zeros {
            super::fs::write_zeros(file.as_ref(), opts.segment_bytes_max)
        } else {
            file.allocate(opts.segment_bytes_max)
        };
        allocated.map_err(|e| fail("preallocating", e))?;
    }
    let header = SegmentHeader {
        version: super::format::FORMAT_VERSION,
        segment_id: id,
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        segment_bytes_max: opts.segment_bytes_max,
        record_bytes_max: opts.record_bytes_max,
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(|e| fail("writing the header of", e))?;
    file.sync_data().map_err(|e| fail("fdatasync of", e))?;
    fs.sync_dir(&opts.dir).map_err(|e| {
        if is_out_of_descriptors(&e) {
            // Opening the directory to fsync it needs a descriptor of its own, and the new
            // file may have taken the last one. Nothing names the file yet, so it goes again.
            let _ = fs.remove(&path);
            CreateError::Busy(format!(
                "fsync of the directory holding {}: {e}",
                path.display()
            ))
        } else {
            fail("fsync of the directory holding", e)
        }
    })?;
    Ok(file)
}

/// The segments to release when `active` becomes the active segment: those from
/// `released_below` on that whole segments covering at least `cached_behind_bytes` follow,
/// and of them only the ones below `read_segment` (the first segment the consumer has not read
/// past), except that a segment with `cached_unread_bytes_max` of segments after it goes
/// whatever the consumer has read.
fn segments_to_release(
    opts: &super::SpoolOptions,
    active: u64,
    released_below: u64,
    read_segment: u64,
) -> std::ops::Range<u64> {
    let segment = opts.segment_bytes_max.max(1);
    // Exclusive bounds: segments below `behind(x)` have at least `x` of whole segments between
    // them and the active one.
    let behind = |bytes: u64| active.saturating_sub(bytes.div_ceil(segment).max(1));
    let cold_below = behind(opts.cached_behind_bytes);
    let forced_below = behind(opts.cached_unread_bytes_max);
    let end = cold_below.min(read_segment.max(forced_below));
    let start = released_below.max(1);
    start..end.max(start)
}

fn clone_err(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Full(s) => SpoolError::Full(s.clone()),
        SpoolError::Busy(s) => SpoolError::Busy(s.clone()),
        SpoolError::Poisoned(s) => SpoolError::Poisoned(s.clone()),
        SpoolError::TooLarge { len, max } => SpoolError::TooLarge {
            len: *len,
            max: *max,
        },
        SpoolError::Locked(p) => SpoolError::Locked(p.clone()),
        SpoolError::Closed => SpoolError::Closed,
        other => SpoolError::Invalid(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(segment_bytes_max: u64) -> super::super::SpoolOptions {
        super::super::SpoolOptions {
            dir: std::path::PathBuf::new(),
            segment_bytes_max,
            record_bytes_max: 1024,
            durability: Durability::Always,
            commit_batch_records_max: 1,
            commit_batch_bytes_max: 1024,
            queue_depth_max: 1,
            preallocate: false,
            preallocate_zeros: false,
            zero_ahead_bytes: 0,
            cached_behind_bytes: super::super::CACHED_BEHIND_BYTES_DEFAULT,
            cached_unread_bytes_max: super::super::CACHED_UNREAD_BYTES_MAX_DEFAULT,
        }
    }

    #[test]
    fn a_segment_is_released_once_whole_segments_of_the_cached_window_follow_it() {
        let mib = 1u64 << 20;
        let read_all = u64::MAX;
        // 64 MiB segments: two full segments (128 MiB) stay cached behind the active one.
        assert_eq!(segments_to_release(&opts(64 * mib), 3, 1, read_all), 1..1);
        assert_eq!(segments_to_release(&opts(64 * mib), 4, 1, read_all), 1..2);
        assert_eq!(segments_to_release(&opts(64 * mib), 10, 7, read_all), 7..8);
        // Small segments: as many as cover the window.
        assert_eq!(segments_to_release(&opts(mib), 129, 1, read_all), 1..1);
        assert_eq!(segments_to_release(&opts(mib), 130, 1, read_all), 1..2);
        // Segments larger than the window: the previous one stays.
        assert_eq!(segments_to_release(&opts(4096 * mib), 2, 1, read_all), 1..1);
        assert_eq!(segments_to_release(&opts(4096 * mib), 3, 1, read_all), 1..2);
    }

    #[test]
    fn segments_skipped_at_one_rotation_are_released_at_the_next() {
        let mib = 1u64 << 20;
        // The helper was busy at the rotation to 10, so 7 is still unreleased at 11.
        assert_eq!(segments_to_release(&opts(64 * mib), 11, 7, u64::MAX), 7..9);
        // After a restart the first release starts at the oldest segment on disk.
        assert_eq!(
            segments_to_release(&opts(64 * mib), 40, 30, u64::MAX),
            30..38
        );
    }

    #[test]
    fn a_segment_the_consumer_has_not_read_keeps_its_pages_up_to_the_cap() {
        let mib = 1u64 << 20;
        // The consumer is reading segment 5: 1..5 may go, 5 and later stay.
        assert_eq!(segments_to_release(&opts(64 * mib), 12, 1, 5), 1..5);
        // It has not read past segment 1: nothing goes while the backlog is under 512 MiB
        // (8 segments of 64 MiB)...
        assert_eq!(segments_to_release(&opts(64 * mib), 9, 1, 1), 1..1);
        // ...and beyond that the segments further behind go, read or not.
        assert_eq!(segments_to_release(&opts(64 * mib), 12, 1, 1), 1..4);
        // Never more than the distance alone allows, however far the consumer has read.
        assert_eq!(segments_to_release(&opts(64 * mib), 12, 1, 11), 1..10);
        // A rewind (the consumer back at 2) holds back what is not released yet.
        assert_eq!(segments_to_release(&opts(64 * mib), 12, 6, 2), 6..6);
    }
}
