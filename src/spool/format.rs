//! The byte layout of segment files: the segment header, record frames, and the pure functions
//! that encode them and find them again in damaged bytes. spool-format.md is the contract this
//! file implements; the golden-bytes test pins the two together.
//!
//! Everything is little-endian. CRCs are CRC-32/ISO-HDLC (the zlib/PNG CRC: polynomial
//! 0x04C11DB7 reflected, init 0xFFFFFFFF, final xor 0xFFFFFFFF), as computed by `crc32fast`.

/// Segment header magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SPOOLSEG";
/// The format version this build writes. Version 2 (2026-12-04) added stuffed frames (flag bit
/// 0, see [`encode_frame`]); a version 1 segment holds none, and this build reads both.
pub const FORMAT_VERSION: u16 = 2;
/// The oldest format version this build reads.
pub const FORMAT_VERSION_OLDEST: u16 = 1;

/// Whether this build reads segments of format `version`.
pub fn version_known(version: u16) -> bool {
    (FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&version)
}
/// Bytes of the segment header; the first frame starts here.
pub const HEADER_LEN: u64 = 64;
/// Every frame starts with these bytes. 0xF7 never occurs in UTF-8 text, and in a stored
/// payload it is always followed by 0x00 (see [`encode_frame`]), so no payload can fake a
/// frame start, and resynchronisation has few candidates to try.
pub const FRAME_MARKER: [u8; 4] = [0xF7, b'S', b'G', b'F'];
/// The byte every stored payload escapes (the marker's first byte).
pub const STUFFED_BYTE: u8 = 0xF7;
/// Frame flag bit 0: the payload is stored stuffed, each 0xF7 followed by an inserted 0x00.
pub const FLAG_STUFFED: u8 = 1;
/// Bytes of a frame header: marker, length, kind, flags, reserved, CRC.
pub const FRAME_HEADER_LEN: u64 = 16;
/// Frames start at multiples of this, so resynchronisation only looks at aligned offsets.
pub const FRAME_ALIGN: u64 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// [`FORMAT_VERSION`] in a header this build writes; 1 or 2 in one it reads.
    pub version: u16,
    pub segment_id: u64,
    pub created_ms: u64,
    pub segment_bytes_max: u64,
    /// The writer's `record_bytes_max` when it created the segment: the longest frame payload
    /// the segment may hold. 0 in segments written before it was recorded (2026-12-03).
    pub record_bytes_max: u32,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..10].copy_from_slice(&self.version.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        // 12..16 flags, zero.
        h[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        h[24..32].copy_from_slice(&self.created_ms.to_le_bytes());
        h[32..40].copy_from_slice(&self.segment_bytes_max.to_le_bytes());
        h[40..44].copy_from_slice(&self.record_bytes_max.to_le_bytes());
        // 44..60 reserved, zero.
        let crc = crc32fast::hash(&h[0..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The version of an intact header of a format version this build does not know (a newer
    /// one, or 0), if this is one. Recovery refuses such a spool instead of treating the
    /// header as damage and misreading frames.
    pub fn unknown_version(bytes: &[u8]) -> Option<u16> {
        if bytes.len() < HEADER_LEN as usize || bytes[0..8] != SEGMENT_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(bytes[60..64].try_into().expect("4 bytes"));
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        (crc32fast::hash(&bytes[0..60]) == crc && !version_known(version)).then_some(version)
    }

    /// Decodes and checks a header; the error says what is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, String> {
        if bytes.len() < HEADER_LEN as usize {
            return Err(format!(
                "header is {} bytes, needs {HEADER_LEN}",
                bytes.len()
            ));
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic".into());
        }
        let crc = u32::from_le_bytes(bytes[60..64].try_into().expect("4 bytes"));
        if crc32fast::hash(&bytes[0..60]) != crc {
            return Err("segment header CRC mismatch".into());
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if !version_known(version) {
            return Err(format!("unsupported format version {version}"));
        }
        let header_len = u16::from_le_bytes([bytes[10], bytes[11]]);
        if u64::from(header_len) != HEADER_LEN {
            return Err(format!("unexpected header length {header_len}"));
        }
        Ok(SegmentHeader {
            version,
            segment_id: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
            created_ms: u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes")),
            segment_bytes_max: u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes")),
            record_bytes_max: u32::from_le_bytes(bytes[40..44].try_into().expect("4 bytes")),
        })
    }
}

/// Total bytes a frame with `payload_len` bytes of payload occupies, padding included.
pub fn frame_len(payload_len: usize) -> u64 {
    let raw = FRAME_HEADER_LEN + payload_len as u64;
    raw.div_ceil(FRAME_ALIGN) * FRAME_ALIGN
}

/// Bytes `payload` takes stored in a frame: one more for each 0xF7 in it (see
/// [`encode_frame`]). The spool's `record_bytes_max` bounds this length, not the payload's.
pub fn stored_len(payload: &[u8]) -> usize {
    payload.len() + stuffing(payload)
}

/// The bytes stuffing adds to `payload`: one for each 0xF7 in it.
pub fn stuffing(payload: &[u8]) -> usize {
    // Most payloads (any text) hold no 0xF7: a vectorised search settles those, where
    // counting went byte by byte and was about 5% of the CPU of 1 KiB batch ingest.
    match memchr::memchr(STUFFED_BYTE, payload) {
        None => 0,
        Some(first) => 1 + memchr::memchr_iter(STUFFED_BYTE, &payload[first + 1..]).count(),
    }
}

/// Total bytes the frame of `payload` occupies: [`frame_len`] of its [`stored_len`].
pub fn frame_len_of(payload: &[u8]) -> u64 {
    frame_len(stored_len(payload))
}

/// Appends one frame (header, payload, zero padding) to `out`.
///
/// A payload that holds the byte 0xF7 is stored **stuffed** (flag bit 0): each 0xF7 followed by
/// an inserted 0x00, the length field and the CRC covering the stored bytes. So the marker
/// `F7 53 47 46` can occur in a segment only where a frame starts, never inside a payload,
/// and resynchronising after damage cannot take bytes a client chose (numbers or binary values
/// in its `meta`) for a frame. A payload without 0xF7 (any UTF-8 text) is stored as it is.
pub fn encode_frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    encode_frame_stored(kind, payload, stored_len(payload), out)
}

/// [`encode_frame`] for a caller that has its [`stored_len`] already (the writer gets it from
/// the appender's size check), so the payload is not scanned for 0xF7 again.
pub fn encode_frame_stored(kind: u8, payload: &[u8], stored: usize, out: &mut Vec<u8>) {
    debug_assert_eq!(stored, stored_len(payload));
    encode_frame_as(kind, payload, stored, out)
}

/// Writes the frame; `stored` is the payload's length stored, stuffed when it differs from the
/// payload's length.
fn encode_frame_as(kind: u8, payload: &[u8], stored: usize, out: &mut Vec<u8>) {
    assert!(kind != 0, "kind 0 is reserved for the zeroed tail");
    let stuffed = stored != payload.len();
    let len = u32::try_from(stored).expect("payload length fits u32");
    let start = out.len();
    out.reserve(frame_len(stored) as usize);
    out.extend_from_slice(&FRAME_MARKER);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.push(if stuffed { FLAG_STUFFED } else { 0 });
    out.extend_from_slice(&[0, 0]); // reserved
    out.extend_from_slice(&[0; 4]); // the CRC, once the payload is in place
    let payload_at = out.len();
    if stuffed {
        let mut from = 0;
        for at in memchr::memchr_iter(STUFFED_BYTE, payload) {
            out.extend_from_slice(&payload[from..=at]);
            out.push(0);
            from = at + 1;
        }
        out.extend_from_slice(&payload[from..]);
    } else {
        out.extend_from_slice(payload);
    }
    debug_assert_eq!(out.len() - payload_at, stored);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start + 4..start + 12]);
    crc.update(&out[payload_at..]);
    let crc = crc.finalize().to_le_bytes();
    out[start + 12..start + 16].copy_from_slice(&crc);
    let padded = start + frame_len(stored) as usize;
    out.resize(padded, 0);
}

/// Whether `stored` is a well-formed stuffed payload: every 0xF7 followed by 0x00.
fn stuffing_holds(stored: &[u8]) -> bool {
    memchr::memchr_iter(STUFFED_BYTE, stored).all(|at| stored.get(at + 1) == Some(&0))
}

/// The payload a frame holds, from its stored bytes: as stored, or with the 0x00 after each
/// 0xF7 removed when the frame is stuffed.
pub fn unstuffed(stored: &[u8], stuffed: bool) -> std::borrow::Cow<'_, [u8]> {
    if !stuffed {
        return std::borrow::Cow::Borrowed(stored);
    }
    let mut out = Vec::with_capacity(stored.len());
    let mut from = 0;
    for at in memchr::memchr_iter(STUFFED_BYTE, stored) {
        // `frame_at` checked that a 0x00 follows; `at + 2` skips it.
        out.extend_from_slice(&stored[from..=at]);
        from = at + 2;
    }
    out.extend_from_slice(&stored[from.min(stored.len())..]);
    std::borrow::Cow::Owned(out)
}

