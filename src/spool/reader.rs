//! Sequential reading from any position, across segments, while the writer appends.
//!
//! A reader never reads past the durable end published by the writer, so it never sees a
//! frame being written. Within a sealed segment it stops at the data end recovery or the writer
//! recorded, and it jumps over ranges recovery reported damaged. Memory is one window of
//! [`WINDOW_BYTES`] (or one frame, if a frame is larger; or two longest frames while it looks
//! for the next valid frame after damage that appeared since recovery, which it counts in
//! `spoolgate_spool_read_damaged_*` and logs).

use std::sync::Arc;

use super::format::{self, FrameAt, HEADER_LEN};
use super::fs::SegmentFile;
use super::{Position, Record, RecordKind, Shared, SpoolError};

/// Bytes read from a segment at a time.
pub const WINDOW_BYTES: usize = 256 * 1024;

pub struct Reader {
    shared: Arc<Shared>,
    pos: Position,
    file: Option<(u64, Arc<dyn SegmentFile>)>,
    window: Vec<u8>,
    /// Segment offset of `window[0]`.
    window_at: u64,
}

impl Reader {
    pub(crate) fn new(shared: Arc<Shared>, from: Position) -> Reader {
        Reader {
            shared,
            pos: from,
            file: None,
            window: Vec::new(),
            window_at: 0,
        }
    }

    /// Where the next `next_record` will read from.
    pub fn position(&self) -> Position {
        self.pos
    }

    /// Moves to the first segment after the current one, if any.
    fn next_segment(&mut self, end: Position) -> bool {
        let next = self
            .shared
            .segments_read()
            .range(self.pos.segment + 1..)
            .next()
            .map(|(&id, _)| id);
        match next {
            Some(id) if id <= end.segment => {
                self.pos = Position {
                    segment: id,
                    offset: HEADER_LEN,
                };
                self.file = None;
                self.window.clear();
                true
            }
            _ => false,
        }
    }

    /// Makes `window` cover `[offset, offset + want)` (clamped to `limit`).
    fn fill(&mut self, offset: u64, want: usize, limit: u64) -> Result<(), SpoolError> {
        let have_end = self.window_at + self.window.len() as u64;
        if offset >= self.window_at && offset + want as u64 <= have_end {
            return Ok(());
        }
        let Some((_, file)) = &self.file else {
            return Err(SpoolError::Invalid("reader has no open segment".into()));
        };
        let len = (want.max(WINDOW_BYTES) as u64).min(limit.saturating_sub(offset)) as usize;
        self.window.resize(len, 0);
        let mut at = 0;
        while at < len {
            let n = file
                .read_at(&mut self.window[at..], offset + at as u64)
                .map_err(|source| SpoolError::Io {
                    op: "read segment",
                    path: self.shared.segment_path(self.pos.segment),
                    source,
                })?;
            if n == 0 {
                break;
            }
            at += n;
        }
        self.window.truncate(at);
        self.window_at = offset;
        Ok(())
    }

    /// The offset of the first valid frame after the damaged frame at `at`, before `seg_end`.
    /// Reads the segment a window at a time (at least two longest frames, so that a candidate
    /// accepted in the first half lies wholly inside it), not the rest of the segment at once.
    fn resync_after(
        &mut self,
        at: u64,
        seg_end: u64,
        payload_max: u32,
    ) -> Result<Option<u64>, SpoolError> {
        let frame_max = format::frame_len(payload_max as usize);
        let span = (WINDOW_BYTES as u64).max(2 * frame_max);
        let mut from = at + format::FRAME_ALIGN;
        while from < seg_end {
            // Frames start at multiples of 8, and `resync` counts them from the window's start.
            from = from.div_ceil(format::FRAME_ALIGN) * format::FRAME_ALIGN;
            self.fill(from, span as usize, seg_end)?;
            let window_end = self.window_at + self.window.len() as u64;
            // The window reaches the segment's end (or the file ended early): a frame that
            // runs past it runs past the data, and is not valid.
            let whole = window_end >= seg_end || window_end - from < span;
            let rel = (from - self.window_at) as usize;
            match format::resync(&self.window, rel, payload_max) {
                Some(found) => {
                    let found = self.window_at + found as u64;
                    if whole || found + frame_max <= window_end {
                        return Ok(Some(found));
                    }
                    // Valid in this window, but a frame starting before it in the window's
                    // last longest frame was judged on cut-off bytes (a record that crosses
                    // the window's end can hold a whole valid frame in its payload): read
                    // again from where that last longest frame begins.
                    // Not `whole`, so the window is `span` >= two longest frames: progress.
                    debug_assert!(window_end - frame_max > from);
                    from = window_end - frame_max;
                }
                None if whole => return Ok(None),
                // Candidates in the last longest frame were judged on a cut-off window.
                None => from = window_end - frame_max,
            }
        }
        Ok(None)
    }

