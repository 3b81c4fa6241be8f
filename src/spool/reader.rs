//! Sequential reading from any position, across segments, while the writer appends.
//!
//! A reader never reads past the durable end published by the writer, so it never sees a
//! frame being written. Within a sealed segment it stops at the data end recovery or the writer
//! recorded, and it jumps over ranges recovery reported damaged. Memory is one window of
//! [`WINDOW_BYTES`] (or one frame, if a frame is larger).

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
                    total,
                } => {
                    if kind == RecordKind::ROTATION.0 {
                        // Structure, not a record: it only marks where the segment ended.
                        self.pos.offset += total;
                        continue;
                    }
                    let payload = bytes::Bytes::copy_from_slice(
                        &self.window[payload_start..payload_start + payload_len],
                    );
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
                    // Damage that appeared after recovery (or a reader started mid-frame):
                    // resynchronise on the next valid frame of this segment.
                    self.fill(at, (seg_end - at) as usize, seg_end)?;
                    let rel = (at - self.window_at) as usize;
                    match format::resync(&self.window, rel + 1, payload_max) {
                        Some(next) => {
                            let skipped = next - rel;
                            tracing::warn!(
                                segment = self.pos.segment,
                                offset = at,
                                bytes = skipped,
                                "reader skipped bytes that are not a valid frame"
                            );
                            self.pos.offset = self.window_at + next as u64;
                        }
                        None => {
                            self.pos.offset = seg_end;
                        }
                    }
                }
            }
        }
    }
}
