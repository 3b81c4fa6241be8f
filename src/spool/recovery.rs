//! Recovery: what `open` does before the first append. The decision table it implements is in
//! spool-format.md ("Recovery"); each row has a test in tests/spool_recovery.rs.
//!
//! Recovery reads each segment once, into one buffer reused for the next, and skips what the
//! filesystem reports as holes: a preallocated segment is its data followed by `fallocate`d
//! blocks that were never written, and reading those zeros was most of a small spool's time to
//! ready (recovery took 92 ms of 101 for a near-empty 64 MiB active segment, 4-5 ms without;
//! benches/results/ready-2026-12-02T0705Z.md). Skipping is exact only because the buffer
//! extends one longest frame past the last data (see `read_segment_into`);
//! tests/spool_holes.rs and the segment_reader fuzz target check it against reading every byte.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::format::{self, Scanned, SegmentHeader, HEADER_LEN};
use super::fs::FileSystem;
use super::writer::{create_segment, CreateError};
use super::{
    parse_segment_name, segment_path, DamagedRange, Position, RecoveryReport, SegMeta, SpoolError,
    SpoolOptions,
};
use crate::metrics::Metrics;

/// How often recovery logs its progress (a 4 GiB spool takes about 6 s on a 2-vCPU VM).
const PROGRESS_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct Recovered {
    pub segments: BTreeMap<u64, SegMeta>,
    pub end: Position,
    pub report: RecoveryReport,
    pub lock: Box<dyn Send + Sync>,
    /// The longest frame payload a segment of this spool may hold (see `recover`).
    pub payload_max: u32,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Gives the segment before the active one the rotation frame it lacks, when appends start in a
/// segment that holds nothing yet: the one the writer prepared before a stop, or one created
/// at this start (rows 6 and 11). The writer names a segment only when it rotates into it, so
/// without this the segment appends start in would be named by nothing until it fills, and
/// its removal would look like a spool that ended earlier.
///
/// Only then: the segment written to is the newest one with data, so a write torn by a crash
/// here is a torn tail of that segment (row 4), zeroed at the next start, never damage in an
/// older one. Not when the segment ends in damage left as found (row 5), nor when it holds a
/// rotation frame already (naming a segment found missing, row 9), nor when no room is left for
/// the frame (a segment written before the writer kept room for it): in those cases appends
/// start unnamed, as before. A full filesystem costs the frame and nothing else; any other
/// write error fails the start, as recovery's other writes do.
///
/// Nor before the durable end (row 14): a write there that a crash tore would read as damage
/// to acknowledged records at the next start.
fn close_before_active(
    opts: &SpoolOptions,
    segments: &mut BTreeMap<u64, SegMeta>,
    unclosed: &std::collections::BTreeSet<u64>,
    durable_at: Option<Position>,
) -> Result<(), SpoolError> {
    let Some((&active, active_meta)) = segments.iter().next_back() else {
        return Ok(());
    };
    if active_meta.data_end > HEADER_LEN || active < 2 || !unclosed.contains(&(active - 1)) {
        return Ok(());
    }
    let Some(meta) = segments.get_mut(&(active - 1)) else {
        return Ok(());
    };
    let at = meta.data_end;
    if at + format::ROTATION_FRAME_BYTES_MAX > opts.segment_bytes_max {
        return Ok(());
    }
    let position = Position {
        segment: active - 1,
        offset: at,
    };
    if durable_at.is_some_and(|d| position < d) {
        return Ok(());
    }
    let frame = format::Rotation {
        next_segment: active,
    }
    .frame();
    let path = meta.path.clone();
    match meta.file.write_all_at(&frame, at) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(28) => {
            if opts.preallocate {
                meta.file
                    .write_all_at(&vec![0u8; frame.len()], at)
                    .map_err(io("zero a refused rotation frame", &path))?;
            } else {
                meta.file
                    .set_len(at)
                    .map_err(io("truncate a refused rotation frame", &path))?;
            }
            meta.file.sync_data().map_err(io("fdatasync", &path))?;
            tracing::warn!(
                segment = active - 1,
                "no room to name the active segment in a rotation frame; it stays unnamed \
                 until it fills"
            );
            return Ok(());
        }
        Err(e) => return Err(io("write a rotation frame", &path)(e)),
    }
    meta.file.sync_data().map_err(io("fdatasync", &path))?;
    meta.data_end = at + frame.len() as u64;
    meta.file_bytes = meta.file_bytes.max(meta.data_end);
    Ok(())
}

