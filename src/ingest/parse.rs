//! Request bodies to envelopes: content-type dispatch, per-item validation, and the defaults
//! spoolgate fills in (`id`, `ts_ms`, `slot`, `version`).
//!
//! A request is validated whole before anything is written: the first invalid item makes the
//! request a 400 that names the item's index and the reason, and nothing of it reaches the
//! spool. All three content types go through one path: the body is decoded into JSON values
//! (msgpack through serde as well), then each item is checked field by field, so the error
//! messages are the same whatever the encoding. A request that is entirely well-formed first
//! takes a faster road to the same result (`fast_parse`); anything that road does not accept
//! comes here, and the answer, a refusal included, is this path's.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;

use serde_json::Value;

use crate::config::UnknownFields;
use crate::envelope::{NewEnvelope, Priority};
use crate::slots::slot_of;

/// Longest `source`, `tenant` or `id`, in bytes.
pub const NAME_BYTES_MAX: usize = 256;
/// Deepest nesting accepted inside `meta`.
pub const META_DEPTH_MAX: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    Json,
    NdJson,
    Msgpack,
}

impl ContentType {
    /// Parses a Content-Type header value; parameters such as `charset=utf-8` are ignored.
    pub fn parse(header: &str) -> Option<ContentType> {
        let essence = header
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(ContentType::Json),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Some(ContentType::NdJson)
            }
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Some(ContentType::Msgpack)
            }
            _ => None,
        }
    }
}

/// Why a request body was refused. Every variant maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// 400: the body is not valid in its declared encoding.
    #[error("body is not valid {encoding}: {reason}")]
    Malformed {
        encoding: &'static str,
        reason: String,
    },
    /// 400: one item is invalid.
    #[error("envelope at index {index}: {reason}")]
    Item { index: usize, reason: String },
    /// 413: too many items.
    #[error("batch of {count} envelopes exceeds ingest.batch_items_max {max}")]
    TooManyItems { count: usize, max: usize },
    /// 413: one item is too large once encoded.
    #[error(
        "envelope at index {index} is {len} bytes encoded as stored (each byte 0xF7 counted twice), over ingest.envelope_bytes_max {max}"
    )]
    ItemTooLarge { index: usize, len: usize, max: u64 },
    /// 400: the request has no envelopes.
    #[error("request contains no envelopes")]
    Empty,
}

impl ParseError {
    pub fn status(&self) -> u16 {
        match self {
            ParseError::TooManyItems { .. } | ParseError::ItemTooLarge { .. } => 413,
            _ => 400,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ParseError::Malformed { .. } => "malformed_body",
            ParseError::Item { .. } => "invalid_envelope",
            ParseError::TooManyItems { .. } => "too_many_envelopes",
            ParseError::ItemTooLarge { .. } => "envelope_too_large",
            ParseError::Empty => "empty_batch",
        }
    }

    pub fn index(&self) -> Option<usize> {
        match self {
            ParseError::Item { index, .. } | ParseError::ItemTooLarge { index, .. } => Some(*index),
            _ => None,
        }
    }
}

/// What the parser needs to know besides the body.
pub struct ParseLimits {
    pub batch_items_max: usize,
    pub envelope_bytes_max: u64,
    pub unknown_fields: UnknownFields,
}

/// A validated envelope and its encoded bytes, ready for the spool.
#[derive(Debug)]
pub struct Parsed {
    /// The envelope as ingest built it, which has no text: only `encoded` holds that (nothing
    /// after the parse reads it, and keeping it borrowed from the body until it was encoded
    /// spared a copy of most of the request's bytes).
    pub envelope: NewEnvelope,
    /// A slice of one buffer holding the whole request's encodings (see [`parse_request`]).
    pub encoded: Bytes,
    /// Bytes `encoded` takes stored in a spool frame (`spool::format::stored_len`).
    pub stored_len: usize,
    /// The request carried no `id` and spoolgate generated one: a retry of the request would
    /// get a new id, so there is nothing to deduplicate it against.
    pub id_generated: bool,
}

