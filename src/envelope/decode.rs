//! A direct decoder for the envelopes spoolgate writes itself.
//!
//! Every record the dispatcher forwards is decoded once (and again on a replay). Through
//! rmp-serde's derived visitor that cost about 5% of the end-to-end CPU at 1 KiB: a generic
//! `deserialize_any` per value, a field-name match through serde's identifier visitor, and
//! a `String` built per key. This decoder reads the msgpack of §5 of spool-format.md with a
//! plain cursor instead.
//!
//! It is a **subset** decoder: it returns `None` for anything it does not handle exactly as
//! rmp-serde would, and the caller then decodes with rmp-serde, so the two can never disagree
//! on a result. What it handles: a map whose keys are the known field names, each at most once,
//! with the value types spoolgate writes (uint, str, map str→uint, array of str, map str→str),
//! and nothing after the map. `meta` and `embed_preview`, of open shape, are decoded by
//! rmp-serde where they stand (`Cursor::serde_value`, at the nesting depth they have in the
//! envelope), so an envelope with client `meta` is not decoded twice. What it hands back:
//! keys it does not know (a newer writer's fields), nil or signed-integer values, duplicate
//! keys, a missing required field, a value out of its field's range, invalid UTF-8, and
//! trailing bytes. A test compares the two decoders on generated and on corrupted envelopes.

use std::collections::BTreeMap;

use super::{Envelope, Priority};
use crate::msgpack::Cursor;

/// rmp-serde's nesting counter at a value of the envelope map (one level in from 1024).
const FIELD_DEPTH: usize = 1023;

/// Tags reserved for up front; more grow the vector.
const TAGS_RESERVED_MAX: usize = 16;

/// Decodes `bytes` when every part of it is in the subset above.
pub(super) fn decode(bytes: &[u8]) -> Option<Envelope> {
    decode_with(bytes, true)
}

