//! The fast road through request parsing, for requests with nothing wrong in them.
//!
//! `parse` decodes a body into `serde_json::Value`s and checks each item field by field, which
//! gives precise refusals but builds a map per item, allocates every key and copies every
//! string: for 100-envelope msgpack batches that was the largest user-space cost of ingest.
//! This module decodes the same bodies straight into typed fields, refusing to guess: any
//! surprise (an unknown or repeated key, a null where a name is required, a value of the wrong
//! type, an item that is not a map, a check that fails, too many or no items, trailing bytes)
//! makes it give up with `None`, and the request takes the `Value` road, which then either
//! accepts it or refuses it with its usual message. So this road may only ever accept what
//! that one accepts, and build the same envelopes; `tests` holds both roads to that.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::parse::{
    assemble, bind_tenant, check_meta_depth, check_name, meta_map, priority_of, Checked,
    ContentType, Fields, ParseLimits,
};
use crate::envelope::Priority;

/// One item as the client sent it: only the known fields, each of its one accepted type.
/// Strings are borrowed from the body where the decoder can (always on the direct msgpack
/// road; in JSON, a string without escapes).
#[derive(Default, Debug, PartialEq)]
pub(super) struct Item<'de> {
    pub(super) source: Option<Str<'de>>,
    pub(super) id: Option<Str<'de>>,
    pub(super) tenant: Option<Str<'de>>,
    pub(super) text: Option<Str<'de>>,
    pub(super) ts_ms: Option<u64>,
    pub(super) priority: Option<Str<'de>>,
    /// Decoded as a `Value`, exactly as the `Value` road decodes it.
    pub(super) meta: Option<Value>,
}

/// A string that was a string in the body. serde's own `String` also takes msgpack `bin`
/// data that happens to be UTF-8, which the `Value` road refuses. Borrowed from the body when
/// the decoder allows: the text, most of a request's bytes, is then copied only once, into
/// the envelope's encoding, instead of first into a `String` of its own.
#[derive(Debug, PartialEq)]
pub(super) struct Str<'de>(pub(super) Cow<'de, str>);

impl Str<'_> {
    /// The string as an owned `String` (a copy when it is borrowed).
    fn owned(self) -> String {
        self.0.into_owned()
    }
}

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Str<'de>, D::Error> {
        deserializer.deserialize_str(StrVisitor)
    }
}

struct StrVisitor;

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Str<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
        Ok(Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
        Ok(Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'de>, E> {
        Ok(Str(Cow::Owned(v)))
    }
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Item<'de>, D::Error> {
        // `deserialize_map`, not a derived `deserialize_struct`: rmp-serde would accept a
        // msgpack array as a struct (fields by position), which the `Value` road refuses.
        deserializer.deserialize_map(ItemVisitor)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an envelope map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item<'de>, A::Error> {
        let mut item = Item::default();
        // A null field is as good as an absent one on both roads, except that a null `source`
        // is refused there: it leaves `source` unset here, and `checked` gives the item up.
        // A key seen twice gives the request up (the `Value` road keeps the last).
        let mut seen: u8 = 0;
        // Keys are `Str`s too: borrowed from the body where the decoder can.
        while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
            let bit = match key.as_ref() {
                "source" => 1,
                "id" => 2,
                "tenant" => 4,
                "text" => 8,
                "ts_ms" => 16,
                "priority" => 32,
                "meta" => 64,
                other => return Err(de::Error::custom(format_args!("unknown key {other}"))),
            };
            if seen & bit != 0 {
                return Err(de::Error::custom(format_args!("repeated key {key}")));
            }
            seen |= bit;
            match bit {
                1 => item.source = map.next_value()?,
                2 => item.id = map.next_value()?,
                4 => item.tenant = map.next_value()?,
                8 => item.text = map.next_value()?,
                16 => item.ts_ms = map.next_value()?,
                32 => item.priority = map.next_value()?,
                _ => item.meta = map.next_value()?,
            }
        }
        Ok(item)
    }
}

