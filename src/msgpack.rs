//! A bounded msgpack reader for the two direct decoders: envelopes read back from the spool
//! (`envelope::decode`) and msgpack request bodies at ingest (`ingest::msgpack_items`).
//!
//! Both decode only the shapes spoolgate writes or expects and hand everything else to
//! rmp-serde, so this reader knows only those shapes: uints, strs, nil, and map and array
//! headers. Every read returns `None` past the end of the input or on another type, and a
//! length read from the input is checked against the bytes left, so a corrupt or hostile header
//! cannot make a caller reserve more than the input could hold. Strings are validated as UTF-8
//! with SIMD (simdutf8); std's `from_utf8` was about 4% of the CPU of 1 KiB batch ingest.

pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { bytes, at: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        )
    }

    /// Consumes a nil if one is next.
    pub(crate) fn nil(&mut self) -> bool {
        let is_nil = self.bytes.get(self.at) == Some(&0xc0);
        if is_nil {
            self.at += 1;
        }
        is_nil
    }

    /// A msgpack uint in any of its encodings (positive fixint, uint 8/16/32/64).
    pub(crate) fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Some(u64::from(b)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    /// A msgpack str (fixstr, str 8/16/32) holding valid UTF-8.
    pub(crate) fn str(&mut self) -> Option<&'a str> {
        simdutf8::basic::from_utf8(self.str_bytes()?).ok()
    }

    /// The bytes of a msgpack str, not validated: for map keys that are only compared with
    /// known names (bytes that are not UTF-8 equal none of them).
    pub(crate) fn str_bytes(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return None,
        };
        self.take(len)
    }

    /// The next value decoded by rmp-serde, for open shapes (`meta`, `embed_preview`) that
    /// this reader does not know. `depth` is what rmp-serde's nesting counter would be at this
    /// value when decoding the whole input (1024 less one per enclosing map or array), so the
    /// result, depth limit included, is what decoding the whole input with rmp-serde gives.
    pub(crate) fn serde_value<T: serde::de::DeserializeOwned>(
        &mut self,
        depth: usize,
    ) -> Option<T> {
        let mut rest = &self.bytes[self.at..];
        let mut de = rmp_serde::Deserializer::new(&mut rest);
        de.set_max_depth(depth);
        let value = T::deserialize(&mut de).ok()?;
        self.at = self.bytes.len() - rest.len();
        Some(value)
    }

    pub(crate) fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    /// The entry count of a msgpack map (fixmap, map 16/32), at most what the remaining
    /// bytes could hold (two bytes per entry).
    pub(crate) fn map_len(&mut self) -> Option<usize> {
        let len = match self.byte()? {
            b @ 0x80..=0x8f => usize::from(b & 0x0f),
            0xde => self.be(2)? as usize,
            0xdf => self.be(4)? as usize,
            _ => return None,
        };
        (len <= self.remaining() / 2).then_some(len)
    }

    /// The item count of a msgpack array (fixarray, array 16/32), at most the remaining bytes.
    pub(crate) fn array_len(&mut self) -> Option<usize> {
        let len = match self.byte()? {
            b @ 0x90..=0x9f => usize::from(b & 0x0f),
            0xdc => self.be(2)? as usize,
            0xdd => self.be(4)? as usize,
            _ => return None,
        };
        (len <= self.remaining()).then_some(len)
    }
}