/// [`decode`], leaving the text out when `keep_text` is false: it is still checked (valid
/// UTF-8), so the same bytes decode or do not as with [`decode`], but not copied.
pub(super) fn decode_with(bytes: &[u8], keep_text: bool) -> Option<Envelope> {
    let mut cur = Cursor::new(bytes);
    let fields = cur.map_len()?;
    let mut env = Envelope::default();
    // One bit per field seen, for duplicates and for the required ones.
    let mut seen: u32 = 0;
    for _ in 0..fields {
        let bit = match cur.str_bytes()? {
            b"version" => {
                env.version = u32::try_from(cur.uint()?).ok()?;
                1
            }
            b"id" => {
                env.id = cur.string()?;
                1 << 1
            }
            b"source" => {
                env.source = cur.string()?;
                1 << 2
            }
            b"ts_ms" => {
                env.ts_ms = cur.uint()?;
                1 << 3
            }
            b"slot" => {
                env.slot = u16::try_from(cur.uint()?).ok()?;
                1 << 4
            }
            b"tenant" => {
                env.tenant = Some(cur.string()?);
                1 << 5
            }
            b"text" => {
                if keep_text {
                    env.text = Some(cur.string()?);
                } else {
                    cur.str()?;
                }
                1 << 6
            }
            b"text_hash" => {
                env.text_hash = Some(cur.string()?);
                1 << 7
            }
            b"char_len" => {
                env.char_len = Some(cur.uint()?);
                1 << 8
            }
            b"pii" => {
                let entries = cur.map_len()?;
                for _ in 0..entries {
                    let kind = cur.string()?;
                    let count = cur.uint()?;
                    env.pii.insert(kind, count);
                }
                1 << 9
            }
            b"tags" => {
                let items = cur.array_len()?;
                // Reserved for at most a few: a damaged header could claim as many items as
                // the record has bytes, and each costs more memory than its byte.
                let mut tags = Vec::with_capacity(items.min(TAGS_RESERVED_MAX));
                for _ in 0..items {
                    tags.push(cur.string()?);
                }
                env.tags = tags;
                1 << 10
            }
            b"intent_hint" => {
                env.intent_hint = Some(cur.string()?);
                1 << 11
            }
            b"routing_hints" => {
                let entries = cur.map_len()?;
                let mut hints = BTreeMap::new();
                for _ in 0..entries {
                    let k = cur.string()?;
                    let v = cur.string()?;
                    hints.insert(k, v);
                }
                env.routing_hints = hints;
                1 << 12
            }
            b"summary_extractive" => {
                env.summary_extractive = Some(cur.string()?);
                1 << 13
            }
            b"embed_ref" => {
                env.embed_ref = Some(cur.string()?);
                1 << 14
            }
            b"priority" => {
                env.priority = match cur.str()? {
                    "high" => Priority::High,
                    "normal" => Priority::Normal,
                    "low" => Priority::Low,
                    _ => return None,
                };
                1 << 15
            }
            b"meta" => {
                env.meta = cur.serde_value(FIELD_DEPTH)?;
                1 << 16
            }
            b"embed_preview" => {
                env.embed_preview = cur.serde_value(FIELD_DEPTH)?;
                1 << 17
            }
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
    }
    const REQUIRED: u32 = 0b1_1111;
    (seen & REQUIRED == REQUIRED && cur.remaining() == 0).then_some(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn through_serde(bytes: &[u8]) -> Option<Envelope> {
        rmp_serde::from_slice(bytes).ok()
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        (
            (
                any::<u32>(),
                ".{0,20}",
                ".{0,12}",
                proptest::option::of("[a-z]{0,12}"),
                proptest::option::of(".{0,300}"),
                proptest::option::of("[0-9a-f]{64}"),
                proptest::option::of(any::<u64>()),
            ),
            (
                proptest::collection::btree_map("[a-z_]{1,12}", any::<u64>(), 0..4),
                proptest::collection::vec(".{0,20}", 0..20),
                proptest::option::of("[a-z]{0,12}"),
                proptest::collection::btree_map("[a-z]{1,8}", ".{0,8}", 0..3),
                proptest::option::of(".{0,200}"),
                proptest::option::of("[a-z]{0,8}"),
                any::<u64>(),
                0u16..1024,
                prop_oneof![
                    Just(Priority::High),
                    Just(Priority::Normal),
                    Just(Priority::Low)
                ],
                proptest::collection::btree_map("[a-z]{1,6}", any::<i64>(), 0..3),
            ),
        )
            .prop_map(
                |(
                    (version, id, source, tenant, text, text_hash, char_len),
                    (
                        pii,
                        tags,
                        intent_hint,
                        routing_hints,
                        summary,
                        embed_ref,
                        ts_ms,
                        slot,
                        priority,
                        meta,
                    ),
                )| Envelope {
                    version,
                    id,
                    source,
                    tenant,
                    text,
                    text_hash,
                    char_len,
                    pii,
                    tags,
                    intent_hint,
                    routing_hints,
                    summary_extractive: summary,
                    embed_preview: None,
                    embed_ref,
                    ts_ms,
                    meta: meta
                        .into_iter()
                        .map(|(k, v)| (k, serde_json::Value::from(v)))
                        .collect(),
                    slot,
                    priority,
                },
            )
    }

    proptest! {
        #[test]
        fn what_spoolgate_writes_decodes_directly_to_what_rmp_serde_decodes(env in envelope()) {
            let bytes = env.encode().unwrap();
            let direct = decode(&bytes);
            prop_assert_eq!(direct.as_ref(), Some(&env));
            prop_assert_eq!(direct, through_serde(&bytes));
        }

        /// Whatever the damage, the direct decoder either declines or agrees with rmp-serde.
        #[test]
        fn a_damaged_envelope_is_declined_or_decoded_as_rmp_serde_decodes_it(
            env in envelope(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            damage in 0u8..3,
        ) {
            let mut bytes = env.encode().unwrap();
            match damage {
                0 => {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                1 => bytes.truncate(cut.index(bytes.len())),
                _ => bytes.push(byte),
            }
            if let Some(direct) = decode(&bytes) {
                prop_assert_eq!(Some(direct), through_serde(&bytes));
            }
            // Leaving the text out changes nothing else: the same bytes decode or not, and to
            // the same envelope but for its text.
            let without_text = decode_with(&bytes, false);
            let expected = decode(&bytes).map(|e| Envelope { text: None, ..e });
            prop_assert_eq!(without_text, expected);
        }

        /// The start-up scan's decoder is the full one without the text, for what spoolgate
        /// writes and for what it declines alike.
        #[test]
        fn decoding_without_the_text_is_decoding_it_and_dropping_the_text(env in envelope()) {
            let bytes = env.encode().unwrap();
            let without_text = Envelope::decode_without_text(&bytes).ok();
            let expected = Envelope::decode(&bytes).ok().map(|e| Envelope { text: None, ..e });
            prop_assert_eq!(without_text, expected);
        }
    }

    #[test]
    fn open_shapes_are_decoded_where_they_stand_and_unknown_keys_left_to_rmp_serde() {
        let base = Envelope {
            version: 1,
            id: "a".into(),
            source: "s".into(),
            ..Default::default()
        };
        let mut with_meta = base.clone();
        with_meta
            .meta
            .insert("k".into(), serde_json::json!([1, "x"]));
        let mut with_preview = base.clone();
        with_preview.embed_preview = Some(vec![0.5]);
        for env in [with_meta, with_preview] {
            let bytes = env.encode().unwrap();
            assert_eq!(decode(&bytes).as_ref(), Some(&env));
            assert_eq!(through_serde(&bytes).as_ref(), Some(&env));
        }
        #[derive(serde::Serialize)]
        struct Newer<'a> {
            version: u32,
            id: &'a str,
            source: &'a str,
            ts_ms: u64,
            slot: u16,
            later_field: u8,
        }
        let newer = rmp_serde::to_vec_named(&Newer {
            version: 2,
            id: "x",
            source: "s",
            ts_ms: 1,
            slot: 0,
            later_field: 7,
        })
        .unwrap();
        assert_eq!(decode(&newer), None);
        assert_eq!(Envelope::decode(&newer).unwrap().version, 2);
    }

    /// `meta` nested to around rmp-serde's depth limit: the direct decoder accepts and refuses
    /// at exactly the depths rmp-serde does.
    #[test]
    fn meta_nested_to_the_depth_limit_decodes_as_rmp_serde_decodes_it() {
        // A thousand levels of recursion need more than a test thread's stack in debug builds.
        std::thread::Builder::new()
            .stack_size(512 << 20)
            .spawn(meta_nested_to_the_depth_limit)
            .unwrap()
            .join()
            .unwrap();
    }

    fn meta_nested_to_the_depth_limit() {
        let head = Envelope {
            version: 1,
            id: "a".into(),
            source: "s".into(),
            ..Default::default()
        };
        let mut accepted = 0;
        for levels in 1015..1030 {
            // The envelope's encoding with "meta": {"k": [[[...1...]]]} spliced in before ts_ms.
            let mut bytes = head.encode().unwrap();
            bytes[0] += 1;
            let at = bytes.windows(6).position(|w| w == b"\xa5ts_ms").unwrap();
            let mut meta = vec![0xa4, b'm', b'e', b't', b'a', 0x81, 0xa1, b'k'];
            meta.extend(std::iter::repeat_n(0x91, levels));
            meta.push(0x01);
            bytes.splice(at..at, meta);
            let serde = through_serde(&bytes);
            assert_eq!(decode(&bytes), serde, "{levels} levels");
            accepted += usize::from(serde.is_some());
        }
        assert!(
            0 < accepted && accepted < 15,
            "{accepted} of 15 depths accepted"
        );
    }

    #[test]
    fn a_duplicate_or_missing_field_is_left_to_rmp_serde_which_refuses_it() {
        // {"version": 1, "id": "a", "id": "b", "source": "s", "ts_ms": 0, "slot": 0}
        let mut duplicate = vec![0x86, 0xa7];
        duplicate.extend_from_slice(b"version");
        duplicate.push(0x01);
        for id in [b'a', b'b'] {
            duplicate.extend_from_slice(&[0xa2, b'i', b'd', 0xa1, id]);
        }
        duplicate.extend_from_slice(&[0xa6, b's', b'o', b'u', b'r', b'c', b'e', 0xa1, b's']);
        duplicate.extend_from_slice(&[0xa5, b't', b's', b'_', b'm', b's', 0x00]);
        duplicate.extend_from_slice(&[0xa4, b's', b'l', b'o', b't', 0x00]);
        assert_eq!(decode(&duplicate), None);
        assert!(Envelope::decode(&duplicate).is_err());
        // The same without the slot: five entries, one required field missing.
        let mut missing = duplicate[..duplicate.len() - 6].to_vec();
        missing[0] = 0x85;
        assert_eq!(decode(&missing), None);
        assert!(Envelope::decode(&missing).is_err());
    }
}