/// The item's checked fields, or `None` where the `Value` road would refuse it (or might).
/// The envelope comes without its text, which stays as the item had it (borrowed from the
/// body where it could be) until it is encoded.
fn checked<'de>(item: Item<'de>, auth_tenant: Option<&str>, now_ms: u64) -> Option<Checked<'de>> {
    let source = item.source?.owned();
    check_name("source", &source).ok()?;
    let id = item.id.map(Str::owned);
    if let Some(id) = &id {
        check_name("id", id).ok()?;
    }
    let tenant = item.tenant.map(Str::owned);
    if let Some(t) = &tenant {
        check_name("tenant", t).ok()?;
    }
    let tenant = bind_tenant(tenant, auth_tenant).ok()?;
    let priority = match &item.priority {
        None => Priority::Normal,
        Some(p) => priority_of(&p.0)?,
    };
    let meta = meta_map(item.meta).ok()?;
    check_meta_depth(&meta).ok()?;
    let (envelope, id_generated) = assemble(
        Fields {
            source,
            id,
            tenant,
            ts_ms: item.ts_ms.unwrap_or(now_ms),
            priority,
            meta,
        },
        now_ms,
    );
    Some(Checked {
        envelope,
        id_generated,
        text: item.text.map(|s| s.0),
    })
}

/// The body's items, decoded without a detour through `Value`; `None` on any surprise.
fn items<'de>(
    content_type: ContentType,
    body: &'de [u8],
    limits: &ParseLimits,
) -> Option<Vec<Item<'de>>> {
    let items = match content_type {
        ContentType::Json => match body.iter().find(|b| !b.is_ascii_whitespace())? {
            b'[' => {
                let mut de = serde_json::Deserializer::from_slice(body);
                let items =
                    de::DeserializeSeed::deserialize(BoundedItems(limits.batch_items_max), &mut de)
                        .ok()?;
                de.end().ok()?;
                items
            }
            b'{' => vec![serde_json::from_slice::<Item>(body).ok()?],
            _ => return None,
        },
        ContentType::Msgpack => super::msgpack_items::items(body, limits.batch_items_max)
            .or_else(|| serde_msgpack_items(body, limits.batch_items_max))?,
        ContentType::NdJson => {
            let mut items = Vec::new();
            for line in body.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if items.len() >= limits.batch_items_max {
                    return None;
                }
                items.push(serde_json::from_slice::<Item>(line).ok()?);
            }
            items
        }
    };
    (!items.is_empty() && items.len() <= limits.batch_items_max).then_some(items)
}

/// A JSON or msgpack array of at most this many items, given up at the item after the last
/// one allowed rather than once the whole array is built. The in-flight budget charges a
/// request [`super::values::DECODED_BYTES_PER_VALUE`] bytes per value before it is decoded,
/// and an `Item` is larger than that: decoding all of an over-long batch of empty objects into
/// a `Vec<Item>` (growing by doubling) built 4-6 times its charge, 1.6 GB for a 4 MB msgpack
/// body, before the count was checked and the `Value` road refused the request. Declined
/// here, the request goes down the `Value` road, which stays within the charge and answers
/// 413 with its message.
struct BoundedItems(usize);

impl<'de> de::DeserializeSeed<'de> for BoundedItems {
    type Value = Vec<Item<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedItems {
    type Value = Vec<Item<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of at most {} envelopes", self.0)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // The length a header claims is only a claim until the items are read.
        let reserved = seq
            .size_hint()
            .unwrap_or(0)
            .min(self.0)
            .min(super::msgpack_items::ITEMS_RESERVED_MAX);
        let mut items = Vec::with_capacity(reserved);
        while let Some(item) = seq.next_element()? {
            if items.len() == self.0 {
                return Err(de::Error::custom("too many envelopes"));
            }
            items.push(item);
        }
        Ok(items)
    }
}

/// A msgpack body's items through rmp-serde, at most `items_max` of them: the road for what
/// `msgpack_items` declines.
pub(super) fn serde_msgpack_items(body: &[u8], items_max: usize) -> Option<Vec<Item<'_>>> {
    let many = match body.first()? {
        0x90..=0x9f | 0xdc | 0xdd => true,
        0x80..=0x8f | 0xde | 0xdf => false,
        _ => return None,
    };
    // Strings are borrowed from the body rather than copied through a scratch buffer
    // first, as a `Read`-based deserializer does.
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    let items = if many {
        de::DeserializeSeed::deserialize(BoundedItems(items_max), &mut de).ok()?
    } else {
        vec![Item::deserialize(&mut de).ok()?]
    };
    // This deserializer does not say how much it consumed, so the body's first value is
    // measured by walking its headers: anything after it gives the request up. (Trying to
    // read one more value and taking an end of input for "nothing more" accepted trailing
    // bytes that began a truncated value, which the `Value` road refuses; the fuzz target's
    // oracle found it.)
    (crate::msgpack::first_value_len(body)? == body.len()).then_some(items)
}

