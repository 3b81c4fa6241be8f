//! The spool: a durable, append-only log of segment files. spool-format.md is its byte-level
//! contract; this doc is its design.
//!
//! **Files.** `<dir>/<20-digit id>.seg`, ids increasing from 1, and `<dir>/LOCK`, held with an
//! exclusive `flock` for the life of the process so a second spoolgate cannot open the same
//! directory. With `preallocate` (the default) a new segment is created at `segment_bytes_max`,
//! its blocks reserved with `fallocate` and reading as zeros, and fsync'd: a full disk shows
//! up when a segment is created, never halfway through a record, and no append changes the
//! file's size. But an fdatasync after a write into reserved (unwritten) blocks must also commit
//! their conversion to written ones in the journal: a second I/O for every group commit. So the
//! writer keeps the active segment zero-filled `zero_ahead_bytes` (default 256 KiB) ahead of
//! its write offset while commits are smaller than that, each step made durable by the next
//! commit's fdatasync; the conversion is then paid once per step instead of once per commit.
//! Single-envelope requests at 64 connections were faster in 15 of 19 interleaved pairs
//! (medians of each set +5-11%, kernel CPU 1-3 us less per request); 100-envelope batches and
//! end to end showed no difference beyond the noise (2-vCPU VM, 2026-11-30).
//! `preallocate_zeros` writes the whole segment's zeros when it is created instead: the same
//! cheap fdatasyncs, but every rotation then pushes 64 MiB of zeros through the page cache and
//! the disk, and that burst competes with the acknowledging fdatasyncs (single-envelope p99
//! 4.2-6.2 ms against 2.2-2.3 ms, 100-envelope batches 243k vs 286k envelopes/s). Where the
//! filesystem has no `fallocate`, zeros are written.
//!
//! **Rotation.** When the next request does not fit the active segment, the writer takes over
//! the next one (prepared, or created there: header, fdatasync, directory fsync) and only then
//! ends the active one with a rotation frame naming it, fdatasync'd before anything is appended
//! to the new one. Nothing else in the spool names the newest segment, so without the frame a
//! removed newest segment would look like a spool that simply ended earlier; with it, recovery
//! reports the segment missing (spool-format.md §4, row 9). Every segment keeps
//! [`format::ROTATION_FRAME_BYTES_MAX`] bytes free for it. Readers skip it.
//!
//! **Group commit** (`writer`). One OS thread owns every write. Appenders queue requests on a
//! bounded channel (`queue_depth_max`); the writer takes as many as are waiting, up to
//! `commit_batch_records_max` records and `commit_batch_bytes_max` bytes, frames them into one
//! buffer, issues one positional write and — in `always` mode, or when any request asked for
//! it — one fdatasync, and only then answers every appender in the batch. A request is
//! all-or-nothing and never spans segments.
//!
//! **Failures.** ENOSPC while writing or while creating a segment fails that batch with
//! [`SpoolError::Full`], after the partial bytes are zeroed again, and the spool keeps working.
//! Any other write or fdatasync error *poisons* the spool: the batch and every later append get
//! [`SpoolError::Poisoned`]. After a failed fdatasync the kernel may already have dropped the
//! dirty pages, so retrying it could report success for data that is gone; refusing is the only
//! honest answer. The failed batch's range is recorded in a `void-<segment>-<offset>` marker so
//! the next start drops it instead of forwarding records nobody was told were accepted.
//!
//! **Recovery** (`recovery`) runs in `open`, before anything is appended: every frame's CRC is
//! checked, damaged ranges are skipped and reported, a torn tail of the last segment is zeroed.
//! A `durable-<segment>-<offset>` marker names a position before which everything is durable:
//! made at a clean close (the writer's last position) and at the end of every start's recovery
//! (where appends begin). A torn write can only lie after it, so recovery reports damage before
//! it as corruption instead of zeroing it as a torn tail (row 14).
//! The decision table is in spool-format.md. Recovery reads one segment at a time, so its
//! memory is bounded by `segment_bytes_max`, and skips the holes the filesystem reports
//! ([`fs::SegmentFile::seek_data`]), so the reserved zeros of a preallocated segment cost
//! nothing to read.
//!
//! **Reading** (`reader`). A [`Reader`] walks frames from any position across segments, never
//! past the durable end, through a window of 256 KiB (`reader::WINDOW_BYTES`).
//!
//! **Page cache.** At each rotation the writer has a helper thread release the cached pages of
//! the segments that fall more than `cached_behind_bytes` (128 MiB, twice the default
//! ring) behind the active one: consumers read records from the ring, so the segments are read
//! back only by a consumer that far behind and by a restart's replay. Ingest-only,
//! 100-envelope batches of 1 KiB on the 2-vCPU VM (2026-11-30, 6 interleaved rounds):
//! 405-454k against 340-392k envelopes/s in 5 of them, system CPU 0.9-1.0 against 1.3-1.9 µs
//! per envelope, because the released pages are the ones the next appends reuse, where fresh
//! ones cost a host fault.
//!
//! A segment the consumer has not read yet keeps its pages while it is less than
//! `cached_unread_bytes_max` (512 MiB) behind the active one: the consumer reports how
//! far it has read ([`Spool::note_read_segment`]), and the writer releases only what lies
//! behind that, up to the cap. Releasing by distance alone sent a consumer that had fallen
//! 128 MiB behind to the disk for every record it still had to read (2.2 GB read back in one
//! 8-second end-to-end run), which made it slower still. With no consumer (ingest only) the
//! distance alone decides, as before.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

