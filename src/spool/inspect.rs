//! `spoolgate inspect DIR`: an offline, read-only look at a spool directory. It takes no lock
//! and changes nothing, so it is safe next to a running daemon (whose newest bytes may then
//! show up as a torn tail). It reads segments whole, then drops the zeros it read past each
//! one's data from the page cache, where they would slow the daemon's next start.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::format::{self, Scanned, SegmentHeader, HEADER_LEN};
use super::fs::{FileSystem, SegmentFile, StdFs};
use super::recovery::{forget_zeros, read_all, records_in, void_markers};
use super::{parse_segment_name, segment_path, DamagedRange, SpoolError};

/// Largest frame payload `inspect` accepts: it does not know the daemon's `record_bytes_max`.
const INSPECT_PAYLOAD_MAX: u32 = 1 << 30;

#[derive(Debug, Serialize)]
pub struct SegmentReport {
    pub id: u64,
    pub file_bytes: u64,
    pub data_end: u64,
    pub header: Result<SegmentHeaderView, String>,
    /// Record counts by kind name.
    pub records: BTreeMap<String, u64>,
    pub damaged: Vec<DamagedRange>,
    pub tail_garbage_bytes: u64,
    /// Envelopes in this segment that no tombstone in the spool names, orphans included: what
    /// compaction waits for before it can delete the segment, and what the next start
    /// replays. Reading seals and tombstones is the forwarding layer's business, so
    /// [`inspect`] leaves this `None` and `spoolgate inspect` fills it in
    /// (`forward::ledger::pending_in_spool`, which runs the start-up scan).
    pub pending_envelopes: Option<u64>,
    /// Of the pending envelopes, the orphans: sealed envelopes whose own frame is damaged,
    /// which the next start re-sends from their seals. Filled in with `pending_envelopes`.
    pub orphan_envelopes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct SegmentHeaderView {
    /// The format version (spool-format.md §2): 2 since 2026-12-04, 1 before.
    pub version: u16,
    pub segment_id: u64,
    pub created_ms: u64,
    pub segment_bytes_max: u64,
    /// 0 in segments written before the header recorded it.
    pub record_bytes_max: u32,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub dir: String,
    pub segments: Vec<SegmentReport>,
    /// Gaps in the segment ids, `[first missing, last missing]`: segments something other
    /// than compaction removed (see [`super::RecoveryReport::missing_segments`]).
    pub missing_segments: Vec<[u64; 2]>,
}

pub fn kind_name(kind: u8) -> String {
    match kind {
        1 => "envelope".into(),
        2 => "sealed".into(),
        3 => "tombstone".into(),
        4 => "rotation".into(),
        k => format!("kind-{k}"),
    }
}

/// Whether `dir` holds segment files (a spool directory rather than, say, a sink's output).
pub fn holds_segments(dir: &Path) -> bool {
    StdFs
        .list(dir)
        .map(|names| names.iter().any(|n| parse_segment_name(n).is_some()))
        .unwrap_or(false)
}

/// Calls `f` with the position, kind and payload of every valid frame of every segment in
/// `dir`, in log order, one segment in memory at a time; returns the damaged ranges it
/// stepped over. Frames in a range a void marker refuses are skipped, as recovery drops them.
/// Read-only, like [`inspect`]. `f`'s first error stops the walk.
pub fn for_each_frame<E: From<SpoolError>>(
    dir: &Path,
    mut f: impl FnMut(super::Position, u8, &[u8]) -> Result<(), E>,
) -> Result<Vec<DamagedRange>, E> {
    let (names, ids) = list_segments(dir)?;
    let voids = void_markers(&names);
    let mut damaged = Vec::new();
    for id in ids {
        let void_at = voids.get(&id).copied().unwrap_or(u64::MAX);
        let (bytes, file) = read_segment(dir, id)?;
        let scanned = format::scan(&bytes, INSPECT_PAYLOAD_MAX);
        // Advice only: failing to take it costs the daemon's next start time, nothing else.
        let _ = forget_zeros(file.as_ref(), scanned.data_end, bytes.len() as u64);
        for item in scanned.items {
            match item {
                Scanned::Frame { offset, .. } if offset >= void_at => {}
                Scanned::Frame {
                    offset,
                    kind,
                    payload_start,
                    payload_len,
                    stuffed,
                } => f(
                    super::Position {
                        segment: id,
                        offset,
                    },
                    kind,
                    &format::unstuffed(&bytes[payload_start..payload_start + payload_len], stuffed),
                )?,
                Scanned::Damaged { offset, len } => {
                    damaged.push(damaged_range(id, &bytes, offset, len))
                }
            }
        }
    }
    Ok(damaged)
}

/// The ids of the segments in `dir`, in ascending order: the segments that are there, which
/// the start-up scan needs to tell an orphan from an envelope lost with its segment.
pub(crate) fn segment_ids(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    Ok(list_segments(dir)?.1)
}

/// The file names in `dir`, and the ids of its segments in ascending order.
fn list_segments(dir: &Path) -> Result<(Vec<String>, Vec<u64>), SpoolError> {
    let names = StdFs.list(dir).map_err(|source| SpoolError::Io {
        op: "list directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ids: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
    ids.sort_unstable();
    Ok((names, ids))
}

/// A segment's bytes, read whole (segments are bounded by `spool.segment_bytes_max`), and its
/// file, for `forget_zeros`.
fn read_segment(dir: &Path, id: u64) -> Result<(Vec<u8>, Arc<dyn SegmentFile>), SpoolError> {
    let path = segment_path(dir, id);
    let io = |source| SpoolError::Io {
        op: "read segment",
        path: path.clone(),
        source,
    };
    let file = StdFs.open(&path).map_err(io)?;
    let len = file.len().map_err(io)?;
    let bytes = read_all(file.as_ref(), len).map_err(io)?;
    Ok((bytes, file))
}

fn damaged_range(segment: u64, bytes: &[u8], offset: u64, len: u64) -> DamagedRange {
    DamagedRange {
        segment,
        offset,
        len_bytes: len,
        records_lost: records_in(&bytes[offset as usize..(offset + len) as usize]),
    }
}

/// Scans every segment in `dir` and reports what it holds.
pub fn inspect(dir: &Path) -> Result<InspectReport, SpoolError> {
    let (names, ids) = list_segments(dir)?;
    let mut missing_segments = super::segment_id_gaps(&ids);
    // The durable end a clean close or the last start recorded (spool-format.md §4, row 14):
    // what does not read before it is damage, as the next start will report it, not a torn
    // tail.
    let durable_at = super::durable_marker(&names);
    let mut segments = Vec::new();
    // What each segment's last rotation frame names, in the order of `segments`.
    let mut rotations: Vec<Option<u64>> = Vec::new();
    for id in ids {
        let (bytes, file) = read_segment(dir, id)?;
        let len = bytes.len() as u64;
        let header = SegmentHeader::decode(&bytes).map(|h| SegmentHeaderView {
            version: h.version,
            segment_id: h.segment_id,
            created_ms: h.created_ms,
            segment_bytes_max: h.segment_bytes_max,
            record_bytes_max: h.record_bytes_max,
        });
        let scanned = format::scan(&bytes, INSPECT_PAYLOAD_MAX);
        let _ = forget_zeros(file.as_ref(), scanned.data_end, len);
        let mut records = BTreeMap::new();
        let mut damaged = Vec::new();
        let mut rotated_to = None;
        for item in &scanned.items {
            match item {
                Scanned::Frame {
                    kind,
                    payload_start,
                    payload_len,
                    stuffed,
                    ..
                } => {
                    *records.entry(kind_name(*kind)).or_insert(0) += 1;
                    if *kind == super::RecordKind::ROTATION.0 {
                        let payload = format::unstuffed(
                            &bytes[*payload_start..*payload_start + *payload_len],
                            *stuffed,
                        );
                        rotated_to = format::Rotation::decode(&payload).map(|r| r.next_segment);
                    }
                }
                Scanned::Damaged { offset, len } => {
                    damaged.push(damaged_range(id, &bytes, *offset, *len))
                }
            }
        }
        let mut tail_garbage_bytes = scanned.tail_garbage_bytes;
        let before_durable_end = durable_at.is_some_and(|c| {
            c > super::Position {
                segment: id,
                offset: scanned.data_end,
            }
        });
        if tail_garbage_bytes > 0 && before_durable_end {
            damaged.push(damaged_range(
                id,
                &bytes,
                scanned.data_end,
                tail_garbage_bytes,
            ));
            tail_garbage_bytes = 0;
        }
        segments.push(SegmentReport {
            id,
            file_bytes: len,
            data_end: scanned.data_end,
            header,
            records,
            damaged,
            tail_garbage_bytes,
            pending_envelopes: None,
            orphan_envelopes: None,
        });
        rotations.push(rotated_to);
    }
    // The newest segment, as recovery sees it: a newest file with no header and nothing but
    // zeros is one recovery removes (row 7), so the segment before it is the newest, and if
    // that one's rotation frame names it, its contents were lost.
    let zeroed_last = segments.last().is_some_and(|s| {
        s.header.is_err()
            && s.records.is_empty()
            && s.damaged.is_empty()
            && s.tail_garbage_bytes == 0
    });
    let newest = segments
        .len()
        .checked_sub(1 + usize::from(zeroed_last && segments.len() > 1));
    // A daemon running beside this may have rotated into the named segment after the listing
    // above: only a segment that is not there now (or is that zeroed file) is missing.
    if let Some(gap) = newest
        .and_then(|i| super::missing_after_newest(segments[i].id, rotations[i]))
        .filter(|&[first, _]| {
            (zeroed_last && segments.last().is_some_and(|s| s.id == first))
                || !segment_path(dir, first).exists()
        })
        .filter(|&[first, _]| {
            !missing_segments
                .iter()
                .any(|&[a, b]| a <= first && first <= b)
        })
    {
        missing_segments.push(gap);
    }
    if let Some(c) = durable_at.filter(|c| c.offset > HEADER_LEN) {
        // As recovery sees them: the newest file, if recovery removes it (row 7), is not there.
        let present = &mut segments[..newest.map_or(0, |i| i + 1)];
        match present.iter().position(|s| s.id == c.segment) {
            Some(i) => {
                let s = &mut present[i];
                // (Not when its tail was garbage, taken as damage from the data end above.)
                let tail_taken = s.damaged.iter().any(|d| d.offset == s.data_end);
                if s.tail_garbage_bytes == 0 && s.data_end < c.offset && !tail_taken {
                    // The durable end's segment reads as zeros where its last records were.
                    s.damaged.push(DamagedRange {
                        segment: s.id,
                        offset: s.data_end,
                        len_bytes: c.offset - s.data_end,
                        records_lost: 1,
                    });
                }
            }
            None if present
                .iter()
                .filter(|s| s.id > c.segment)
                .all(|s| s.data_end <= HEADER_LEN)
                && !missing_segments
                    .iter()
                    .any(|&[a, b]| a <= c.segment && c.segment <= b) =>
            {
                // The durable end's segment is gone, and nothing was appended after it.
                let first = present
                    .iter()
                    .rfind(|s| s.id < c.segment)
                    .map_or(c.segment, |s| s.id + 1);
                missing_segments.push([first, c.segment]);
            }
            None => {}
        }
    }
    Ok(InspectReport {
        dir: dir.display().to_string(),
        segments,
        missing_segments,
    })
}

impl std::fmt::Display for InspectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "spool {}: {} segment(s)", self.dir, self.segments.len())?;
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        for s in &self.segments {
            let mut counts: Vec<String> =
                s.records.iter().map(|(k, n)| format!("{k}={n}")).collect();
            if let Some(n) = s.pending_envelopes {
                counts.push(format!("pending={n}"));
            }
            // Shown only when there are some, so the line of an undamaged segment reads as
            // before; an orphan is one of the pending envelopes, not one more.
            if let Some(n) = s.orphan_envelopes.filter(|&n| n > 0) {
                counts.push(format!("orphans={n}"));
            }
            let header = match &s.header {
                Ok(h) if h.segment_id == s.id => format!("header ok, version {}", h.version),
                Ok(h) => format!(
                    "header names segment {}, version {}",
                    h.segment_id, h.version
                ),
                Err(e) => format!("header damaged: {e}"),
            };
            writeln!(
                f,
                "  segment {:>6}  {:>10} bytes on disk  {:>10} used  {}  [{}]",
                s.id,
                s.file_bytes,
                s.data_end,
                header,
                counts.join(" ")
            )?;
            for (k, n) in &s.records {
                *totals.entry(k.as_str()).or_insert(0) += n;
            }
            for d in &s.damaged {
                writeln!(
                    f,
                    "    DAMAGED offset {} length {} bytes (~{} record(s) lost)",
                    d.offset, d.len_bytes, d.records_lost
                )?;
            }
            if s.tail_garbage_bytes > 0 {
                writeln!(
                    f,
                    "    TORN TAIL at offset {}: {} bytes after the last valid frame",
                    s.data_end, s.tail_garbage_bytes
                )?;
            }
        }
        for [first, last] in &self.missing_segments {
            writeln!(
                f,
                "  MISSING segments {first}..={last}: removed by something other than \
                 compaction, with the acknowledged envelopes they held"
            )?;
        }
        let t: Vec<String> = totals.iter().map(|(k, n)| format!("{k}={n}")).collect();
        writeln!(
            f,
            "  total records: {}",
            if t.is_empty() {
                "none".into()
            } else {
                t.join(" ")
            }
        )
    }
}