/// The payload of a rotation frame (kind 4, spool-format.md §3): written at the end of a
/// segment when appends move on to the next one, it says that the spool went on in segment
/// `next_segment`. It is how recovery tells that the newest segment was removed: nothing else
/// in the spool names the newest id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rotation {
    pub next_segment: u64,
}

/// Frame bytes a rotation frame takes for any segment id: the header, a payload of at most 23
/// bytes (a one-entry map, the 12-byte key and a uint64) and the padding. The writer keeps
/// this much of every segment free for it. A rotation frame is never stuffed: its payload is
/// spoolgate's own, and it may end a version 1 segment, which holds no stuffed frame.
pub const ROTATION_FRAME_BYTES_MAX: u64 = 40;

/// The kind byte of a rotation frame (`spool::RecordKind::ROTATION`).
pub const ROTATION_KIND: u8 = 4;

impl Rotation {
    /// The payload: a msgpack map with the one key `next_segment`, its value in the smallest
    /// uint encoding.
    pub fn encode(&self) -> Vec<u8> {
        let payload = rmp_serde::to_vec_named(self).expect("a struct of one u64 encodes");
        debug_assert!(frame_len(payload.len()) <= ROTATION_FRAME_BYTES_MAX);
        payload
    }

    /// The whole frame (kind 4) that ends a segment whose successor is `next_segment`.
    pub fn frame(&self) -> Vec<u8> {
        let mut frame = Vec::with_capacity(ROTATION_FRAME_BYTES_MAX as usize);
        let payload = self.encode();
        encode_frame_as(ROTATION_KIND, &payload, payload.len(), &mut frame);
        frame
    }