pub mod format;
pub mod fs;
mod inspect;
mod reader;
mod recovery;
mod writer;

pub(crate) use inspect::segment_ids;
pub use inspect::{for_each_frame, holds_segments, inspect, InspectReport};
pub use reader::Reader;
pub use writer::CommitHook;

/// Where a record starts: its segment id and the byte offset of its frame in that segment file.
/// Positions are totally ordered in log order and never reused.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// The kind byte of a frame. Unknown kinds are skipped by readers (forward compatibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordKind(pub u8);

impl RecordKind {
    /// An acknowledged envelope (payload: Envelope v1 msgpack).
    pub const ENVELOPE: RecordKind = RecordKind(1);
    /// A sealed batch: chain output made durable before it is forwarded (payload owned by `chain`).
    pub const SEALED: RecordKind = RecordKind(2);
    /// Completion tombstones (payload owned by `forward`).
    pub const TOMBSTONE: RecordKind = RecordKind(3);
    /// The end of a segment whose successor holds the appends that followed (payload:
    /// [`format::Rotation`]). Structure, not a record: readers and recovery's visit skip it.
    pub const ROTATION: RecordKind = RecordKind(format::ROTATION_KIND);
}

/// How much an acknowledgement promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Durability {
    /// fdatasync before acknowledging (default).
    Always,
    /// Acknowledge after write(2); fdatasync at least every `interval`.
    Interval(Duration),
    /// Acknowledge after write(2); never fdatasync (tests and benchmarks only).
    Never,
}

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    pub segment_bytes_max: u64,
    pub record_bytes_max: u32,
    pub durability: Durability,
    /// Bound on records in one group commit.
    pub commit_batch_records_max: usize,
    /// Bound on bytes in one group commit.
    pub commit_batch_bytes_max: usize,
    /// Bound on append requests queued for the writer.
    pub queue_depth_max: usize,
    /// Create new segment files at `segment_bytes_max`, reading as zeros, their blocks reserved.
    pub preallocate: bool,
    /// With `preallocate`: write the zeros rather than reserve the blocks with `fallocate`
    /// (see the module doc for the trade-off).
    pub preallocate_zeros: bool,
    /// With `preallocate` by `fallocate`: how far ahead of the write offset the writer keeps
    /// the active segment zero-filled (see `Writer::zero_ahead`); 0 turns it off.
    pub zero_ahead_bytes: u64,
    /// How much of the log behind the active segment stays in the page cache (see Page cache
    /// above); segments further behind are released once the consumer has read them.
    pub cached_behind_bytes: u64,
    /// How far behind the active segment a segment the consumer has not read yet may keep its
    /// pages; further behind it is released anyway.
    pub cached_unread_bytes_max: u64,
}