/// Every item's envelope, whether its id was generated, and its text, if the whole request is
/// well-formed and valid; `None` sends it down the `Value` road.
pub(super) fn envelopes<'de>(
    content_type: ContentType,
    body: &'de [u8],
    limits: &ParseLimits,
    auth_tenant: Option<&str>,
    now_ms: u64,
) -> Option<Vec<Checked<'de>>> {
    let items = items(content_type, body, limits)?;
    // Sized up front: collecting into an `Option<Vec<_>>` cannot use the iterator's length, and
    // growing by doubling moved every envelope struct several times.
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        out.push(checked(item, auth_tenant, now_ms)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UnknownFields;
    use crate::ingest::parse::value_envelopes;

    const LIMITS: ParseLimits = ParseLimits {
        batch_items_max: 4,
        envelope_bytes_max: 4096,
        unknown_fields: UnknownFields::Meta,
    };

    /// Generated ids differ from run to run; everything else must not.
    fn without_generated_ids(mut v: Vec<Checked<'_>>) -> Vec<Checked<'_>> {
        for c in &mut v {
            if c.id_generated {
                c.envelope.id.clear();
            }
        }
        v
    }

    /// Runs both roads; returns whether the fast one accepted. Fails if the fast road accepts
    /// what the `Value` road refuses, or builds different envelopes or texts (a text borrowed
    /// from the body equals the same text owned).
    fn both(content_type: ContentType, body: &[u8], auth: Option<&str>) -> bool {
        let fast = envelopes(content_type, body, &LIMITS, auth, 77);
        let slow = value_envelopes(content_type, body, &LIMITS, auth, 77);
        match (fast, slow) {
            (Some(f), Ok(s)) => {
                assert_eq!(
                    without_generated_ids(f),
                    without_generated_ids(s),
                    "{body:?}"
                );
                true
            }
            (Some(_), Err(e)) => panic!("fast road accepted what is refused ({e}): {body:?}"),
            (None, _) => false,
        }
    }

    fn msgpack(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(v).expect("encodes")
    }

    #[test]
    fn well_formed_requests_take_the_fast_road_to_the_same_envelopes() {
        let full = serde_json::json!({"source": "svc", "id": "c1", "tenant": "acme",
            "text": "héllo \u{1F600} \"q\"", "ts_ms": 1_700_000_000_000u64, "priority": "low",
            "meta": {"b": [1, 2.5, {"z": null}], "a": "x"}});
        let nulls = serde_json::json!({"source": "svc", "id": null, "tenant": null,
            "text": null, "ts_ms": null, "priority": null, "meta": null});
        let bare = serde_json::json!({"source": "svc"});
        for v in [&full, &nulls, &bare] {
            let batch = serde_json::json!([v, {"source": "other", "text": "t"}]);
            assert!(both(ContentType::Json, v.to_string().as_bytes(), None));
            assert!(both(ContentType::Json, batch.to_string().as_bytes(), None));
            assert!(both(ContentType::Msgpack, &msgpack(v), None));
            assert!(both(ContentType::Msgpack, &msgpack(&batch), None));
            let nd = format!("{v}\r\n\n  \n{}\n", serde_json::json!({"source": "n"}));
            assert!(both(ContentType::NdJson, nd.as_bytes(), None));
        }
        // With auth, the bound tenant fills in a missing one and matches a given one.
        assert!(both(ContentType::Json, br#"{"source":"s"}"#, Some("acme")));
        assert!(both(
            ContentType::Json,
            br#"{"source":"s","tenant":"acme"}"#,
            Some("acme")
        ));
        // A key written with an escape is still that key.
        assert!(both(ContentType::Json, br#"{"sourc\u0065":"s"}"#, None));
    }

    #[test]
    fn anything_unusual_is_left_to_the_value_road() {
        let cases: Vec<(ContentType, Vec<u8>)> = vec![
            (ContentType::Json, br#"{"source":"s","extra":1}"#.to_vec()),
            (ContentType::Json, br#"{"source":"s","source":"t"}"#.to_vec()),
            (ContentType::Json, br#"{"source":null}"#.to_vec()),
            (ContentType::Json, br#"{"text":"no source"}"#.to_vec()),
            (ContentType::Json, br#"{"source":""}"#.to_vec()),
            (ContentType::Json, br#"{"source":"a\u0007b"}"#.to_vec()),
            (ContentType::Json, format!(r#"{{"source":"{}"}}"#, "x".repeat(257)).into_bytes()),
            (ContentType::Json, br#"{"source":"s","id":""}"#.to_vec()),
            (ContentType::Json, br#"{"source":"s","text":5}"#.to_vec()),
            (ContentType::Json, br#"{"source":"s","ts_ms":-1}"#.to_vec()),
            (ContentType::Json, br#"{"source":"s","ts_ms":1.5}"#.to_vec()),
            (ContentType::Json, br#"{"source":"s","ts_ms":"1"}"#.to_vec()),
            (ContentType::Json, br#"{"source":"s","priority":"urgent"}"#.to_vec()),
            (ContentType::Json, br#"{"source":"s","meta":[1]}"#.to_vec()),
            (ContentType::Json, br#"{"source":"s","meta":{"d":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}"#.to_vec()),
            (ContentType::Json, br#"[]"#.to_vec()),
            (ContentType::Json, br#"[{"source":"s"},5]"#.to_vec()),
            (ContentType::Json, br#"[{"source":"a"},{"source":"b"},{"source":"c"},{"source":"d"},{"source":"e"}]"#.to_vec()),
            (ContentType::Json, br#"{"source":"s"} x"#.to_vec()),
            (ContentType::Json, br#""just a string""#.to_vec()),
            (ContentType::NdJson, b"{\"source\":\"s\"}\n[1]\n".to_vec()),
            (ContentType::NdJson, b"\n\n".to_vec()),
            (ContentType::Msgpack, msgpack(&serde_json::json!([["svc"]]))),
            (ContentType::Msgpack, msgpack(&serde_json::json!(["svc"]))),
            (ContentType::Msgpack, {
                let mut b = msgpack(&serde_json::json!({"source": "s"}));
                b.push(0xc0);
                b
            }),
            // Trailing bytes that are not a whole value: the never-used marker 0xc1, and a
            // str8 marker without its length.
            (ContentType::Msgpack, {
                let mut b = msgpack(&serde_json::json!({"source": "s"}));
                b.push(0xc1);
                b
            }),
            (ContentType::Msgpack, {
                let mut b = msgpack(&serde_json::json!([{"source": "s"}]));
                b.push(0xd9);
                b
            }),
            // Trailing bytes that begin a container cut short where a value's marker would be
            // (found by the fuzz target): reading one more value ends at the end of the input
            // there, as it does after a complete body.
            (ContentType::Msgpack, {
                let mut b = msgpack(&serde_json::json!({"source": "s"}));
                b.extend_from_slice(&[0xdf, 0, 0, 0, 2, 0x01]);
                b
            }),
            (
                ContentType::Msgpack,
                hex::decode(
                    "84a6736f75726365a3737663a674656e616e74a56f74686572a26964a26331a574735f6d73\
                     cfa4613b2f63a67465dfc56d6e26ce744167a57473f96d",
                )
                .expect("hex"),
            ),
            // `text` as msgpack bin (0xc4): UTF-8 bytes, but not a string.
            (ContentType::Msgpack, {
                let mut b = vec![0x82, 0xa6];
                b.extend_from_slice(b"source");
                b.extend_from_slice(&[0xa1, b's', 0xa4]);
                b.extend_from_slice(b"text");
                b.extend_from_slice(&[0xc4, 0x02, b'h', b'i']);
                b
            }),
            // A key as msgpack bin.
            (ContentType::Msgpack, {
                let mut b = vec![0x81, 0xc4, 0x06];
                b.extend_from_slice(b"source");
                b.extend_from_slice(&[0xa1, b's']);
                b
            }),
        ];
        for (content_type, body) in &cases {
            assert!(
                !both(*content_type, body, None),
                "fast road took {:?}",
                String::from_utf8_lossy(body)
            );
        }
        // A tenant other than the token's.
        assert!(!both(
            ContentType::Json,
            br#"{"source":"s","tenant":"other"}"#,
            Some("acme")
        ));
    }
}