/// Reads a whole file through the seam.
pub(crate) fn read_all(file: &dyn super::fs::SegmentFile, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let read = read_prefix(file, &mut buf)?;
    buf.truncate(read);
    Ok(buf)
}

/// The ranges of a file of `len` bytes that its filesystem does not report as holes, in order
/// and apart (at most one per filesystem block). Everything outside them reads as zeros.
fn data_ranges(file: &dyn super::fs::SegmentFile, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut at = 0u64;
    while at < len {
        let Some(start) = file.seek_data(at)? else {
            break;
        };
        // An answer before `at` would make ranges overlap (and the loop go back): the bytes
        // from `at` on are what is asked about.
        let start = start.max(at);
        if start >= len {
            break;
        }
        let mut end = file.seek_hole(start)?.min(len);
        if end <= start {
            // An answer that makes no progress: take the rest as data rather than loop.
            end = len;
        }
        ranges.push((start, end));
        at = end;
    }
    Ok(ranges)
}

/// Reads a segment for recovery into `buf`, reusing its memory (segments are all about the
/// same size, so after the first one nothing is allocated again; zeroing a fresh 64 MiB buffer
/// per segment was 6-8% of start-up), and skipping what the filesystem reports as holes.
///
/// `buf` ends up holding the file's first `min(len, end of its last data + pad_bytes)` bytes,
/// any hole before the last data range zero-filled, the `pad_bytes` after it read; every byte
/// of the file past `buf.len()` reads as zero.
/// With `pad_bytes` at least the longest frame, a frame that starts in the data is whole in
/// `buf` even if its tail lies in a hole (a filesystem that turns zero blocks into holes may
/// put a payload's run of zeros there), so scanning `buf` finds exactly what scanning the whole
/// file would: the same frames, damaged ranges, data end and tail garbage. What it saves is the
/// preallocated zeros: `fallocate`'s unwritten extents are holes to ext4 and XFS, and reading
/// the 64 MiB of a nearly empty active segment was most of a small spool's time to ready.
fn read_segment_into(
    file: &dyn super::fs::SegmentFile,
    len: u64,
    pad_bytes: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let ranges = data_ranges(file, len)?;
    let kept = ranges
        .last()
        .map_or(0, |&(_, end)| end)
        .saturating_add(pad_bytes)
        .min(len) as usize;
    buf.resize(kept, 0);
    let mut filled = 0usize;
    for (start, end) in ranges {
        let (start, end) = (start as usize, end as usize);
        buf[filled..start].fill(0);
        let read = read_at_most(file, &mut buf[start..end], start as u64)?;
        if read < end - start {
            // The file is shorter than it said: keep what is there, as a reader would.
            buf.truncate(start + read);
            return Ok(());
        }
        filled = end;
    }
    // The bytes after the last data are read rather than taken as the zeros the filesystem
    // says they are: the writer appends there, so they are the bytes a filesystem that wrongly
    // reported acknowledged data as a hole would have it overwrite. Read, such data shows up
    // as frames (or as a damaged range) instead. It costs one longest frame of reading.
    let read = read_at_most(file, &mut buf[filled..kept], filled as u64)?;
    buf.truncate(filled + read);
    Ok(())
}

/// Drops from the page cache what lies past a segment's data end. Reading an unwritten extent
/// leaves zero pages in the cache (recovery's padding read, the readahead it starts, a
/// whole-segment read by `inspect` or `verify`), and ext4 and XFS then report those pages as
/// data: left there, every restart found more "data" and read more of it (3, then 15, then
/// 15 MiB more; 10 ms to ready after a kill, then 17-25, then 32-36 ms), and a restart after
/// an `inspect` of a 64 MiB segment read it all (recovery 70 ms). What lies past the data end
/// is zeros the writer has yet to write, so its clean pages can go; the advice drops nothing
/// dirty and changes no file, and failing to take it costs only time.
pub(crate) fn forget_zeros(
    file: &dyn super::fs::SegmentFile,
    data_end: u64,
    len: u64,
) -> std::io::Result<()> {
    file.release_cache_range(data_end, len.saturating_sub(data_end))
}

