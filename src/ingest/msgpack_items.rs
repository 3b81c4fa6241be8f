//! The direct road for msgpack request bodies: the items of a well-formed body read with a
//! plain cursor instead of rmp-serde's visitor.
//!
//! For 100-envelope batches of 1 KiB texts, rmp-serde's generic `deserialize_any` per value and
//! std's UTF-8 check of every string were about 8% of ingest's CPU. This road reads the body's
//! items into the same [`Item`]s as `fast_parse`'s serde road, and like that road it refuses to
//! guess: it returns `None` for anything outside the plain shape of a request (an integer
//! `ts_ms` in a signed encoding, an unknown or repeated key, a key or value of another type, an
//! item that is not a map, trailing bytes), and the body then takes the serde road, with the
//! same result as before. `meta`, of open shape, is decoded by rmp-serde where it stands, at
//! the nesting depth it has in the body, as the serde road decodes it. A test compares the two roads on generated and
//! on damaged bodies.

use std::borrow::Cow;

use super::fast_parse::{Item, Str};
use crate::msgpack::Cursor;

/// rmp-serde's nesting counter at a field of an item that is the whole body (one level in from
/// 1024); one less for an item of an array.
const SINGLE_ITEM_FIELD_DEPTH: usize = 1023;

/// Items reserved for up front; a larger batch grows the vector as its items are read.
pub(super) const ITEMS_RESERVED_MAX: usize = 1024;

/// The items of a msgpack body (one map, or an array of maps), or `None` to take the serde
/// road. A body of more than `items_max` items is declined before any is read (the `Value`
/// road refuses it with its message); the caller checks the count again, as for the other
/// roads.
pub(super) fn items(body: &[u8], items_max: usize) -> Option<Vec<Item<'_>>> {
    let mut cur = Cursor::new(body);
    let items = match body.first()? {
        0x90..=0x9f | 0xdc | 0xdd => {
            let count = cur.array_len()?;
            if count > items_max {
                return None;
            }
            // Reserved up to a bound: the header's count is only a claim until the items
            // are read.
            let mut items = Vec::with_capacity(count.min(ITEMS_RESERVED_MAX));
            for _ in 0..count {
                items.push(item(&mut cur, SINGLE_ITEM_FIELD_DEPTH - 1)?);
            }
            items
        }
        _ => vec![item(&mut cur, SINGLE_ITEM_FIELD_DEPTH)?],
    };
    (cur.remaining() == 0).then_some(items)
}

