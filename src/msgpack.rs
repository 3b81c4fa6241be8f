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