/// A valid item on its way to the spool: its envelope without the text, whether its id was
/// generated, and its text, kept apart (borrowed from the body where the fast road could) so
/// that it is copied once, into the encoding, rather than first into the envelope.
#[derive(Debug, PartialEq)]
pub(super) struct Checked<'a> {
    pub envelope: NewEnvelope,
    pub id_generated: bool,
    pub text: Option<Cow<'a, str>>,
}

/// Decodes the body into a list of items (an object/map alone is a batch of one).
fn decode_items(
    content_type: ContentType,
    body: &[u8],
    limits: &ParseLimits,
) -> Result<Vec<Value>, ParseError> {
    let items = match content_type {
        ContentType::Json => {
            let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::Malformed {
                encoding: "JSON",
                reason: e.to_string(),
            })?;
            into_items(value, "JSON")?
        }
        ContentType::Msgpack => {
            let mut de = rmp_serde::Deserializer::new(body);
            let value: Value =
                serde::Deserialize::deserialize(&mut de).map_err(|e| ParseError::Malformed {
                    encoding: "msgpack",
                    reason: e.to_string(),
                })?;
            let consumed = de.get_ref().len();
            if consumed != 0 {
                return Err(ParseError::Malformed {
                    encoding: "msgpack",
                    reason: format!("{consumed} trailing bytes after the first value"),
                });
            }
            into_items(value, "msgpack")?
        }
        ContentType::NdJson => {
            let mut items = Vec::new();
            for (n, line) in body.split(|&b| b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if items.len() >= limits.batch_items_max {
                    return Err(ParseError::TooManyItems {
                        count: items.len() + 1,
                        max: limits.batch_items_max,
                    });
                }
                let value: Value =
                    serde_json::from_slice(line).map_err(|e| ParseError::Malformed {
                        encoding: "NDJSON",
                        reason: format!("line {}: {e}", n + 1),
                    })?;
                items.push(value);
            }
            items
        }
    };
    if items.is_empty() {
        return Err(ParseError::Empty);
    }
    if items.len() > limits.batch_items_max {
        return Err(ParseError::TooManyItems {
            count: items.len(),
            max: limits.batch_items_max,
        });
    }
    Ok(items)
}

fn into_items(value: Value, encoding: &'static str) -> Result<Vec<Value>, ParseError> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Object(_) => Ok(vec![value]),
        other => Err(ParseError::Malformed {
            encoding,
            reason: format!(
                "expected an object or an array of objects, found {}",
                kind_of(&other)
            ),
        }),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn name_field(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) if required => Err(format!("`{key}` is required")),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            check_name(key, s)?;
            Ok(Some(s.clone()))
        }
        Some(other) => Err(format!(
            "`{key}` must be a string, found {}",
            kind_of(other)
        )),
    }
}

/// The checks every `source`, `tenant` and `id` passes.
pub(super) fn check_name(key: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("`{key}` must not be empty"));
    }
    if s.len() > NAME_BYTES_MAX {
        return Err(format!(
            "`{key}` is {} bytes, over the limit of {NAME_BYTES_MAX}",
            s.len()
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("`{key}` must not contain control characters"));
    }
    Ok(())
}

/// `high`, `normal` or `low`.
pub(super) fn priority_of(s: &str) -> Option<Priority> {
    match s {
        "high" => Some(Priority::High),
        "normal" => Some(Priority::Normal),
        "low" => Some(Priority::Low),
        _ => None,
    }
}

/// The request's tenant once the token's is applied: the bound tenant fills in a missing one
/// and must equal a given one.
pub(super) fn bind_tenant(
    tenant: Option<String>,
    auth_tenant: Option<&str>,
) -> Result<Option<String>, String> {
    match (tenant, auth_tenant) {
        (Some(t), Some(bound)) if t != bound => Err(format!(
            "`tenant` is {t:?} but the token is bound to tenant {bound:?}"
        )),
        (None, Some(bound)) => Ok(Some(bound.to_string())),
        (tenant, _) => Ok(tenant),
    }
}

/// `meta` as sent: absent or null is empty, an object is taken as it is.
pub(super) fn meta_map(meta: Option<Value>) -> Result<BTreeMap<String, Value>, String> {
    match meta {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => Ok(m.into_iter().collect()),
        Some(other) => Err(format!(
            "`meta` must be an object, found {}",
            kind_of(&other)
        )),
    }
}