/// Counts the values of the first msgpack value in `bytes`: it, and for a map or array every
/// key, value and item inside, at any depth. Nothing is decoded or allocated but a stack of
/// the containers still open (each holds at least one more value, so the stack is bounded by
/// the input's length). Input that is not well-formed stops the count where it fails, as
/// decoding would stop there.
pub(crate) fn count_values(bytes: &[u8]) -> u64 {
    let mut cur = Cursor::new(bytes);
    let mut count = 0u64;
    // Values still to read in each open container, innermost last.
    let mut open: Vec<u64> = Vec::new();
    loop {
        let Some(items) = value_header(&mut cur) else {
            return count;
        };
        count += 1;
        if items > 0 {
            open.push(items);
            continue;
        }
        // A scalar, or an empty container: it completes values up the stack.
        loop {
            match open.last_mut() {
                None => return count,
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

/// The length in bytes of the first msgpack value in `bytes` (for a map or array, with
/// everything inside it), or `None` when the input ends before that value does or is not
/// msgpack. Walks headers as [`count_values`] does, decoding and allocating nothing but the
/// stack of open containers.
pub(crate) fn first_value_len(bytes: &[u8]) -> Option<usize> {
    let mut cur = Cursor::new(bytes);
    // Values still to read in each open container, innermost last.
    let mut open: Vec<u64> = Vec::new();
    loop {
        let items = value_header(&mut cur)?;
        if items > 0 {
            open.push(items);
            continue;
        }
        // A scalar, or an empty container: it completes values up the stack.
        loop {
            match open.last_mut() {
                None => return Some(bytes.len() - cur.remaining()),
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

/// Reads one value's header and skips its scalar bytes; returns how many values a container
/// holds (0 for a scalar), or `None` where the input ends or is not msgpack.
fn value_header(cur: &mut Cursor<'_>) -> Option<u64> {
    value_header_and_float(cur).map(|(items, _)| items)
}

/// [`value_header`], and whether the value is a float that is NaN or infinite.
fn value_header_and_float(cur: &mut Cursor<'_>) -> Option<(u64, bool)> {
    let mut non_finite = false;
    let skip = |cur: &mut Cursor<'_>, n: u64| -> Option<u64> {
        cur.take(usize::try_from(n).ok()?)?;
        Some(0)
    };
    let items = match cur.byte()? {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
        b @ 0x80..=0x8f => 2 * u64::from(b & 0x0f),
        b @ 0x90..=0x9f => u64::from(b & 0x0f),
        b @ 0xa0..=0xbf => skip(cur, u64::from(b & 0x1f))?,
        0xc4 | 0xd9 => {
            let n = cur.be(1)?;
            skip(cur, n)?
        }
        0xc5 | 0xda => {
            let n = cur.be(2)?;
            skip(cur, n)?
        }
        0xc6 | 0xdb => {
            let n = cur.be(4)?;
            skip(cur, n)?
        }
        0xc7 => {
            let n = cur.be(1)?;
            skip(cur, n + 1)?
        }
        0xc8 => {
            let n = cur.be(2)?;
            skip(cur, n + 1)?
        }
        0xc9 => {
            let n = cur.be(4)?;
            skip(cur, n + 1)?
        }
        0xca => {
            non_finite = !f32::from_bits(u32::try_from(cur.be(4)?).ok()?).is_finite();
            0
        }
        0xcb => {
            non_finite = !f64::from_bits(cur.be(8)?).is_finite();
            0
        }
        0xcc | 0xd0 => skip(cur, 1)?,
        0xcd | 0xd1 => skip(cur, 2)?,
        0xce | 0xd2 => skip(cur, 4)?,
        0xcf | 0xd3 => skip(cur, 8)?,
        0xd4 => skip(cur, 2)?,
        0xd5 => skip(cur, 3)?,
        0xd6 => skip(cur, 5)?,
        0xd7 => skip(cur, 9)?,
        0xd8 => skip(cur, 17)?,
        0xdc => cur.be(2)?,
        0xdd => cur.be(4)?,
        0xde => 2 * cur.be(2)?,
        0xdf => 2 * cur.be(4)?,
        // 0xc1 is never used.
        _ => return None,
    };
    // Each value takes at least a byte: a count the rest of the input cannot hold is damage.
    (items <= cur.remaining() as u64).then_some((items, non_finite))
}

/// The index of the first item of a msgpack request body (an array of items, or one item)
/// that holds a float which is NaN or infinite, at any depth. Such a float has no JSON form,
/// and decoded into `meta` it would silently become null. Input that is not well-formed ends
/// the search; the decoder then says what is wrong with it.
pub(crate) fn first_non_finite_float(bytes: &[u8]) -> Option<usize> {
    // Without a float32 or float64 marker byte anywhere there is no float to find; that
    // vectorised scan spares the walk almost every body (text seldom holds these two bytes).
    memchr::memchr2(0xca, 0xcb, bytes)?;
    let mut cur = Cursor::new(bytes);
    let (top_items, top_bad) = value_header_and_float(&mut cur)?;
    if top_bad {
        return Some(0);
    }
    let top_is_array = matches!(bytes.first(), Some(0x90..=0x9f | 0xdc | 0xdd));
    // Values still to read in each open container, the top-level one first.
    let mut open: Vec<u64> = Vec::new();
    if top_items > 0 {
        open.push(top_items);
    }
    let mut item = 0usize;
    while !open.is_empty() {
        let (items, bad) = value_header_and_float(&mut cur)?;
        if bad {
            return Some(if top_is_array { item } else { 0 });
        }
        if items > 0 {
            open.push(items);
            continue;
        }
        // A value ended (a scalar or an empty container), and maybe the containers around it.
        loop {
            if open.len() == 1 && top_is_array {
                // It was an item of the top-level array.
                item += 1;
            }
            let Some(left) = open.last_mut() else { break };
            *left -= 1;
            if *left > 0 {
                break;
            }
            open.pop();
            if open.is_empty() {
                break;
            }
        }
    }
    None
}

#[cfg(test)]
mod value_tests {
    use super::*;

    /// `{"source": "s", "meta": {"x": <float>}}` with the float's msgpack bytes.
    fn item(float: &[u8]) -> Vec<u8> {
        let mut b = b"\x82\xa6source\xa1s\xa4meta\x81\xa1x".to_vec();
        b.extend_from_slice(float);
        b
    }

    fn f64_bytes(v: f64) -> Vec<u8> {
        let mut b = vec![0xcb];
        b.extend_from_slice(&v.to_bits().to_be_bytes());
        b
    }

    #[test]
    fn the_first_value_ends_where_its_last_nested_value_does() {
        let fine = item(&f64_bytes(2.5));
        assert_eq!(first_value_len(&fine), Some(fine.len()));
        let mut trailing = fine.clone();
        trailing.extend_from_slice(&[0x01, 0x02]);
        assert_eq!(first_value_len(&trailing), Some(fine.len()));
        // A truncated value, at any cut, has no end.
        for cut in 0..fine.len() {
            assert_eq!(first_value_len(&fine[..cut]), None, "cut at {cut}");
        }
        assert_eq!(first_value_len(&[0x90]), Some(1));
        assert_eq!(first_value_len(&[0xc1]), None);
    }

    #[test]
    fn a_nan_or_infinite_float_is_found_with_the_index_of_its_item() {
        let fine = item(&f64_bytes(2.5));
        let nan = item(&f64_bytes(f64::NAN));
        let mut inf32 = vec![0xca];
        inf32.extend_from_slice(&f32::INFINITY.to_bits().to_be_bytes());
        let inf = item(&inf32);
        assert_eq!(first_non_finite_float(&fine), None);
        assert_eq!(first_non_finite_float(&nan), Some(0));
        let mut batch = vec![0x94, 0x01];
        batch.extend_from_slice(&fine);
        batch.extend_from_slice(&fine);
        batch.extend_from_slice(&inf);
        assert_eq!(first_non_finite_float(&batch), Some(3));
        // An empty container and a scalar are items too.
        let mut batch = vec![0x93, 0x90];
        batch.extend_from_slice(&fine);
        batch.extend_from_slice(&nan);
        assert_eq!(first_non_finite_float(&batch), Some(2));
        // The array, the empty one, and 7 values per item (map, 2 keys, "s", inner map, key, float).
        assert_eq!(count_values(&batch), 1 + 1 + 7 + 7);
    }
}