/// The default of [`SpoolOptions::zero_ahead_bytes`].
pub const ZERO_AHEAD_BYTES_DEFAULT: u64 = 256 << 10;

/// The default of [`SpoolOptions::cached_behind_bytes`]: twice the default ring, so a consumer
/// that the ring overflowed by up to as much again still reads from memory.
pub const CACHED_BEHIND_BYTES_DEFAULT: u64 = 128 << 20;

/// The default of [`SpoolOptions::cached_unread_bytes_max`]: a consumer that stopped (a sink
/// down for hours) must not hold the spool's whole backlog in the page cache; beyond this it
/// reads from the disk.
pub const CACHED_UNREAD_BYTES_MAX_DEFAULT: u64 = 512 << 20;

/// One record read back from the spool.
#[derive(Debug, Clone)]
pub struct Record {
    pub position: Position,
    pub kind: RecordKind,
    pub payload: Bytes,
    /// The position just after this record (where the next one starts, possibly in the next segment).
    pub next: Position,
}

/// A record as recovery finds it, lent for the length of a call: see [`Spool::open_visiting`].
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub position: Position,
    pub kind: RecordKind,
    pub payload: &'a [u8],
    /// The position just after this record, in the same segment.
    pub next: Position,
    /// When its segment was created, from an intact header: the record was acknowledged no
    /// earlier. `None` where unknown.
    pub segment_created_ms: Option<u64>,
}

/// Called by the writer, in log order, with every batch of records it has committed. The
/// records are handed over, not lent: their payloads move on without another reference count
/// taken and dropped per record.
pub trait CommitObserver: Send + Sync {
    fn on_commit(&self, records: Vec<Record>);
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full: {0}")]
    Full(String),
    /// A new segment could not be made for want of a file descriptor (to create it, or to
    /// fsync its directory, in which case it was removed again); nothing was written to it,
    /// and a later append may succeed. Not a poison: no data can have been lost.
    #[error("spool cannot open a new segment now: {0}")]
    Busy(String),
    #[error("spool is poisoned and refuses writes: {0}")]
    Poisoned(String),
    #[error("I/O error during {op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("record of {len} bytes exceeds record_bytes_max {max}")]
    TooLarge { len: usize, max: u32 },
    #[error("spool directory {0} is locked by another process")]
    Locked(PathBuf),
    #[error("spool is closed")]
    Closed,
    #[error("invalid spool: {0}")]
    Invalid(String),
}

/// A damaged byte range found and skipped by recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DamagedRange {
    pub segment: u64,
    pub offset: u64,
    pub len_bytes: u64,
    /// Frames known to be lost in this range (at least 1).
    pub records_lost: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub torn_tail_bytes: u64,
    pub damaged: Vec<DamagedRange>,
    /// Gaps in the segment ids, as `[first missing id, last missing id]`. Compaction deletes
    /// only a prefix, oldest first, so a segment missing between two present ones was removed
    /// by something else, and the envelopes it held were acknowledged (spool-format.md §4,
    /// row 9).
    pub missing_segments: Vec<[u64; 2]>,
    pub duration: Duration,
}

/// The gaps in ascending segment ids `ids`, as `[first missing, last missing]`.
pub fn segment_id_gaps(ids: &[u64]) -> Vec<[u64; 2]> {
    ids.windows(2)
        .filter(|w| w[0] + 1 < w[1])
        .map(|w| [w[0] + 1, w[1] - 1])
        .collect()
}

/// The segment missing after the newest one, `newest`, as `[first missing, last missing]`:
/// the one its last rotation frame names, `rotated_to` (spool-format.md §4, row 9). A rotation
/// creates the next segment before it names it, so a named segment that is not there was
/// removed. The writer names only the segment after its own, so a frame naming any other id
/// (which only damage with a matching CRC could make) names nothing.
pub fn missing_after_newest(newest: u64, rotated_to: Option<u64>) -> Option<[u64; 2]> {
    let next = newest.checked_add(1)?;
    (rotated_to == Some(next)).then_some([next, next])
}