/// Refuses `meta` nested deeper than [`META_DEPTH_MAX`].
pub(super) fn check_meta_depth(meta: &BTreeMap<String, Value>) -> Result<(), String> {
    let levels = meta.values().map(depth).max().unwrap_or(0);
    if levels > META_DEPTH_MAX {
        return Err(format!(
            "`meta` nests {levels} levels deep, over the limit of {META_DEPTH_MAX}"
        ));
    }
    Ok(())
}

/// The fields of a valid item but its text, checked; `assemble` fills in the rest.
pub(super) struct Fields {
    pub source: String,
    pub id: Option<String>,
    pub tenant: Option<String>,
    pub ts_ms: u64,
    pub priority: Priority,
    pub meta: BTreeMap<String, Value>,
}

/// Builds the envelope of a checked item: the generated `id` when it has none (and whether it
/// was generated; stamped with `now_ms`, when the request was read), its stream's slot, the
/// envelope version.
pub(super) fn assemble(f: Fields, now_ms: u64) -> (NewEnvelope, bool) {
    let (id, id_generated) = match f.id {
        Some(id) => (id, false),
        None => (super::ids::generate(now_ms), true),
    };
    let slot = slot_of(f.tenant.as_deref().unwrap_or(&f.source));
    let envelope = NewEnvelope {
        id,
        slot,
        source: f.source,
        tenant: f.tenant,
        ts_ms: f.ts_ms,
        meta: f.meta,
        priority: f.priority,
    };
    (envelope, id_generated)
}

const KNOWN_FIELDS: &[&str] = &[
    "source", "text", "id", "tenant", "ts_ms", "priority", "meta",
];

/// Validates one item and turns it into an envelope with spoolgate's defaults filled in.
/// `auth_tenant` is the tenant bound to the request's token, if auth is on.
fn item_to_envelope(
    value: Value,
    unknown: UnknownFields,
    auth_tenant: Option<&str>,
    now_ms: u64,
) -> Result<Checked<'static>, String> {
    let Value::Object(mut obj) = value else {
        return Err(format!("must be an object, found {}", kind_of(&value)));
    };
    let source = name_field(&obj, "source", true)?.expect("required field present");
    let id = name_field(&obj, "id", false)?;
    let tenant = bind_tenant(name_field(&obj, "tenant", false)?, auth_tenant)?;
    // Taken out of the map rather than cloned: the text is most of an envelope's bytes.
    let text = match obj.remove("text") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            return Err(format!(
                "`text` must be a string, found {}",
                kind_of(&other)
            ))
        }
    };
    let ts_ms = match obj.get("ts_ms") {
        None | Some(Value::Null) => now_ms,
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
            format!("`ts_ms` must be a non-negative integer of milliseconds, found {n}")
        })?,
        Some(other) => {
            return Err(format!(
                "`ts_ms` must be an integer, found {}",
                kind_of(other)
            ))
        }
    };
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => Priority::Normal,
        Some(Value::String(s)) => priority_of(s)
            .ok_or_else(|| format!("`priority` must be one of high, normal, low; found {s:?}"))?,
        Some(other) => {
            return Err(format!(
                "`priority` must be a string, found {}",
                kind_of(other)
            ))
        }
    };
    let mut meta = meta_map(obj.remove("meta"))?;
    for (key, value) in obj {
        if KNOWN_FIELDS.contains(&key.as_str()) {
            continue;
        }
        match unknown {
            UnknownFields::Reject => return Err(format!("unknown field `{key}`")),
            UnknownFields::Meta => {
                if meta.contains_key(&key) {
                    return Err(format!("unknown field `{key}` collides with `meta.{key}`"));
                }
                meta.insert(key, value);
            }
        }
    }
    check_meta_depth(&meta)?;
    let (envelope, id_generated) = assemble(
        Fields {
            source,
            id,
            tenant,
            ts_ms,
            priority,
            meta,
        },
        now_ms,
    );
    Ok(Checked {
        envelope,
        id_generated,
        text: text.map(Cow::Owned),
    })
}