    /// `None` unless the payload is exactly such a map: one key, `next_segment`, a uint, and
    /// nothing after it.
    pub fn decode(payload: &[u8]) -> Option<Rotation> {
        let mut c = crate::msgpack::Cursor::new(payload);
        if c.map_len()? != 1 || c.str()? != "next_segment" {
            return None;
        }
        let next_segment = c.uint()?;
        (c.remaining() == 0).then_some(Rotation { next_segment })
    }
}

/// What is at a given offset of a segment's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameAt {
    /// A valid frame: kind, stored payload range within the slice (see [`unstuffed`]), and
    /// total length with padding.
    Valid {
        kind: u8,
        payload_start: usize,
        payload_len: usize,
        stuffed: bool,
        total: u64,
    },
    /// Sixteen zero bytes (or fewer, up to the end): where a pre-zeroed segment's data ends.
    Zero,
    /// The slice ends before a frame header or its payload.
    Truncated,
    /// Bytes that are neither a valid frame nor zeros.
    Invalid,
}

/// Parses the frame at `pos` of `bytes`. `payload_max` bounds the length field, so a damaged
/// length cannot make anyone allocate or read far.
pub fn frame_at(bytes: &[u8], pos: usize, payload_max: u32) -> FrameAt {
    let Some(rest) = bytes.get(pos..) else {
        return FrameAt::Truncated;
    };
    if rest.len() < FRAME_HEADER_LEN as usize {
        if rest.iter().all(|&b| b == 0) {
            return FrameAt::Zero;
        }
        return FrameAt::Truncated;
    }
    let head = &rest[..FRAME_HEADER_LEN as usize];
    if head.iter().all(|&b| b == 0) {
        return FrameAt::Zero;
    }
    if head[0..4] != FRAME_MARKER {
        return FrameAt::Invalid;
    }
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let kind = head[8];
    let stuffed = head[9] == FLAG_STUFFED;
    if kind == 0 || len > payload_max || (head[9] != 0 && !stuffed) || head[10..12] != [0, 0] {
        return FrameAt::Invalid;
    }
    let payload_start = pos + FRAME_HEADER_LEN as usize;
    let payload_end = payload_start + len as usize;
    if payload_end > bytes.len() {
        return FrameAt::Truncated;
    }
    let crc = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
    let mut h = crc32fast::Hasher::new();
    h.update(&head[4..12]);
    h.update(&bytes[payload_start..payload_end]);
    if h.finalize() != crc {
        return FrameAt::Invalid;
    }
    if stuffed && !stuffing_holds(&bytes[payload_start..payload_end]) {
        return FrameAt::Invalid;
    }
    FrameAt::Valid {
        kind,
        payload_start,
        payload_len: len as usize,
        stuffed,
        total: frame_len(len as usize),
    }
}