/// One item: a map of the known keys, each at most once; a nil value is an absent one.
fn item<'a>(cur: &mut Cursor<'a>, field_depth: usize) -> Option<Item<'a>> {
    let fields = cur.map_len()?;
    let mut item = Item::default();
    let mut seen: u8 = 0;
    for _ in 0..fields {
        let bit = match cur.str_bytes()? {
            b"source" => 1,
            b"id" => 2,
            b"tenant" => 4,
            b"text" => 8,
            b"ts_ms" => 16,
            b"priority" => 32,
            b"meta" => 64,
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        if cur.nil() {
            continue;
        }
        // Borrowed from the body: copied once, when the envelope is encoded.
        let text = |cur: &mut Cursor<'a>| cur.str().map(|s| Str(Cow::Borrowed(s)));
        match bit {
            1 => item.source = Some(text(cur)?),
            2 => item.id = Some(text(cur)?),
            4 => item.tenant = Some(text(cur)?),
            8 => item.text = Some(text(cur)?),
            16 => item.ts_ms = Some(cur.uint()?),
            32 => item.priority = Some(text(cur)?),
            _ => item.meta = Some(cur.serde_value(field_depth)?),
        }
    }
    Some(item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::fast_parse::serde_msgpack_items;
    use proptest::prelude::*;

    /// A value as a client might send it, of any msgpack type the roads must tell apart.
    #[derive(Debug, Clone)]
    enum V {
        Str(String),
        Nil,
        Uint(u64),
        Negative(i64),
        /// A non-negative integer in a signed encoding (int 64).
        SignedPositive(i64),
        Float(f64),
        Bool(bool),
        Bin(Vec<u8>),
        Map(Vec<(String, u64)>),
    }

    fn value() -> impl Strategy<Value = V> {
        prop_oneof![
            6 => ".{0,40}".prop_map(V::Str),
            1 => Just(V::Nil),
            1 => any::<u64>().prop_map(V::Uint),
            1 => (i64::MIN..0).prop_map(V::Negative),
            1 => (0..i64::MAX).prop_map(V::SignedPositive),
            1 => any::<f64>().prop_map(V::Float),
            1 => any::<bool>().prop_map(V::Bool),
            1 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(V::Bin),
            1 => proptest::collection::vec(("[a-z]{1,4}", any::<u64>()), 0..3).prop_map(V::Map),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::sample::select(vec!["source", "id", "tenant", "text", "ts_ms", "priority", "meta"])
                .prop_map(str::to_string),
            1 => "[a-z]{1,6}",
        ]
    }

    fn put(out: &mut Vec<u8>, v: &V) {
        match v {
            V::Str(s) => {
                rmp::encode::write_str(out, s).unwrap();
            }
            V::Nil => rmp::encode::write_nil(out).unwrap(),
            V::Uint(n) => {
                rmp::encode::write_uint(out, *n).unwrap();
            }
            V::Negative(n) => {
                rmp::encode::write_sint(out, *n).unwrap();
            }
            V::SignedPositive(n) => rmp::encode::write_i64(out, *n).unwrap(),
            V::Float(f) => rmp::encode::write_f64(out, *f).unwrap(),
            V::Bool(b) => rmp::encode::write_bool(out, *b).unwrap(),
            V::Bin(b) => rmp::encode::write_bin(out, b).unwrap(),
            V::Map(entries) => {
                rmp::encode::write_map_len(out, entries.len() as u32).unwrap();
                for (k, n) in entries {
                    rmp::encode::write_str(out, k).unwrap();
                    rmp::encode::write_uint(out, *n).unwrap();
                }
            }
        }
    }

    fn body(items: &[Vec<(String, V)>], as_array: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if as_array {
            rmp::encode::write_array_len(&mut out, items.len() as u32).unwrap();
        }
        for item in items.iter().take(if as_array { items.len() } else { 1 }) {
            rmp::encode::write_map_len(&mut out, item.len() as u32).unwrap();
            for (k, v) in item {
                rmp::encode::write_str(&mut out, k).unwrap();
                put(&mut out, v);
            }
        }
        out
    }

    fn items_strategy() -> impl Strategy<Value = Vec<Vec<(String, V)>>> {
        proptest::collection::vec(proptest::collection::vec((key(), value()), 0..8), 1..5)
    }

    proptest! {
        /// Whatever the body, the direct road either declines or reads what rmp-serde reads.
        #[test]
        fn the_direct_road_declines_or_agrees_with_the_serde_road(
            items in items_strategy(),
            as_array in any::<bool>(),
        ) {
            let body = body(&items, as_array);
            if let Some(direct) = items_of(&body) {
                prop_assert_eq!(Some(direct), serde_msgpack_items(&body, usize::MAX));
            }
        }

        #[test]
        fn a_damaged_body_is_declined_or_read_as_the_serde_road_reads_it(
            items in items_strategy(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            damage in 0u8..3,
        ) {
            let mut body = body(&items, true);
            match damage {
                0 => {
                    let i = at.index(body.len());
                    body[i] = byte;
                }
                1 => body.truncate(at.index(body.len())),
                _ => body.push(byte),
            }
            if let Some(direct) = items_of(&body) {
                prop_assert_eq!(Some(direct), serde_msgpack_items(&body, usize::MAX));
            }
        }

        /// The plain shape of a request, strings and a uint `ts_ms`, takes the direct road.
        #[test]
        fn plain_requests_take_the_direct_road(
            texts in proptest::collection::vec(".{0,300}", 1..20),
            ts_ms in any::<u64>(),
        ) {
            let items: Vec<Vec<(String, V)>> = texts
                .into_iter()
                .map(|t| vec![
                    ("source".to_string(), V::Str("svc".into())),
                    ("tenant".to_string(), V::Str("acme".into())),
                    ("text".to_string(), V::Str(t)),
                    ("ts_ms".to_string(), V::Uint(ts_ms)),
                    ("priority".to_string(), V::Str("low".into())),
                    ("meta".to_string(), V::Nil),
                ])
                .collect();
            let body = body(&items, true);
            let direct = super::items(&body, 64);
            prop_assert!(direct.is_some());
            prop_assert_eq!(direct, serde_msgpack_items(&body, usize::MAX));
        }
    }

    /// `meta` nested to around rmp-serde's depth limit, in a single item and in a batch: the
    /// direct road agrees with the serde road at every depth, accepting and refusing alike.
    #[test]
    fn meta_nested_to_the_depth_limit_is_read_as_the_serde_road_reads_it() {
        // A thousand levels of recursion need more than a test thread's stack in debug builds.
        std::thread::Builder::new()
            .stack_size(512 << 20)
            .spawn(|| {
                let mut accepted = 0;
                for as_array in [false, true] {
                    for levels in 1015..1030 {
                        let mut body = Vec::new();
                        if as_array {
                            body.push(0x91);
                        }
                        body.extend([0x82, 0xa6]);
                        body.extend(b"source");
                        body.extend([0xa1, b's', 0xa4]);
                        body.extend(b"meta");
                        body.extend([0x81, 0xa1, b'k']);
                        body.extend(std::iter::repeat_n(0x91, levels));
                        body.push(0x01);
                        let serde = serde_msgpack_items(&body, usize::MAX);
                        assert_eq!(items(&body, 4), serde, "{levels} levels, array {as_array}");
                        accepted += usize::from(serde.is_some());
                    }
                }
                assert!(0 < accepted && accepted < 30, "{accepted} of 30 accepted");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// With a limit some generated bodies exceed, so declining them is exercised too.
    fn items_of(body: &[u8]) -> Option<Vec<Item<'_>>> {
        items(body, 4)
    }
}