/// The `Value` road: every item's envelope (whether its id was generated, its text), or the refusal
/// of the first item or body fault found.
pub(super) fn value_envelopes(
    content_type: ContentType,
    body: &[u8],
    limits: &ParseLimits,
    auth_tenant: Option<&str>,
    now_ms: u64,
) -> Result<Vec<Checked<'static>>, ParseError> {
    let items = decode_items(content_type, body, limits)?;
    // Decoded into a `Value`, a NaN or infinite float has become null: its item is found in
    // the body, and refused in its turn, after the items before it were checked.
    let non_finite = match content_type {
        ContentType::Msgpack => crate::msgpack::first_non_finite_float(body),
        ContentType::Json | ContentType::NdJson => None,
    };
    let mut checked = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        if non_finite == Some(index) {
            return Err(non_finite_float(index));
        }
        checked.push(
            item_to_envelope(item, limits.unknown_fields, auth_tenant, now_ms)
                .map_err(|reason| ParseError::Item { index, reason })?,
        );
    }
    // Never accepted as null: an index past the items (which the walk that found it would
    // have to have miscounted) refuses the request all the same.
    if let Some(index) = non_finite {
        return Err(non_finite_float(index));
    }
    Ok(checked)
}

fn non_finite_float(index: usize) -> ParseError {
    ParseError::Item {
        index,
        reason: "holds a float that is NaN or infinite, which has no JSON form".into(),
    }
}

/// The `Value` road alone: each item's envelope, whether its id was generated, and its text.
/// For the fuzz target, whose oracle is that [`parse_request`], which takes the fast roads
/// where it can, builds the same envelopes and texts (ids it generated aside).
#[doc(hidden)]
pub fn value_road_envelopes(
    content_type: ContentType,
    body: &[u8],
    limits: &ParseLimits,
    auth_tenant: Option<&str>,
    now_ms: u64,
) -> Result<Vec<(NewEnvelope, bool, Option<String>)>, ParseError> {
    Ok(
        value_envelopes(content_type, body, limits, auth_tenant, now_ms)?
            .into_iter()
            .map(|c| (c.envelope, c.id_generated, c.text.map(Cow::into_owned)))
            .collect(),
    )
}

/// Whether a msgpack body holds a NaN or infinite float anywhere (JSON has no such numbers).
fn has_non_finite_float(content_type: ContentType, body: &[u8]) -> bool {
    content_type == ContentType::Msgpack && crate::msgpack::first_non_finite_float(body).is_some()
}

