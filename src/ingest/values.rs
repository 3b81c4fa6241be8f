//! What decoding a request body will build, known before it is decoded.
//!
//! The in-flight budget (`inflight`) takes a request's body bytes before the body is read. But
//! what decoding builds follows the number of JSON or msgpack values in the body, not its
//! bytes: a msgpack `nil` is one byte and a decoded value is 32, inside a vector that may hold
//! twice the room it uses, so a 16 MiB body of nils in a `meta` array would have built about
//! 1 GiB before the envelope size limit could refuse it. So once the body is read, its values
//! are counted, by a pass that allocates nothing, and the request also takes
//! [`DECODED_BYTES_PER_VALUE`] bytes per value from the budget before anything is decoded. A
//! body of at most [`COUNTED_ABOVE_BYTES`] is not counted: every value takes at least one
//! byte, so its length bounds its values, and counting would cost small requests more than
//! the bytes it saves.
//!
//! Each envelope of a batch also builds a fixed amount beside its values, whatever its size:
//! the fast road's item, the checked envelope, the parsed one with its id and the fixed fields
//! of its encoding. For the smallest envelopes that is several times what their few values are
//! charged (588 bytes against 192 for `{"source":"s"}`), so a request is also charged
//! [`DECODED_BYTES_PER_ENVELOPE`] per item its body may hold ([`decoded_items`]): the count in
//! a msgpack array's header, the items of a JSON array (counted by the same walk, small bodies
//! included), the lines of NDJSON, and one for a lone object. [`decoded_bytes`] is the sum the
//! ingest handler takes; `tests/ingest_decode_memory.rs` measures parses against it.

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::parse::ContentType;

/// Bytes one decoded value may take: a 32-byte `serde_json::Value` in a vector with up to
/// twice its room, or a map entry's share of its key, value and tree node.
pub const DECODED_BYTES_PER_VALUE: u64 = 64;

/// Bytes one envelope of a batch may take beside its values while the request is parsed
/// (588 measured for a full batch of the smallest envelopes, on 2026-12-05).
pub const DECODED_BYTES_PER_ENVELOPE: u64 = 640;

/// Bodies up to this size are charged for one value per byte instead of being counted.
pub const COUNTED_ABOVE_BYTES: usize = 4096;

/// What parsing `body` may build, taken from the in-flight budget before it is decoded: its
/// values and its items (see the module doc).
pub fn decoded_bytes(content_type: ContentType, body: &[u8]) -> u64 {
    let (values, items) = match content_type {
        // A JSON array over the counting threshold is walked once for both counts.
        ContentType::Json if body.len() > COUNTED_ABOVE_BYTES => json_counts(body),
        _ => (
            decoded_values(content_type, body),
            decoded_items(content_type, body),
        ),
    };
    values
        .saturating_mul(DECODED_BYTES_PER_VALUE)
        .saturating_add(items.saturating_mul(DECODED_BYTES_PER_ENVELOPE))
}

/// How many envelopes `body` may hold, at most: a claimed count where the encoding states one
/// (a msgpack array's header, itself bounded by the bytes left), else what a walk finds.
/// Malformed input counts what precedes the fault, as for values.
pub fn decoded_items(content_type: ContentType, body: &[u8]) -> u64 {
    match content_type {
        ContentType::Msgpack => match body.first() {
            None => 0,
            Some(0x90..=0x9f | 0xdc | 0xdd) => crate::msgpack::Cursor::new(body)
                .array_len()
                .map_or(0, |n| n as u64),
            Some(_) => 1,
        },
        ContentType::Json => json_items(body),
        ContentType::NdJson => body
            .split(|&b| b == b'\n')
            .filter(|line| !line.trim_ascii().is_empty())
            .count() as u64,
    }
}

/// The items of a JSON body: one for anything but an array, else the array's elements.
fn json_items(text: &[u8]) -> u64 {
    if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
        return 1;
    }
    json_counts(text).1
}

/// The values of one JSON document and its items: the elements of a top-level array, else one.
fn json_counts(text: &[u8]) -> (u64, u64) {
    let mut count = 0u64;
    let mut items = 0u64;
    let mut de = serde_json::Deserializer::from_slice(text);
    // A malformed document stops the walk; what was counted up to there is what the decoder
    // would build before it fails at the same point.
    let _ = Counter {
        count: &mut count,
        items: Some(&mut items),
    }
    .deserialize(&mut de);
    let is_array = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    (count, if is_array { items } else { 1 })
}

/// How many values decoding `body` may build, at most: every value, key and container in it
/// (for a body that is not well-formed, those before the point where decoding will fail).
pub fn decoded_values(content_type: ContentType, body: &[u8]) -> u64 {
    if body.len() <= COUNTED_ABOVE_BYTES {
        return body.len() as u64;
    }
    match content_type {
        ContentType::Msgpack => crate::msgpack::count_values(body),
        ContentType::Json => json_values(body),
        ContentType::NdJson => body
            .split(|&b| b == b'\n')
            .filter(|line| !line.trim_ascii().is_empty())
            .map(json_values)
            .sum(),
    }
}