#[derive(Debug, Clone, Serialize)]
pub struct SegmentInfo {
    pub id: u64,
    pub path: PathBuf,
    /// Allocated file length in bytes.
    pub file_bytes: u64,
    /// Bytes of valid frames (header included).
    pub used_bytes: u64,
}

/// A segment the spool knows about.
pub(crate) struct SegMeta {
    pub path: PathBuf,
    pub file: Arc<dyn fs::SegmentFile>,
    pub file_bytes: u64,
    /// End of valid data. Final for sealed segments; the writer advances it on the active one.
    pub data_end: u64,
    /// Ranges recovery found damaged, skipped by readers.
    pub damaged: Vec<(u64, u64)>,
}

pub(crate) struct Shared {
    pub opts: SpoolOptions,
    pub fs: Arc<dyn fs::FileSystem>,
    pub metrics: Arc<Metrics>,
    pub observer: Option<Arc<dyn CommitObserver>>,
    pub segments: std::sync::RwLock<std::collections::BTreeMap<u64, SegMeta>>,
    pub durable: tokio::sync::watch::Sender<Position>,
    pub poison: std::sync::Mutex<Option<String>>,
    pub closed: std::sync::atomic::AtomicBool,
    /// The first segment the consumer has not read past (see Page cache above); `u64::MAX`
    /// until a consumer reports, and for good when none runs.
    pub read_segment: std::sync::atomic::AtomicU64,
    /// The longest frame payload readers accept: `opts.record_bytes_max`, or more when a
    /// segment was written with a larger bound (recorded in its header; see `recovery`).
    pub payload_max: u32,
    /// Segments below this have had their cached pages released, or are being released, or
    /// were never cached by this process: the writer's `released_below`, mirrored here when it
    /// moves (on the writer thread, before the append that caused it is answered).
    pub cache_released_below: std::sync::atomic::AtomicU64,
    /// Bytes of the next segment prepared ahead of rotation (0 when none): on disk, but in
    /// the segment map only from the rotation on.
    pub prepared_bytes: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn segments_read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<u64, SegMeta>> {
        // Writers of this map finish each mutation before anything can panic.
        self.segments.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn segments_write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, std::collections::BTreeMap<u64, SegMeta>> {
        self.segments.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn poison_reason(&self) -> Option<String> {
        self.poison
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_poison(&self, reason: String) {
        let mut p = self.poison.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            tracing::error!(%reason, "spool poisoned: refusing all further appends");
            *p = Some(reason);
            self.metrics.spool_poisoned.set(1);
        }
    }

    pub fn segment_path(&self, id: u64) -> PathBuf {
        segment_path(&self.opts.dir, id)
    }
}

pub(crate) fn segment_path(dir: &std::path::Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Parses a segment file name back into its id.
/// The name of the durable-end marker for `end` (spool-format.md §1, §4 row 14).
pub(crate) fn durable_marker_name(end: Position) -> String {
    format!("durable-{:020}-{:020}", end.segment, end.offset)
}

/// The latest durable end among a directory's file names, if any marker is there. Several are
/// left only by a crash between making a new one and removing the old; the latest says most,
/// and every earlier one still holds, since the spool only grows forward from where a marker
/// was made.
pub(crate) fn durable_marker(names: &[String]) -> Option<Position> {
    names
        .iter()
        .filter_map(|n| {
            let (segment, offset) = n.strip_prefix("durable-")?.split_once('-')?;
            Some(Position {
                segment: segment.parse().ok()?,
                offset: offset.parse().ok()?,
            })
        })
        .max()
}

/// Records that every byte of the spool before `end` is durable (fdatasync'd) and that
/// nothing will be written before it again: the writer's last position at a clean close, or
/// where appends begin once recovery has settled a start. The new marker is made and its
/// directory fsync'd before the older ones go; a crash in between leaves both, which still
/// hold. So the directory holds one marker, two for a moment. Best effort for the caller:
/// failing costs only row 14's detection for what was appended since the last marker.
pub(crate) fn mark_durable(
    fs: &dyn fs::FileSystem,
    dir: &std::path::Path,
    end: Position,
) -> std::io::Result<()> {
    let name = durable_marker_name(end);
    let names = fs.list(dir)?;
    if !names.contains(&name) {
        fs.create(&dir.join(&name))?;
        fs.sync_dir(dir)?;
    }
    let older = names
        .into_iter()
        .filter(|n| n.starts_with("durable-") && *n != name);
    for n in older {
        fs.remove(&dir.join(n))?;
    }
    Ok(())
}

pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The id of the oldest segment in `dir`, before recovery has run: what the start-up scan
/// ([`crate::forward::ledger::Scan`]) needs to tell a seal naming an envelope compaction
/// deleted from one naming an envelope whose frame is damaged, even when no record of the
/// oldest segment can be read.
pub fn oldest_segment(
    fs: &dyn fs::FileSystem,
    dir: &std::path::Path,
) -> Result<Option<u64>, SpoolError> {
    Ok(segment_id_span(fs, dir)?.map(|(oldest, _)| oldest))
}

/// The oldest and the newest segment ids in `dir`, if it holds any segment (None as well
/// before the first start, which creates the directory).
pub fn segment_id_span(
    fs: &dyn fs::FileSystem,
    dir: &std::path::Path,
) -> Result<Option<(u64, u64)>, SpoolError> {
    let names = match fs.list(dir) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SpoolError::Io {
                op: "list directory",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    Ok(names
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .fold(None, |span, id| {
            Some(span.map_or((id, id), |(oldest, newest): (u64, u64)| {
                (oldest.min(id), newest.max(id))
            }))
        }))
}

/// Handle to an open spool. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    writer: Arc<writer::WriterHandle>,
}

impl Spool {
    /// Takes the directory lock, recovers every segment (see the recovery table in
    /// spool-format.md), and starts the writer thread. `observer` sees every committed batch.
    pub fn open(
        opts: SpoolOptions,
        metrics: Arc<Metrics>,
        observer: Option<Arc<dyn CommitObserver>>,
    ) -> Result<(Spool, RecoveryReport), SpoolError> {
        Spool::open_with_fs(opts, Arc::new(fs::StdFs), metrics, observer)
    }

    /// `open` on any filesystem, for fault injection and model tests.
    pub fn open_with_fs(
        opts: SpoolOptions,
        fs: Arc<dyn fs::FileSystem>,
        metrics: Arc<Metrics>,
        observer: Option<Arc<dyn CommitObserver>>,
    ) -> Result<(Spool, RecoveryReport), SpoolError> {
        Spool::open_visiting(opts, fs, metrics, observer, &mut |_| {})
    }

    /// `open_with_fs` that also hands `visit` every record recovery keeps, in log order: the
    /// records a [`Reader`] from [`Spool::first_position`] would return once the spool is open,
    /// but read once instead of twice. Recovery has each segment in memory and has checked
    /// every frame's CRC; reading the spool again for the start-up scan cost a second copy out
    /// of the page cache, a second CRC pass and a copy of every payload (1.7 of 4.7 s to
    /// ready for a 2.3 GB backlog, 2026-12-01).
    ///
    /// `visit` sees a segment's records only once recovery has settled that segment (void
    /// ranges dropped, torn tail zeroed), so it never sees a record the spool then drops. If
    /// `open` fails after some segments, `visit` has seen their records: the caller must
    /// discard what it built from them.
    pub fn open_visiting(
        opts: SpoolOptions,
        fs: Arc<dyn fs::FileSystem>,
        metrics: Arc<Metrics>,
        observer: Option<Arc<dyn CommitObserver>>,
        visit: &mut dyn FnMut(RecordView<'_>),
    ) -> Result<(Spool, RecoveryReport), SpoolError> {
        assert!(opts.segment_bytes_max > format::HEADER_LEN + format::FRAME_HEADER_LEN);
        // The longest record fits an empty segment with room left for its rotation frame.
        assert!(
            format::frame_len(opts.record_bytes_max as usize)
                + format::HEADER_LEN
                + format::ROTATION_FRAME_BYTES_MAX
                <= opts.segment_bytes_max
        );
        let recovered = recovery::recover(&opts, fs.as_ref(), &metrics, visit)?;
        let (durable, _) = tokio::sync::watch::channel(recovered.end);
        let shared = Arc::new(Shared {
            opts,
            fs,
            metrics,
            observer,
            segments: std::sync::RwLock::new(recovered.segments),
            durable,
            poison: std::sync::Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
            read_segment: std::sync::atomic::AtomicU64::new(u64::MAX),
            payload_max: recovered.payload_max,
            cache_released_below: std::sync::atomic::AtomicU64::new(0),
            prepared_bytes: std::sync::atomic::AtomicU64::new(0),
        });
        let writer = writer::start(shared.clone(), recovered.lock, recovered.end)?;
        shared
            .metrics
            .spool_segments_active
            .set(shared.segments_read().len() as i64);
        Ok((
            Spool {
                shared,
                writer: Arc::new(writer),
            },
            recovered.report,
        ))
    }

    /// Appends `records` as one all-or-nothing unit, in order and contiguous. Returns once they
    /// are durable per the durability mode (group-committed with concurrent appenders).
    pub async fn append(
        &self,
        records: Vec<(RecordKind, Bytes)>,
    ) -> Result<Vec<Position>, SpoolError> {
        self.writer.append(records, false, None).await
    }

    /// Like `append`, and `hook` runs with the records' positions on the writer thread once
    /// they are durable, before readers and the ring can see them (so before they can be
    /// forwarded); if the append fails, `hook` is dropped without running.
    pub async fn append_then(
        &self,
        records: Vec<(RecordKind, Bytes)>,
        hook: CommitHook,
    ) -> Result<Vec<Position>, SpoolError> {
        self.writer.append(records, false, Some(hook)).await
    }

    /// Like `append`, but always fdatasyncs before returning, whatever the durability mode.
    pub async fn append_synced(
        &self,
        records: Vec<(RecordKind, Bytes)>,
    ) -> Result<Vec<Position>, SpoolError> {
        self.writer.append(records, true, None).await
    }

    /// Blocking form of `append`/`append_synced` for callers outside an async runtime.
    pub fn append_blocking(
        &self,
        records: Vec<(RecordKind, Bytes)>,
        synced: bool,
    ) -> Result<Vec<Position>, SpoolError> {
        self.writer.append_blocking(records, synced)
    }

    pub fn reader(&self, from: Position) -> Reader {
        Reader::new(self.shared.clone(), from)
    }

    /// Position of the first record of the oldest segment.
    pub fn first_position(&self) -> Position {
        let segs = self.shared.segments_read();
        let id = segs.keys().next().copied().unwrap_or(1);
        Position {
            segment: id,
            offset: format::HEADER_LEN,
        }
    }

    /// The consumer has read every record of the segments below `segment`. The writer keeps
    /// the cached pages of segments from here on (up to its cap), since they will be read soon.
    /// Called again with a lower segment after a rewind, which holds back further releases
    /// until the reading is past them again.
    pub fn note_read_segment(&self, segment: u64) {
        self.shared
            .read_segment
            .store(segment, std::sync::atomic::Ordering::Relaxed);
    }

    /// Position just past the last committed record.
    pub fn durable_end(&self) -> Position {
        *self.shared.durable.borrow()
    }

    /// Notified with the new durable end after every commit.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Position> {
        self.shared.durable.subscribe()
    }

    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.shared
            .segments_read()
            .iter()
            .map(|(&id, m)| SegmentInfo {
                id,
                path: m.path.clone(),
                file_bytes: m.file_bytes,
                used_bytes: m.data_end,
            })
            .collect()
    }

    /// Deletes every segment with id < `segment` (never the active one), then fsyncs the
    /// directory. Returns the bytes freed. Each deletion is counted as it happens
    /// (`spoolgate_compaction_segments_deleted_total`, `..._bytes_reclaimed_total`), and the
    /// directory is fsync'd after a deletion that failed part-way too, so that what was
    /// deleted is counted and stays deleted whether or not the rest followed.
    pub fn remove_segments_below(&self, segment: u64) -> Result<u64, SpoolError> {
        let active = self.durable_end().segment;
        let limit = segment.min(active);
        let victims: Vec<(u64, PathBuf, u64)> = self
            .shared
            .segments_read()
            .range(..limit)
            .map(|(&id, m)| (id, m.path.clone(), m.file_bytes))
            .collect();
        if victims.is_empty() {
            return Ok(0);
        }
        self.keep_durable_marker_at_or_after(limit);
        let mut freed = 0;
        for (id, path, bytes) in &victims {
            // Forget it first: readers then skip to the next segment instead of opening it.
            let forgotten = self.shared.segments_write().remove(id);
            match self.shared.fs.remove(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    // Still on disk, so still the spool's: forgotten, it would let the next
                    // pass delete the segments after it and leave it as the first of a gap
                    // that the next start reports as lost data (row 9).
                    if let Some(meta) = forgotten {
                        self.shared.segments_write().insert(*id, meta);
                    }
                    let failed = SpoolError::Io {
                        op: "remove segment",
                        path: path.clone(),
                        source,
                    };
                    // The removals before this one are durable already (below).
                    return Err(failed);
                }
            }
            // Each removal is made durable before the next, oldest first: a filesystem that
            // persisted a later unlink without an earlier one would bring back, after a power
            // loss, an old segment without the seals and tombstones of the ones after it, and
            // its envelopes would be gated and sequenced again. One directory fsync per
            // segment deleted (segments are tens of MiB) costs nothing that shows.
            self.sync_after_removal()?;
            freed += bytes;
            let m = &self.shared.metrics;
            m.compaction_segments_deleted_total.inc();
            m.compaction_bytes_reclaimed_total.inc_by(*bytes);
        }
        Ok(freed)
    }

    /// Before segments below `limit` are deleted: a durable-end marker naming one of them would
    /// tell the next start that its records were lost if the segments after it read as empty
    /// (a power loss before the first fdatasync in `limit`, in the `interval` and `never`
    /// modes). So the marker moves to the start of segment `limit`, whose header was made
    /// durable when it was created and before which nothing is written again. Where it cannot
    /// be made, the old marker goes instead: row 14 then has nothing to say until the next
    /// start or close, which is what it had before markers existed, and compaction, which may
    /// be freeing a full disk, goes on.
    fn keep_durable_marker_at_or_after(&self, limit: u64) {
        let (fs, dir) = (self.shared.fs.as_ref(), &self.shared.opts.dir);
        let Ok(names) = fs.list(dir) else {
            return;
        };
        if durable_marker(&names).is_none_or(|m| m.segment >= limit) {
            return;
        }
        let start = Position {
            segment: limit,
            offset: format::HEADER_LEN,
        };
        if let Err(e) = mark_durable(fs, dir, start) {
            tracing::warn!(error = %e, "could not move the durable-end marker past the segments compaction deletes; removing it");
            for n in names.iter().filter(|n| n.starts_with("durable-")) {
                let _ = fs.remove(&dir.join(n));
            }
        }
    }

    fn sync_after_removal(&self) -> Result<(), SpoolError> {
        self.shared
            .metrics
            .spool_segments_active
            .set(self.shared.segments_read().len() as i64);
        self.shared
            .fs
            .sync_dir(&self.shared.opts.dir)
            .map_err(|source| SpoolError::Io {
                op: "fsync directory",
                path: self.shared.opts.dir.clone(),
                source,
            })
    }

    pub fn segment_bytes_max(&self) -> u64 {
        self.shared.opts.segment_bytes_max
    }

    /// The largest payload one record may have.
    pub fn record_bytes_max(&self) -> u32 {
        self.shared.opts.record_bytes_max
    }

    /// Bytes the spool's segment files occupy (allocated length), the next segment prepared
    /// ahead of rotation included.
    pub fn disk_bytes(&self) -> u64 {
        let segments: u64 = self
            .shared
            .segments_read()
            .values()
            .map(|m| m.file_bytes)
            .sum();
        segments
            + self
                .shared
                .prepared_bytes
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `Some(reason)` once a write or fsync failed; appends then fail with `Poisoned`.
    pub fn poison_reason(&self) -> Option<String> {
        self.shared.poison_reason()
    }

    /// The most frame bytes one append can hold: it is written as one group in one segment,
    /// after the header and with room kept for the rotation frame. Ingest refuses a request
    /// over it; the pipeline's own appends (seals) may exceed it, and are then written past
    /// `segment_bytes_max` in a segment of their own.
    pub fn request_bytes_max(&self) -> u64 {
        self.shared
            .opts
            .segment_bytes_max
            .saturating_sub(format::HEADER_LEN + format::ROTATION_FRAME_BYTES_MAX)
    }

    /// The segment below which the writer has released (or is releasing) the cached pages of
    /// every segment (see Page cache above). Up to date when an append returns: the release
    /// a rotation starts is decided before its append is answered, though the helper thread
    /// may still be at work.
    pub fn cache_released_below(&self) -> u64 {
        self.shared
            .cache_released_below
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Append requests waiting for the writer thread (at most `queue_depth_max`).
    pub fn queued_requests(&self) -> usize {
        self.writer.queued_requests()
    }

    /// Flushes and fsyncs what is queued, stops the writer and releases the lock.
    pub fn close(&self) -> Result<(), SpoolError> {
        self.writer.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_segment_span_is_the_lowest_and_highest_segment_file_whatever_else_the_directory_holds() {
        let fs = std::sync::Arc::new(fs::MemFs::new());
        let dir = std::path::Path::new("/data/spool");
        assert_eq!(oldest_segment(&fs, dir).unwrap(), None);
        assert_eq!(segment_id_span(&fs, dir).unwrap(), None);
        for name in [
            "LOCK",
            "00000000000000000003.seg",
            "void-1-2",
            "durable-00000000000000000003-00000000000000000064",
            "7.seg",
        ] {
            fs.set_bytes(&dir.join(name), Vec::new());
        }
        assert_eq!(segment_id_span(&fs, dir).unwrap(), Some((3, 3)));
        fs.set_bytes(&dir.join("00000000000000000002.seg"), Vec::new());
        assert_eq!(oldest_segment(&fs, dir).unwrap(), Some(2));
        assert_eq!(segment_id_span(&fs, dir).unwrap(), Some((2, 3)));
        // A first start, before recovery has made the directory: no segment.
        let missing = tempfile::tempdir().unwrap().path().join("not-yet");
        assert_eq!(oldest_segment(&fs::StdFs, &missing).unwrap(), None);
    }

    #[test]
    fn a_durable_marker_names_a_position_and_the_latest_of_several_counts() {
        let at = |segment, offset| Position { segment, offset };
        let names: Vec<String> = [at(3, 4096), at(12, 64), at(12, 8)]
            .into_iter()
            .map(durable_marker_name)
            .chain(["durable-x-1".to_string(), "void-1-2".to_string()])
            .collect();
        assert_eq!(
            names[0],
            "durable-00000000000000000003-00000000000000004096"
        );
        assert_eq!(durable_marker(&names), Some(at(12, 64)));
        assert_eq!(durable_marker(&names[3..]), None);
    }

    #[test]
    fn marking_a_durable_end_leaves_one_marker_whatever_was_there() {
        let fs = std::sync::Arc::new(fs::MemFs::new());
        let dir = std::path::Path::new("/spool");
        let at = |segment, offset| Position { segment, offset };
        for p in [at(1, 64), at(2, 128)] {
            fs.set_bytes(&dir.join(durable_marker_name(p)), Vec::new());
        }
        mark_durable(&fs, dir, at(2, 128)).unwrap();
        mark_durable(&fs, dir, at(3, 64)).unwrap();
        let names = fs::FileSystem::list(&fs, dir).unwrap();
        assert_eq!(names, vec![durable_marker_name(at(3, 64))]);
    }
}