/// Decodes and validates a whole request. Either every envelope is valid or none is returned.
pub fn parse_request(
    content_type: ContentType,
    body: &[u8],
    limits: &ParseLimits,
    auth_tenant: Option<&str>,
    now_ms: u64,
) -> Result<Vec<Parsed>, ParseError> {
    let checked =
        match super::fast_parse::envelopes(content_type, body, limits, auth_tenant, now_ms) {
            // The fast roads would take a NaN or infinite float in `meta` for null, as the
            // `Value` road would, so a request holding one is refused by `value_envelopes`.
            Some(checked) if !has_non_finite_float(content_type, body) => checked,
            _ => value_envelopes(content_type, body, limits, auth_tenant, now_ms)?,
        };
    // Every envelope of the request is encoded into one buffer, and each record takes a slice
    // of it: one allocation per request instead of a vector and a `Bytes` header per envelope,
    // which showed as several percent of batch ingest's allocator time. The buffer lives until
    // the request's last record leaves the ring; records leave it in order.
    let mut all = Vec::with_capacity(
        checked
            .iter()
            .map(|c| c.envelope.encoded_len_hint() + c.text.as_ref().map_or(0, |t| t.len()))
            .sum::<usize>(),
    );
    let mut ends = Vec::with_capacity(checked.len());
    let mut stored_lens = Vec::with_capacity(checked.len());
    for (index, c) in checked.iter().enumerate() {
        let start = all.len();
        c.envelope
            .encode_with_text_into(c.text.as_deref(), &mut all)
            .map_err(|e| ParseError::Item {
                index,
                reason: e.to_string(),
            })?;
        // As stored in the spool (each byte 0xF7, which only numbers or binary values in
        // `meta` produce, takes two; spool-format.md §3): the bound leaves room under
        // spool.record_bytes_max for the sealed form, and must hold for the stored length.
        let len = crate::spool::format::stored_len(&all[start..]);
        if len as u64 > limits.envelope_bytes_max {
            return Err(ParseError::ItemTooLarge {
                index,
                len,
                max: limits.envelope_bytes_max,
            });
        }
        ends.push(all.len());
        stored_lens.push(len);
    }
    let all = Bytes::from(all);
    let mut out = Vec::with_capacity(checked.len());
    let mut start = 0;
    for ((c, end), stored_len) in checked.into_iter().zip(ends).zip(stored_lens) {
        out.push(Parsed {
            envelope: c.envelope,
            encoded: all.slice(start..end),
            stored_len,
            id_generated: c.id_generated,
        });
        start = end;
    }
    let mut seen = std::collections::HashSet::with_capacity(out.len());
    for (index, p) in out.iter().enumerate() {
        if !seen.insert(p.envelope.id.as_str()) {
            return Err(ParseError::Item {
                index,
                reason: format!("`id` {:?} appears twice in this request", p.envelope.id),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, ENVELOPE_VERSION};

    const LIMITS: ParseLimits = ParseLimits {
        batch_items_max: 100,
        envelope_bytes_max: 4096,
        unknown_fields: UnknownFields::Meta,
    };

    fn json(body: &str) -> Result<Vec<Parsed>, ParseError> {
        parse_request(ContentType::Json, body.as_bytes(), &LIMITS, None, 1000)
    }

    #[test]
    fn a_single_object_is_a_batch_of_one_with_defaults_filled() {
        let p = json(r#"{"source":"svc","text":"hi"}"#).unwrap();
        assert_eq!(p.len(), 1);
        let e = &p[0].envelope;
        assert_eq!(e.source, "svc");
        assert_eq!(e.ts_ms, 1000);
        assert_eq!(e.slot, slot_of("svc"));
        assert_eq!(e.id.len(), 36, "generated ids are UUIDv7 strings");
        // The text is in the encoding only.
        let decoded = Envelope::decode(&p[0].encoded).unwrap();
        assert_eq!(decoded.version, ENVELOPE_VERSION);
        assert_eq!(decoded, e.clone().into_envelope(Some("hi".into())));
    }

    /// A msgpack batch of items, each a map of `source` and one more field.
    fn msgpack_batch(items: &[(&str, &[u8])]) -> Vec<u8> {
        let mut body = vec![0x90 | items.len() as u8];
        for (key, value) in items {
            body.extend(b"\x82\xa6source\xa1s");
            body.push(0xa0 | key.len() as u8);
            body.extend(key.as_bytes());
            body.extend(*value);
        }
        body
    }

    #[test]
    fn a_non_finite_float_is_refused_in_its_turn_after_the_batch_size_and_earlier_items() {
        let mut nan = vec![0xcb];
        nan.extend(f64::NAN.to_bits().to_be_bytes());
        let msgpack = |body: &[u8], limits: &ParseLimits| {
            parse_request(ContentType::Msgpack, body, limits, None, 1000).unwrap_err()
        };
        // Where the float is, not only in `meta`: a `ts_ms` of NaN is refused, not dropped.
        let e = msgpack(&msgpack_batch(&[("ts_ms", &nan)]), &LIMITS);
        assert_eq!((e.code(), e.index()), ("invalid_envelope", Some(0)));
        assert!(e.to_string().contains("NaN or infinite"), "{e}");
        // An invalid item before it is named first.
        let e = msgpack(
            &msgpack_batch(&[
                ("priority", b"\xa4huge"),
                ("text", b"\xa1x"),
                ("meta", &nan),
            ]),
            &LIMITS,
        );
        assert_eq!(e.index(), Some(0), "{e}");
        assert!(e.to_string().contains("priority"), "{e}");
        // A batch over the limit is refused as such.
        let two = ParseLimits {
            batch_items_max: 2,
            ..LIMITS
        };
        let e = msgpack(
            &msgpack_batch(&[("text", b"\xa1x"), ("text", b"\xa1y"), ("meta", &nan)]),
            &two,
        );
        assert_eq!(e.code(), "too_many_envelopes", "{e}");
    }

    #[test]
    fn the_error_names_the_index_of_the_bad_item() {
        let mut items: Vec<String> = (0..60)
            .map(|i| format!(r#"{{"source":"s","id":"{i}"}}"#))
            .collect();
        items[57] = r#"{"source":"s","ts_ms":"yesterday"}"#.into();
        let err = json(&format!("[{}]", items.join(","))).unwrap_err();
        assert_eq!(err.index(), Some(57));
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("ts_ms"), "{err}");
    }

    #[test]
    fn missing_source_is_refused() {
        let err = json(r#"{"text":"x"}"#).unwrap_err();
        assert_eq!(err.to_string(), "envelope at index 0: `source` is required");
    }

    #[test]
    fn ndjson_lines_are_items_and_blank_lines_are_skipped() {
        let body = "{\"source\":\"a\"}\n\n{\"source\":\"b\"}\r\n";
        let p = parse_request(ContentType::NdJson, body.as_bytes(), &LIMITS, None, 1).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].envelope.source, "b");
    }

    #[test]
    fn msgpack_maps_and_arrays_parse() {
        let one =
            rmp_serde::to_vec_named(&serde_json::json!({"source":"m","priority":"low"})).unwrap();
        let p = parse_request(ContentType::Msgpack, &one, &LIMITS, None, 1).unwrap();
        assert_eq!(p[0].envelope.priority, Priority::Low);
        let many =
            rmp_serde::to_vec_named(&serde_json::json!([{"source":"m"},{"source":"n"}])).unwrap();
        assert_eq!(
            parse_request(ContentType::Msgpack, &many, &LIMITS, None, 1)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn truncated_msgpack_is_malformed() {
        let mut one = rmp_serde::to_vec_named(&serde_json::json!({"source":"m"})).unwrap();
        one.pop();
        let err = parse_request(ContentType::Msgpack, &one, &LIMITS, None, 1).unwrap_err();
        assert_eq!(err.code(), "malformed_body");
    }

    #[test]
    fn unknown_fields_go_to_meta_or_are_rejected() {
        let p = json(r#"{"source":"s","color":"red"}"#).unwrap();
        assert_eq!(
            p[0].envelope.meta.get("color"),
            Some(&Value::String("red".into()))
        );
        let strict = ParseLimits {
            unknown_fields: UnknownFields::Reject,
            ..LIMITS
        };
        let err = parse_request(
            ContentType::Json,
            br#"{"source":"s","color":"red"}"#,
            &strict,
            None,
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `color`"));
    }

    #[test]
    fn a_token_bound_tenant_is_applied_and_a_different_one_refused() {
        let p = parse_request(
            ContentType::Json,
            br#"{"source":"s"}"#,
            &LIMITS,
            Some("acme"),
            1,
        )
        .unwrap();
        assert_eq!(p[0].envelope.tenant.as_deref(), Some("acme"));
        let err = parse_request(
            ContentType::Json,
            br#"{"source":"s","tenant":"evil"}"#,
            &LIMITS,
            Some("acme"),
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bound to tenant"), "{err}");
    }

    #[test]
    fn oversized_items_and_batches_are_413() {
        let big = format!(r#"{{"source":"s","text":"{}"}}"#, "x".repeat(5000));
        assert_eq!(json(&big).unwrap_err().status(), 413);
        let many = format!("[{}]", vec![r#"{"source":"s"}"#; 101].join(","));
        assert_eq!(json(&many).unwrap_err().status(), 413);
    }

    #[test]
    fn negative_and_fractional_timestamps_are_refused() {
        assert!(json(r#"{"source":"s","ts_ms":-1}"#).is_err());
        assert!(json(r#"{"source":"s","ts_ms":1.5}"#).is_err());
    }

    #[test]
    fn duplicate_ids_within_one_request_are_refused() {
        let err = json(r#"[{"source":"s","id":"a"},{"source":"s","id":"a"}]"#).unwrap_err();
        assert_eq!(err.index(), Some(1));
    }

    #[test]
    fn deep_meta_is_refused() {
        let deep = format!(
            r#"{{"source":"s","meta":{{"k":{}1{}}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(json(&deep).unwrap_err().to_string().contains("nests"));
    }

    #[test]
    fn content_types_parse_with_parameters() {
        assert_eq!(
            ContentType::parse("application/json; charset=utf-8"),
            Some(ContentType::Json)
        );
        assert_eq!(ContentType::parse("text/plain"), None);
    }
}