    /// The next committed record, or `None` at the durable end (call again later).
    pub fn next_record(&mut self) -> Result<Option<Record>, SpoolError> {
        let payload_max = self.shared.payload_max;
        loop {
            let end = *self.shared.durable.borrow();
            if self.pos >= end {
                return Ok(None);
            }
            let (seg_end, damaged, file) = {
                let segs = self.shared.segments_read();
                match segs.get(&self.pos.segment) {
                    None => {
                        drop(segs);
                        // Deleted by compaction, or a position before the first segment.
                        if !self.next_segment(end) {
                            return Ok(None);
                        }
                        continue;
                    }
                    Some(m) => {
                        let seg_end = if self.pos.segment == end.segment {
                            end.offset
                        } else {
                            m.data_end
                        };
                        (seg_end, m.damaged.clone(), m.file.clone())
                    }
                }
            };
            if self.pos.offset < HEADER_LEN {
                self.pos.offset = HEADER_LEN;
            }
            if let Some(&(_, skip_to)) = damaged
                .iter()
                .find(|(s, e)| self.pos.offset >= *s && self.pos.offset < *e)
            {
                self.pos.offset = skip_to;
                continue;
            }
            if self.pos.offset >= seg_end {
                if !self.next_segment(end) {
                    return Ok(None);
                }
                continue;
            }
            if self.file.as_ref().map(|(id, _)| *id) != Some(self.pos.segment) {
                self.file = Some((self.pos.segment, file));
                self.window.clear();
            }
            let at = self.pos.offset;
            self.fill(at, format::FRAME_HEADER_LEN as usize, seg_end)?;
            let rel = (at - self.window_at) as usize;
            let needed = match format::frame_at(&self.window, rel, payload_max) {
                FrameAt::Truncated
                    if self.window.len() - rel >= format::FRAME_HEADER_LEN as usize =>
                {
                    let len = u32::from_le_bytes(
                        self.window[rel + 4..rel + 8].try_into().expect("4 bytes"),
                    );
                    Some(format::frame_len(len as usize) as usize)
                }
                _ => None,
            };
            if let Some(n) = needed {
                self.fill(at, n, seg_end)?;
            }
            let rel = (at - self.window_at) as usize;
            match format::frame_at(&self.window, rel, payload_max) {
                FrameAt::Valid {
                    kind,
                    payload_start,
                    payload_len,
                    stuffed,
                    total,
                } => {
                    if kind == RecordKind::ROTATION.0 {
                        // Structure, not a record: it only marks where the segment ended.
                        self.pos.offset += total;
                        continue;
                    }
                    let payload = bytes::Bytes::copy_from_slice(&format::unstuffed(
                        &self.window[payload_start..payload_start + payload_len],
                        stuffed,
                    ));
                    let position = self.pos;
                    self.pos.offset += total;
                    return Ok(Some(Record {
                        position,
                        kind: RecordKind(kind),
                        payload,
                        next: self.pos,
                    }));
                }
                _ => {
                    // Damage that appeared after recovery (recovery's damaged ranges are
                    // jumped over above): resynchronise on the next valid frame of this
                    // segment, and say what was skipped, as recovery would.
                    let next = self.resync_after(at, seg_end, payload_max)?;
                    let skipped = next.unwrap_or(seg_end) - at;
                    self.shared.metrics.spool_read_damaged_ranges_total.inc();
                    self.shared
                        .metrics
                        .spool_read_damaged_bytes_total
                        .inc_by(skipped);
                    tracing::warn!(
                        segment = self.pos.segment,
                        offset = at,
                        bytes = skipped,
                        resumed = next.is_some(),
                        "reader skipped bytes that are not a valid frame (damage since recovery); records in them are not forwarded"
                    );
                    self.pos.offset = next.unwrap_or(seg_end);
                }
            }
        }
    }
}