/// Whether a segment holds only zeros from `from` on, reading no more of it than it takes to
/// find a non-zero byte: a prepared segment is mostly holes, and the newest segment with data
/// shows data at once.
fn zeros_from(file: &dyn super::fs::SegmentFile, len: u64, from: u64) -> std::io::Result<bool> {
    const CHUNK_BYTES: usize = 64 << 10;
    let mut chunk = vec![0u8; CHUNK_BYTES];
    for (start, end) in data_ranges(file, len)? {
        let mut at = start.max(from);
        while at < end {
            let want = ((end - at) as usize).min(CHUNK_BYTES);
            let n = file.read_at(&mut chunk[..want], at)?;
            if n == 0 {
                return Ok(true);
            }
            if chunk[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
    }
    Ok(true)
}

/// Reads the first `buf.len()` bytes of a file, or as many as it has; returns how many.
fn read_prefix(file: &dyn super::fs::SegmentFile, buf: &mut [u8]) -> std::io::Result<usize> {
    read_at_most(file, buf, 0)
}

/// Fills `buf` from `offset`, stopping early only at the end of the file; returns how many
/// bytes were read.
fn read_at_most(
    file: &dyn super::fs::SegmentFile,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<usize> {
    let mut at = 0usize;
    while at < buf.len() {
        let n = file.read_at(&mut buf[at..], offset + at as u64)?;
        if n == 0 {
            break;
        }
        at += n;
    }
    Ok(at)
}

/// An estimate of the records lost in a damaged range: the aligned frame markers in it, at
/// least one.
pub(crate) fn records_in(bytes: &[u8]) -> u64 {
    let markers = bytes
        .chunks(format::FRAME_ALIGN as usize)
        .filter(|c| c.len() >= 4 && c[..4] == format::FRAME_MARKER)
        .count() as u64;
    markers.max(1)
}

/// The void markers among a spool directory's file names: for each segment, the lowest offset
/// from which a poisoned writer refused what it had written (never acknowledged; recovery
/// zeroes it).
pub(crate) fn void_markers(names: &[String]) -> BTreeMap<u64, u64> {
    let mut voids: BTreeMap<u64, u64> = BTreeMap::new();
    for n in names {
        if let Some(rest) = n.strip_prefix("void-") {
            if let Some((seg, off)) = rest.split_once('-') {
                if let (Ok(seg), Ok(off)) = (seg.parse::<u64>(), off.parse::<u64>()) {
                    let e = voids.entry(seg).or_insert(off);
                    *e = (*e).min(off);
                }
            }
        }
    }
    voids
}

pub(crate) fn recover(
    opts: &SpoolOptions,
    fs: &dyn FileSystem,
    metrics: &Metrics,
    visit: &mut dyn FnMut(super::RecordView<'_>),
) -> Result<Recovered, SpoolError> {
    let started = Instant::now();
    fs.create_dir_all(&opts.dir)
        .map_err(io("create directory", &opts.dir))?;
    let lock_path = opts.dir.join("LOCK");
    let lock = fs.lock(&lock_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            SpoolError::Locked(opts.dir.clone())
        } else {
            SpoolError::Io {
                op: "lock",
                path: lock_path.clone(),
                source: e,
            }
        }
    })?;
    let names = fs
        .list(&opts.dir)
        .map_err(io("list directory", &opts.dir))?;
    let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    ids.sort_unstable();
    let voids = void_markers(&names);
    // The durable end a clean close or the last start recorded (row 14): everything before it
    // was durable, so bytes there that do not read are damage to acknowledged records, never a
    // torn write.
    let durable_at = super::durable_marker(&names);

    let mut report = RecoveryReport::default();
    let mut segments = BTreeMap::new();
    // Set when the newest segment's header is damaged: appends then go to a fresh segment
    // rather than after frames whose container is in doubt.
    let mut fresh_segment_needed = false;
    // What the rotation frame of the segment read last names (the newest one, once the loop
    // is done): the segment the spool went on in.
    let mut rotated_to: Option<u64> = None;
    // Segments with no rotation frame whose data ends cleanly (no damaged tail left in place):
    // the one before the active segment may be given its frame at the end (see below).
    let mut unclosed: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    // Segments of an older format version (a spool written before an upgrade): appends do
    // not go on in one, so that an older build can still read every segment it wrote.
    let mut older_format: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    // Whether row 7 removed the newest file, whose id is then free again.
    let mut removed_last = false;
    let last = ids.last().copied();
    // The segment a crash can leave a torn write in: the newest one, or the newest one with
    // data when the writer had already prepared the next (an intact header followed only by
    // zeros, spool-format.md §1).
    // Row 12 first, over every segment's header: a spool with a segment of a format version
    // this build does not know is refused before anything (a void range, a torn tail, a row-7
    // file) is changed in any of them.
    //
    // The same pass finds the longest frame payload any segment may hold: the largest
    // `record_bytes_max` its headers recorded, and at least the configured one. Frames are read
    // with that bound, not the configured one alone: lowering `spool.record_bytes_max` must not
    // make acknowledged frames written under the larger bound read as damage (in the newest
    // segment, as a torn tail to zero).
    let mut payload_max = opts.record_bytes_max;
    for &id in &ids {
        let path = segment_path(&opts.dir, id);
        let file = fs.open(&path).map_err(io("open segment", &path))?;
        let mut header = [0u8; HEADER_LEN as usize];
        let read = read_prefix(file.as_ref(), &mut header).map_err(io("read segment", &path))?;
        if let Some(version) = SegmentHeader::unknown_version(&header[..read]) {
            return Err(SpoolError::Invalid(format!(
                "{} was written by spool format version {version}; this build reads versions {} to {}",
                path.display(),
                format::FORMAT_VERSION_OLDEST,
                format::FORMAT_VERSION
            )));
        }
        if let Ok(h) = SegmentHeader::decode(&header[..read]) {
            if h.record_bytes_max > payload_max {
                tracing::info!(
                    segment = id,
                    recorded = h.record_bytes_max,
                    configured = opts.record_bytes_max,
                    "a segment was written with a larger spool.record_bytes_max than configured: \
                     its frames are read with the larger bound"
                );
                payload_max = h.record_bytes_max;
            }
        }
    }
    let mut tail_segment = last;
    // The newest segment that stays: the newest file, unless it holds only zeros and no header
    // (a rotation or preparation that crashed before the header was synced, removed below as
    // row 7), in which case the one before it. Rows 4 and 6 are about this one: a torn tail
    // here is never-acknowledged bytes to zero, not damage to report and leave in place.
    let mut newest_kept = last;
    for (n, &id) in ids.iter().rev().enumerate() {
        let path = segment_path(&opts.dir, id);
        let file = fs.open(&path).map_err(io("open segment", &path))?;
        let len = file.len().map_err(io("stat segment", &path))?;
        let mut header = [0u8; HEADER_LEN as usize];
        let header_read =
            read_prefix(file.as_ref(), &mut header).map_err(io("read segment", &path))?;
        let header_ok = SegmentHeader::decode(&header[..header_read]).is_ok();
        if n == 0
            && !header_ok
            && zeros_from(file.as_ref(), len, 0).map_err(io("read segment", &path))?
        {
            newest_kept = ids.iter().rev().nth(1).copied();
            tail_segment = newest_kept;
            continue;
        }
        let prepared = header_ok
            && zeros_from(file.as_ref(), len, HEADER_LEN).map_err(io("read segment", &path))?;
        tail_segment = Some(id);
        if !prepared {
            break;
        }
    }
    // How much is read past a segment's last data: its longest frame (see `read_segment_into`).
    let pad_bytes = format::frame_len(payload_max as usize) + HEADER_LEN;
    // One buffer for every segment in turn: recovery's memory is one segment.
    let mut bytes = Vec::new();
    let mut progress_logged = Instant::now();
    for (n, &id) in ids.iter().enumerate() {
        // A large spool takes seconds per GB: say how far it got, so that an operator watching
        // a start-up that is not ready yet sees it working rather than hung.
        if progress_logged.elapsed() >= PROGRESS_LOG_INTERVAL {
            progress_logged = Instant::now();
            tracing::info!(
                segment = n + 1,
                segments = ids.len(),
                records = report.records,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "recovering the spool"
            );
        }
        if n > 0 && ids[n - 1] + 1 < id {
            let (first, last) = (ids[n - 1] + 1, id - 1);
            tracing::error!(
                first_missing = first,
                last_missing = last,
                "segments are missing between two present ones: the envelopes they held were \
                 acknowledged and are lost (compaction deletes only the oldest segments); \
                 continuing with the next segment"
            );
            report.missing_segments.push([first, last]);
        }
        let path = segment_path(&opts.dir, id);
        let file = fs.open(&path).map_err(io("open segment", &path))?;
        let file_len = file.len().map_err(io("stat segment", &path))?;
        read_segment_into(file.as_ref(), file_len, pad_bytes, &mut bytes)
            .map_err(io("read segment", &path))?;
        let is_last = Some(id) == last;
        let is_newest_kept = Some(id) == newest_kept;

        if let Some(&void_at) = voids.get(&id) {
            if (void_at as usize) < bytes.len() {
                let dropped = bytes[void_at as usize..]
                    .iter()
                    .rposition(|&b| b != 0)
                    .map_or(0, |p| p + 1);
                tracing::warn!(
                    segment = id,
                    offset = void_at,
                    bytes = dropped,
                    "dropping a batch whose write or fsync failed (never acknowledged)"
                );
                let zeros = vec![0u8; bytes.len() - void_at as usize];
                file.write_all_at(&zeros, void_at)
                    .map_err(io("zero void range", &path))?;
                file.sync_data().map_err(io("fdatasync", &path))?;
                bytes[void_at as usize..].fill(0);
                report.torn_tail_bytes += dropped as u64;
            }
        }

        let header = SegmentHeader::decode(&bytes);
        let created_ms = header.as_ref().ok().map(|h| h.created_ms);
        if matches!(&header, Ok(h) if h.version < format::FORMAT_VERSION) {
            older_format.insert(id);
        }
        match header {
            Ok(h) if h.segment_id == id => {}
            Ok(h) => {
                tracing::warn!(
                    segment = id,
                    header_id = h.segment_id,
                    "segment header names another id; trusting the file name"
                );
            }
            Err(why) => {
                let has_frames = format::resync(&bytes, HEADER_LEN as usize, payload_max).is_some();
                if is_last && !has_frames && bytes.iter().all(|&b| b == 0) {
                    // A rotation that crashed before its header was written: nothing in it
                    // was ever acknowledged.
                    tracing::warn!(
                        segment = id,
                        "removing an incomplete new segment (crash during rotation)"
                    );
                    fs.remove(&path).map_err(io("remove segment", &path))?;
                    fs.sync_dir(&opts.dir)
                        .map_err(io("fsync directory", &opts.dir))?;
                    removed_last = true;
                    continue;
                }
                tracing::warn!(segment = id, reason = %why, "segment header damaged; reading its frames anyway");
                fresh_segment_needed |= is_newest_kept;
                let range = DamagedRange {
                    segment: id,
                    offset: 0,
                    len_bytes: HEADER_LEN.min(bytes.len() as u64),
                    records_lost: 0,
                };
                report.damaged.push(range);
            }
        }

        let scanned = format::scan(&bytes, payload_max);
        let mut damaged = Vec::new();
        rotated_to = None;
        let mut has_rotation = false;
        for item in &scanned.items {
            match item {
                Scanned::Frame {
                    kind,
                    payload_start,
                    payload_len,
                    stuffed,
                    ..
                } if *kind == super::RecordKind::ROTATION.0 => {
                    has_rotation = true;
                    rotated_to = format::Rotation::decode(&format::unstuffed(
                        &bytes[*payload_start..*payload_start + *payload_len],
                        *stuffed,
                    ))
                    .map(|r| r.next_segment);
                }
                Scanned::Frame { .. } => report.records += 1,
                Scanned::Damaged { offset, len } => {
                    let lost = records_in(&bytes[*offset as usize..(*offset + *len) as usize]);
                    tracing::warn!(
                        segment = id,
                        offset,
                        bytes = len,
                        records_lost = lost,
                        "skipping a damaged range"
                    );
                    report.damaged.push(DamagedRange {
                        segment: id,
                        offset: *offset,
                        len_bytes: *len,
                        records_lost: lost,
                    });
                    damaged.push((*offset, *offset + *len));
                }
            }
        }
        // Rows 4 and 5: a tail where a crash can tear a write is zeroed, any other is damage.
        // Row 14: not a tail that starts before the durable end.
        let at_the_end = is_newest_kept || Some(id) == tail_segment;
        let durable_after = durable_at.is_some_and(|c| {
            c > Position {
                segment: id,
                offset: scanned.data_end,
            }
        });
        let tail_is_torn_write = at_the_end && !durable_after;
        // Row 14 with zeros where the data was: the durable end's own segment reads as zeros
        // (blocks lost, or the file cut) from its data end up to the durable offset.
        let zeros_lost = durable_at.filter(|c| {
            scanned.tail_garbage_bytes == 0 && c.segment == id && c.offset > scanned.data_end
        });
        let tail_zeroed = scanned.tail_garbage_bytes == 0 || tail_is_torn_write;
        // A segment whose reported loss would be written over by a rotation frame is left
        // without one, as found.
        if !has_rotation && tail_zeroed && zeros_lost.is_none() {
            unclosed.insert(id);
        }
        if at_the_end && durable_after {
            // Appends must not go on over acknowledged bytes, damaged or lost.
            fresh_segment_needed |= is_newest_kept;
        }
        if scanned.tail_garbage_bytes > 0 {
            let at = scanned.data_end;
            let len = scanned.tail_garbage_bytes;
            if tail_is_torn_write {
                // Bytes after the last valid frame of the newest segment were never
                // acknowledged (an acknowledgement waits for the whole batch's fdatasync):
                // a torn write. Zero them so the next append starts clean.
                tracing::warn!(
                    segment = id,
                    offset = at,
                    bytes = len,
                    "truncating a torn tail"
                );
                file.write_all_at(&vec![0u8; len as usize], at)
                    .map_err(io("zero torn tail", &path))?;
                if !opts.preallocate {
                    file.set_len(at).map_err(io("truncate torn tail", &path))?;
                }
                file.sync_data().map_err(io("fdatasync", &path))?;
                report.torn_tail_bytes += len;
            } else {
                let lost = records_in(&bytes[at as usize..(at + len) as usize]);
                if at_the_end {
                    tracing::warn!(
                        segment = id,
                        offset = at,
                        bytes = len,
                        records_lost = lost,
                        "records before the durable end are damaged (they were acknowledged; a \
                         torn write can only follow them); appends go on in a new segment"
                    );
                } else {
                    tracing::warn!(
                        segment = id,
                        offset = at,
                        bytes = len,
                        records_lost = lost,
                        "the tail of a sealed segment is damaged"
                    );
                }
                report.damaged.push(DamagedRange {
                    segment: id,
                    offset: at,
                    len_bytes: len,
                    records_lost: lost,
                });
            }
        }
        if let Some(c) = zeros_lost {
            // Their number is unknown; at least one.
            tracing::warn!(
                segment = id,
                offset = scanned.data_end,
                bytes = c.offset - scanned.data_end,
                "records before the durable end read as zeros (they were acknowledged and are \
                 lost); appends go on in a new segment"
            );
            report.damaged.push(DamagedRange {
                segment: id,
                offset: scanned.data_end,
                len_bytes: c.offset - scanned.data_end,
                records_lost: 1,
            });
        }
        // A process killed between a write and its fdatasync leaves valid frames in the page
        // cache, which read back here like durable ones. Their ids go into the dedup index,
        // so a client retrying that unanswered request would be told 202 (duplicate) about
        // bytes a power loss could still take. So the segments such writes can be in are made
        // durable before anything is answered from them: one without a rotation frame (the
        // active one), and the one before the newest (a kill between writing a rotation frame
        // and its fdatasync leaves the records before it unsynced in the weaker modes).
        // Synced before the cached pages past the data are dropped: dirty pages are not.
        if !has_rotation || newest_kept.is_some_and(|n| id + 1 >= n) {
            file.sync_data().map_err(io("fdatasync", &path))?;
        }
        if let Err(e) = forget_zeros(file.as_ref(), scanned.data_end, file_len) {
            tracing::debug!(segment = id, error = %e, "could not drop cached pages past the data");
        }
        // The segment is settled: hand its records over in order. They are what a reader
        // will return from this segment: every valid frame before `data_end`, none of the
        // damaged ranges.
        for item in &scanned.items {
            if let Scanned::Frame {
                offset,
                kind,
                payload_start,
                payload_len,
                stuffed,
            } = *item
            {
                if kind == super::RecordKind::ROTATION.0 {
                    continue;
                }
                let payload =
                    format::unstuffed(&bytes[payload_start..payload_start + payload_len], stuffed);
                // The whole frame, padding included, as a reader steps over it (a file cut
                // inside the last frame's padding still holds that frame).
                let total = format::frame_len(payload_len);
                visit(super::RecordView {
                    position: Position {
                        segment: id,
                        offset,
                    },
                    kind: super::RecordKind(kind),
                    payload: &payload,
                    next: Position {
                        segment: id,
                        offset: offset + total,
                    },
                    segment_created_ms: created_ms,
                });
            }
        }
        segments.insert(
            id,
            SegMeta {
                path,
                file,
                file_bytes: file_len,
                data_end: scanned.data_end.max(HEADER_LEN),
                damaged,
            },
        );
    }
    for n in names.iter().filter(|n| n.starts_with("void-")) {
        let p = opts.dir.join(n);
        fs.remove(&p).map_err(io("remove void marker", &p))?;
    }
    if !voids.is_empty() {
        fs.sync_dir(&opts.dir)
            .map_err(io("fsync directory", &opts.dir))?;
    }

    // A new segment takes the id after every file that was here, or the id of the newest file
    // if row 7 removed it: a crash while the first segment of a new spool was being created
    // must not start the spool at segment 2, which would read as compacted.
    let mut fresh_id = match ids.last() {
        Some(&last) if removed_last => last,
        Some(&last) => last + 1,
        None => 1,
    };
    let newest = segments.keys().next_back().copied();
    if let Some([missing, _]) = newest.and_then(|n| super::missing_after_newest(n, rotated_to)) {
        // The newest segment ended with a rotation, so appends went on in the next one, which
        // a rotation creates (header written, fdatasync'd, directory fsync'd) before it names
        // it. So that segment is missing (removed, or left without its header and removed as
        // row 7 above) and the envelopes it held, acknowledged, are lost. Reported once: a
        // missing segment between two present files was reported as their gap already.
        let reported = report
            .missing_segments
            .iter()
            .any(|&[first, last]| first <= missing && missing <= last);
        if !reported {
            tracing::error!(
                first_missing = missing,
                last_missing = missing,
                "the newest segment is missing: the rotation frame ending segment {} says the \
                 spool went on in segment {missing}; the envelopes it held were acknowledged \
                 and are lost, as are those of any segment after it; appends continue in \
                 segment {}",
                missing - 1,
                missing + 1
            );
            report.missing_segments.push([missing, missing]);
        }
        // A fresh segment after the missing one leaves it a gap, which every later start
        // reports again (row 9) until compaction deletes past it; appends never follow a
        // rotation frame.
        fresh_id = fresh_id.max(missing + 1);
        fresh_segment_needed = true;
    }
    if let Some(c) = durable_at.filter(|c| {
        c.offset > HEADER_LEN
            && !segments.contains_key(&c.segment)
            // Gone with every later segment holding nothing: not compacted, since compaction
            // moves the marker past the segments it deletes (`remove_segments_below`).
            && segments
                .range(c.segment..)
                .all(|(_, m)| m.data_end == HEADER_LEN)
            && !report
                .missing_segments
                .iter()
                .any(|&[first, last]| first <= c.segment && c.segment <= last)
    }) {
        // Row 14 with the durable end's segment gone, whatever names it: the envelopes it held
        // were acknowledged. With no segment before it, the ones before may have been
        // compacted: only it is known.
        let first = segments
            .range(..c.segment)
            .next_back()
            .map_or(c.segment, |(&id, _)| id + 1);
        tracing::error!(
            first_missing = first,
            last_missing = c.segment,
            "the segment the spool's durable end is in is missing: the envelopes it held were \
             acknowledged and are lost"
        );
        report.missing_segments.push([first, c.segment]);
        if newest.is_none_or(|n| n < c.segment) {
            // Appends go on after it, so that the loss stays a gap later starts report.
            fresh_id = fresh_id.max(c.segment + 1);
            fresh_segment_needed = true;
        }
    }
    if let Some(newest) = newest.filter(|n| older_format.contains(n) && !fresh_segment_needed) {
        let meta = &segments[&newest];
        if meta.data_end == HEADER_LEN {
            // Nothing in it yet (prepared by the older build): it becomes a segment of this
            // version in place, rather than an empty segment left behind a new one.
            let mut header = [0u8; HEADER_LEN as usize];
            let read = read_prefix(meta.file.as_ref(), &mut header)
                .map_err(io("read segment", &meta.path))?;
            let mut h = SegmentHeader::decode(&header[..read]).map_err(SpoolError::Invalid)?;
            h.version = format::FORMAT_VERSION;
            meta.file
                .write_all_at(&h.encode(), 0)
                .map_err(io("rewrite segment header", &meta.path))?;
            meta.file.sync_data().map_err(io("fdatasync", &meta.path))?;
            tracing::info!(
                segment = newest,
                version = format::FORMAT_VERSION,
                "the newest segment, empty, was of an older format version (row 13); its header now says this build's"
            );
        } else {
            tracing::info!(
                segment = newest,
                version = format::FORMAT_VERSION,
                "the newest segment is of an older format version (row 13); appends continue in a new segment of this build's version"
            );
            fresh_id = fresh_id.max(newest + 1);
            fresh_segment_needed = true;
        }
    }
    if segments.is_empty() || fresh_segment_needed {
        let id = fresh_id;
        let file = match create_segment(opts, fs, metrics, id) {
            Ok(f) => f,
            Err(CreateError::Full(why)) => return Err(SpoolError::Full(why)),
            Err(CreateError::Busy(why)) => return Err(SpoolError::Busy(why)),
            Err(CreateError::Io(why)) => return Err(SpoolError::Invalid(why)),
        };
        let file_bytes = file.len().unwrap_or(HEADER_LEN);
        segments.insert(
            id,
            SegMeta {
                path: segment_path(&opts.dir, id),
                file,
                file_bytes,
                data_end: HEADER_LEN,
                damaged: Vec::new(),
            },
        );
    }
    close_before_active(opts, &mut segments, &unclosed, durable_at)?;
    let (&active, meta) = segments.iter().next_back().expect("at least one segment");
    let end = Position {
        segment: active,
        offset: meta.data_end,
    };
    // Everything before `end` is durable now (the segments a crash could have left unsynced
    // were fdatasync'd above) and appends begin there: recorded, a kill after this start
    // cannot make damage to what this start found read as a torn write at the next one.
    if let Err(e) = super::mark_durable(fs, &opts.dir, end) {
        tracing::warn!(
            segment = end.segment,
            offset = end.offset,
            error = %e,
            "could not record the spool's durable end: damage to the last records would read \
             as a torn tail at the next start"
        );
    }
    report.segments = segments.len();
    report.duration = started.elapsed();
    let lost: u64 = report.damaged.iter().map(|d| d.records_lost).sum();
    let lost_bytes: u64 = report.damaged.iter().map(|d| d.len_bytes).sum();
    metrics.recovery_corrupt_records_dropped_total.inc_by(lost);
    metrics
        .recovery_corrupt_bytes_dropped_total
        .inc_by(lost_bytes);
    metrics
        .recovery_torn_tail_bytes_truncated_total
        .inc_by(report.torn_tail_bytes);
    metrics.recovery_segments_missing_total.inc_by(
        report
            .missing_segments
            .iter()
            .map(|[first, last]| last - first + 1)
            .sum(),
    );
    metrics
        .recovery_duration_seconds
        .set(report.duration.as_secs_f64());
    Ok(Recovered {
        segments,
        end,
        report,
        lock,
        payload_max,
    })
}