/// The values of one JSON document, counted as serde_json walks it.
fn json_values(text: &[u8]) -> u64 {
    json_counts(text).0
}

/// Counts one value and, for a container, everything in it; given `items`, a top-level
/// array also counts its elements there.
struct Counter<'a> {
    count: &'a mut u64,
    items: Option<&'a mut u64>,
}

impl<'de> DeserializeSeed<'de> for Counter<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        *self.count += 1;
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        *self.count += 1;
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        *self.count += 1;
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        *self.count += 1;
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        *self.count += 1;
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        *self.count += 1;
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        *self.count += 1;
        let mut items = self.items;
        while seq
            .next_element_seed(Counter {
                count: &mut *self.count,
                items: None,
            })?
            .is_some()
        {
            if let Some(items) = items.as_deref_mut() {
                *items += 1;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        *self.count += 1;
        while map
            .next_key_seed(Counter {
                count: &mut *self.count,
                items: None,
            })?
            .is_some()
        {
            map.next_value_seed(Counter {
                count: &mut *self.count,
                items: None,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(json: &str) -> Vec<u8> {
        // Past the size under which bodies are not counted.
        let mut body = json.as_bytes().to_vec();
        body.resize(COUNTED_ABOVE_BYTES + 1, b' ');
        body
    }

    #[test]
    fn every_value_key_and_container_of_a_json_body_is_counted() {
        // The array, the object, two keys, a string, and the array of three numbers in it.
        let body = padded(r#"[{"source": "s", "meta": [1, 2.5, -3]}]"#);
        assert_eq!(decoded_values(ContentType::Json, &body), 9);
    }

    #[test]
    fn ndjson_counts_each_line() {
        let body = padded("{\"source\": \"a\"}\n\n{\"source\": \"b\", \"text\": \"x\"}\n");
        assert_eq!(decoded_values(ContentType::NdJson, &body), 3 + 5);
    }

    #[test]
    fn a_msgpack_body_dense_with_values_is_counted_value_by_value() {
        // {"source": "s", "meta": {"a": [nil x 20000]}}: what a 16 MiB body of nils would be.
        let mut body = b"\x82\xa6source\xa1s\xa4meta\x81\xa1a\xdc".to_vec();
        body.extend_from_slice(&20_000u16.to_be_bytes());
        body.extend(std::iter::repeat_n(0xc0, 20_000));
        assert_eq!(
            decoded_values(ContentType::Msgpack, &body),
            // The map, its two keys and two values (one the inner map), the inner key, the array.
            1 + 4 + 1 + 1 + 20_000
        );
    }

    #[test]
    fn a_small_body_is_charged_one_value_per_byte_without_counting() {
        assert_eq!(decoded_values(ContentType::Json, br#"{"source":"s"}"#), 14);
    }

    #[test]
    fn items_are_the_array_elements_the_msgpack_header_claims_or_the_ndjson_lines() {
        assert_eq!(decoded_items(ContentType::Json, br#"{"source":"s"}"#), 1);
        assert_eq!(
            decoded_items(ContentType::Json, br#" [{"a":[1,2]},{},3]"#),
            3
        );
        // A malformed array counts the elements before the fault.
        assert_eq!(decoded_items(ContentType::Json, br#"[{}, {}, }"#), 2);
        assert_eq!(decoded_items(ContentType::Json, b""), 1);
        assert_eq!(decoded_items(ContentType::Msgpack, b"\x81\xa1a\x01"), 1);
        assert_eq!(decoded_items(ContentType::Msgpack, b"\x93\x80\x80\x80"), 3);
        // A header's claim is bounded by the bytes that follow it.
        assert_eq!(
            decoded_items(ContentType::Msgpack, b"\xdd\xff\xff\xff\xff\x80"),
            0
        );
        assert_eq!(decoded_items(ContentType::Msgpack, b""), 0);
        assert_eq!(decoded_items(ContentType::NdJson, b"{}\n\n {} \r\n{}"), 3);
    }

    #[test]
    fn the_bytes_charged_are_the_values_and_the_items() {
        let body = br#"[{"source":"s"},{"source":"t"}]"#;
        assert_eq!(
            decoded_bytes(ContentType::Json, body),
            body.len() as u64 * DECODED_BYTES_PER_VALUE + 2 * DECODED_BYTES_PER_ENVELOPE
        );
        // Counted, in the one walk: the array, two objects, two keys, two values.
        let body = padded(r#"[{"source":"s"},{"source":"t"}]"#);
        assert_eq!(
            decoded_bytes(ContentType::Json, &body),
            7 * DECODED_BYTES_PER_VALUE + 2 * DECODED_BYTES_PER_ENVELOPE
        );
        let body = padded(r#"{"source":"s"}"#);
        assert_eq!(
            decoded_bytes(ContentType::Json, &body),
            3 * DECODED_BYTES_PER_VALUE + DECODED_BYTES_PER_ENVELOPE
        );
    }

    #[test]
    fn a_malformed_body_counts_what_precedes_the_fault() {
        let body = padded(r#"[1, 2, 3, }"#);
        assert_eq!(decoded_values(ContentType::Json, &body), 4);
    }
}