/// The first aligned offset at or after `from` where a valid frame starts, if any.
pub fn resync(bytes: &[u8], from: usize, payload_max: u32) -> Option<usize> {
    let align = FRAME_ALIGN as usize;
    let mut pos = from.div_ceil(align) * align;
    while pos + FRAME_HEADER_LEN as usize <= bytes.len() {
        if bytes[pos..pos + 4] == FRAME_MARKER {
            if let FrameAt::Valid { .. } = frame_at(bytes, pos, payload_max) {
                return Some(pos);
            }
        }
        pos += align;
    }
    None
}

/// One item found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scanned {
    /// A valid frame; its stored payload is `payload_start..+payload_len` (see [`unstuffed`]).
    Frame {
        offset: u64,
        kind: u8,
        payload_start: usize,
        payload_len: usize,
        stuffed: bool,
    },
    /// Bytes that held no valid frame, followed by a valid frame.
    Damaged { offset: u64, len: u64 },
}

/// The result of scanning one segment's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    pub items: Vec<Scanned>,
    /// Where valid data ends: the offset the writer would append at.
    pub data_end: u64,
    /// Non-zero bytes after `data_end` with no valid frame among them (a torn or damaged tail).
    pub tail_garbage_bytes: u64,
}

/// Scans a whole segment (header included) and finds every valid frame, every damaged range
/// between valid frames, and where the data ends. Always terminates: every step advances.
pub fn scan(bytes: &[u8], payload_max: u32) -> ScanResult {
    let mut items = Vec::new();
    let mut pos = HEADER_LEN as usize;
    loop {
        match frame_at(bytes, pos, payload_max) {
            FrameAt::Valid {
                kind,
                payload_start,
                payload_len,
                stuffed,
                total,
            } => {
                items.push(Scanned::Frame {
                    offset: pos as u64,
                    kind,
                    payload_start,
                    payload_len,
                    stuffed,
                });
                pos += total as usize;
            }
            FrameAt::Zero | FrameAt::Truncated | FrameAt::Invalid => {
                // Either the end of the data, or damage with valid frames after it.
                match resync(bytes, pos + 1, payload_max) {
                    Some(next) => {
                        items.push(Scanned::Damaged {
                            offset: pos as u64,
                            len: (next - pos) as u64,
                        });
                        pos = next;
                    }
                    None => {
                        // The data ends at the current offset, which is after the last frame's
                        // padding even when the file was cut inside it: appends must start at
                        // an aligned offset, or no scan would find them (the bytes past the
                        // file's end read as zeros).
                        let garbage = bytes[pos.min(bytes.len())..]
                            .iter()
                            .rposition(|&b| b != 0)
                            .map_or(0, |last| last + 1)
                            as u64;
                        return ScanResult {
                            items,
                            data_end: pos as u64,
                            tail_garbage_bytes: garbage,
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(frames: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = SegmentHeader {
            version: FORMAT_VERSION,
            segment_id: 1,
            created_ms: 0,
            segment_bytes_max: 4096,
            record_bytes_max: 1024,
        }
        .encode()
        .to_vec();
        for (k, p) in frames {
            encode_frame(*k, p, &mut b);
        }
        b
    }

    #[test]
    fn a_rotation_frame_fits_its_reserve_for_every_segment_id() {
        for next_segment in [
            1,
            2,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            let payload = Rotation { next_segment }.encode();
            assert!(
                frame_len(payload.len()) <= ROTATION_FRAME_BYTES_MAX,
                "{next_segment}"
            );
            assert_eq!(Rotation::decode(&payload), Some(Rotation { next_segment }));
        }
        assert_eq!(
            frame_len(
                Rotation {
                    next_segment: u64::MAX
                }
                .encode()
                .len()
            ),
            ROTATION_FRAME_BYTES_MAX
        );
        assert_eq!(Rotation::decode(b"\x81\xa4next\x02"), None);
        // The array form rmp-serde would also take, an extra key, trailing bytes, a non-uint.
        assert_eq!(Rotation::decode(b"\x91\x02"), None);
        let mut two_keys = b"\x82\xacnext_segment\x02".to_vec();
        two_keys.extend_from_slice(b"\xa1x\x01");
        assert_eq!(Rotation::decode(&two_keys), None);
        assert_eq!(Rotation::decode(b"\x81\xacnext_segment\x02\x00"), None);
        assert_eq!(Rotation::decode(b"\x81\xacnext_segment\xa1x"), None);
    }

    #[test]
    fn frames_are_aligned_and_round_trip() {
        let mut out = Vec::new();
        encode_frame(1, b"abc", &mut out);
        assert_eq!(out.len(), 24);
        match frame_at(&out, 0, 1024) {
            FrameAt::Valid {
                kind,
                payload_start,
                payload_len,
                stuffed,
                total,
            } => {
                assert!(!stuffed);
                assert_eq!((kind, payload_len, total), (1, 3, 24));
                assert_eq!(&out[payload_start..payload_start + payload_len], b"abc");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_header_round_trips_and_a_flipped_bit_is_caught() {
        let h = SegmentHeader {
            version: FORMAT_VERSION,
            segment_id: 9,
            created_ms: 5,
            segment_bytes_max: 77,
            record_bytes_max: 33,
        };
        let mut bytes = h.encode();
        assert_eq!(SegmentHeader::decode(&bytes).unwrap(), h);
        bytes[17] ^= 1;
        assert!(SegmentHeader::decode(&bytes).is_err());
    }

    #[test]
    fn a_flipped_length_bit_is_caught_by_the_crc() {
        let mut out = Vec::new();
        encode_frame(1, &[7u8; 40], &mut out);
        out[4] ^= 0x08;
        assert_ne!(
            std::mem::discriminant(&frame_at(&out, 0, 1024)),
            std::mem::discriminant(&FrameAt::Valid {
                kind: 0,
                payload_start: 0,
                payload_len: 0,
                stuffed: false,
                total: 0
            })
        );
    }

    #[test]
    fn scanning_a_zero_padded_segment_ends_at_the_zeros() {
        let mut b = segment(&[(1, b"one"), (2, b"two")]);
        let end = b.len() as u64;
        b.resize(4096, 0);
        let r = scan(&b, 1024);
        assert_eq!(r.items.len(), 2);
        assert_eq!(r.data_end, end);
        assert_eq!(r.tail_garbage_bytes, 0);
    }

    #[test]
    fn a_damaged_frame_between_good_ones_is_skipped_and_reported() {
        let mut b = segment(&[(1, b"one"), (1, b"two"), (1, b"three")]);
        b[64 + 24 + 17] ^= 0xff; // inside the second frame's payload
        let r = scan(&b, 1024);
        let frames = r
            .items
            .iter()
            .filter(|i| matches!(i, Scanned::Frame { .. }))
            .count();
        assert_eq!(frames, 2);
        assert!(r.items.contains(&Scanned::Damaged {
            offset: 88,
            len: 24
        }));
    }

    #[test]
    fn a_torn_tail_is_garbage_after_the_data_end() {
        let mut b = segment(&[(1, b"one"), (1, b"two")]);
        let full = b.len();
        b.truncate(full - 12);
        b.resize(4096, 0);
        let r = scan(&b, 1024);
        assert_eq!(r.items.len(), 1);
        assert_eq!(r.data_end, 88);
        assert!(r.tail_garbage_bytes > 0);
    }

    /// The stored payload of the one frame in `frame`, and whether it is stuffed.
    fn stored(frame: &[u8]) -> (Vec<u8>, bool) {
        match frame_at(frame, 0, 1024) {
            FrameAt::Valid {
                payload_start,
                payload_len,
                stuffed,
                ..
            } => (
                frame[payload_start..payload_start + payload_len].to_vec(),
                stuffed,
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_payload_holding_0xf7_is_stored_stuffed_and_reads_back_as_written() {
        let payload = [0xF7, b'S', b'G', b'F', 1, 0xF7, 0xF7, 0, 9, 0xF7];
        let mut out = Vec::new();
        encode_frame(1, &payload, &mut out);
        let (stored, stuffed) = stored(&out);
        assert!(stuffed);
        assert_eq!(out[9], FLAG_STUFFED);
        assert_eq!(
            stored,
            [0xF7, 0, b'S', b'G', b'F', 1, 0xF7, 0, 0xF7, 0, 0, 9, 0xF7, 0]
        );
        assert_eq!(stored.len(), stored_len(&payload));
        assert_eq!(out.len() as u64, frame_len_of(&payload));
        assert_eq!(&*unstuffed(&stored, true), &payload[..]);
    }

    #[test]
    fn the_stored_length_counts_one_more_byte_for_each_0xf7_wherever_it_is() {
        let cases: [&[u8]; 7] = [
            b"",
            b"plain text",
            &[0xF7],
            &[0xF7, 0xF7],
            &[b'a', 0xF7],
            &[0xF7, b'a', b'b', 0xF7, b'c'],
            &[0xF6, 0xF8, 0x7F],
        ];
        for payload in cases {
            let count = payload.iter().filter(|&&b| b == 0xF7).count();
            assert_eq!(stored_len(payload), payload.len() + count, "{payload:?}");
        }
        // Past the width of one vector, with 0xF7 only at the end.
        let mut long = vec![b'x'; 100];
        assert_eq!(stored_len(&long), 100);
        long.push(0xF7);
        assert_eq!(stored_len(&long), 102);
    }

    #[test]
    fn no_stored_payload_holds_the_marker_at_any_offset() {
        // A client's `meta` can encode to any bytes, a whole valid frame among them.
        let mut planted = Vec::new();
        encode_frame(3, b"forged tombstone", &mut planted);
        let mut payload = b"12345678".to_vec();
        payload.extend_from_slice(&planted);
        let mut out = Vec::new();
        encode_frame(1, &payload, &mut out);
        let marker_at: Vec<usize> = out
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == FRAME_MARKER)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(marker_at, vec![0]);
        assert_eq!(resync(&out, 1, 1024), None);
        assert_eq!(&*unstuffed(&stored(&out).0, true), &payload[..]);
    }

    #[test]
    fn a_stuffed_frame_whose_stuffing_is_broken_is_invalid_even_with_a_matching_crc() {
        // 0xF7 not followed by 0x00, under a CRC computed over those bytes.
        let stored = [b'a', 0xF7, b'b'];
        let mut out = Vec::new();
        out.extend_from_slice(&FRAME_MARKER);
        out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        out.extend_from_slice(&[1, FLAG_STUFFED, 0, 0]);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[4..12]);
        crc.update(&stored);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&stored);
        out.resize(frame_len(stored.len()) as usize, 0);
        assert_eq!(frame_at(&out, 0, 1024), FrameAt::Invalid);
        // The same bytes with the stuffing intact are valid.
        let mut good = Vec::new();
        encode_frame(1, &[b'a', 0xF7, b'b'], &mut good);
        assert!(matches!(frame_at(&good, 0, 1024), FrameAt::Valid { .. }));
    }

    #[test]
    fn a_payload_without_0xf7_is_stored_as_it_is_and_rotation_frames_never_stuff() {
        let mut out = Vec::new();
        encode_frame(1, b"plain text \xe2\x82\xac", &mut out);
        assert_eq!(stored(&out), (b"plain text \xe2\x82\xac".to_vec(), false));
        // Segment 247 encodes as `cc f7`: still stored as it is, for version 1 segments.
        let frame = Rotation { next_segment: 247 }.frame();
        assert_eq!(frame[9], 0);
        let (payload, stuffed) = stored(&frame);
        assert!(!stuffed);
        assert_eq!(Rotation::decode(&payload).unwrap().next_segment, 247);
    }

    #[test]
    fn version_1_and_2_headers_are_read_and_others_refused() {
        for version in [1u16, 2] {
            let h = SegmentHeader {
                version,
                segment_id: 3,
                created_ms: 0,
                segment_bytes_max: 4096,
                record_bytes_max: 1024,
            };
            assert_eq!(SegmentHeader::decode(&h.encode()).unwrap(), h);
            assert_eq!(SegmentHeader::unknown_version(&h.encode()), None);
        }
        for version in [0u16, 3] {
            let h = SegmentHeader {
                version,
                segment_id: 3,
                created_ms: 0,
                segment_bytes_max: 4096,
                record_bytes_max: 1024,
            };
            assert!(SegmentHeader::decode(&h.encode()).is_err());
            assert_eq!(SegmentHeader::unknown_version(&h.encode()), Some(version));
        }
    }

    #[test]
    fn a_stuffed_payload_ending_in_a_lone_0xf7_is_invalid_and_a_flag_without_0xf7_is_valid() {
        let frame = |stored: &[u8]| {
            let mut out = Vec::new();
            out.extend_from_slice(&FRAME_MARKER);
            out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
            out.extend_from_slice(&[1, FLAG_STUFFED, 0, 0]);
            let mut crc = crc32fast::Hasher::new();
            crc.update(&out[4..12]);
            crc.update(stored);
            out.extend_from_slice(&crc.finalize().to_le_bytes());
            out.extend_from_slice(stored);
            // The padding's zero must not count as the stuffed 0x00.
            out.resize(frame_len(stored.len()) as usize, 0);
            out
        };
        assert_eq!(frame_at(&frame(b"ab\xf7"), 0, 1024), FrameAt::Invalid);
        assert!(matches!(
            frame_at(&frame(b"ab\xf7\x00"), 0, 1024),
            FrameAt::Valid {
                payload_len: 4,
                stuffed: true,
                ..
            }
        ));
        assert_eq!(&*unstuffed(b"ab\xf7\x00", true), b"ab\xf7");
        assert!(matches!(
            frame_at(&frame(b"plain"), 0, 1024),
            FrameAt::Valid {
                payload_len: 5,
                stuffed: true,
                ..
            }
        ));
        assert_eq!(&*unstuffed(b"plain", true), b"plain");
    }
}
