//! Envelope v1: the unit of data spoolgate accepts, spools, classifies and forwards.
//!
//! On disk an envelope is a msgpack **map with string keys** (rmp-serde's `to_vec_named`).
//! Maps with named keys cost a few bytes per field over positional arrays, but they let a Go or
//! Python reader decode envelopes with a stock msgpack library, and they let later versions add
//! fields: readers ignore keys they do not know, and every field added after v1 must default when
//! absent. Optional fields that are empty are omitted rather than written as nil, which keeps the
//! encoding canonical (one envelope has exactly one byte string) — the hash chain relies on that.
//!
//! `meta` holds arbitrary client data as JSON values. It is a `BTreeMap`, so its keys are always
//! encoded in sorted order; that is what makes the canonical bytes deterministic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod decode;

/// The envelope format version written by this build.
pub const ENVELOPE_VERSION: u32 = 1;

/// Ingest priority lane. Low-priority traffic is the first to be refused under backpressure.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// Envelope v1. Fields set by the client at ingest: `id`, `source`, `tenant`, `text`, `ts_ms`,
/// `priority`, `meta`. Fields set by spoolgate at ingest: `version`, `slot`, and `id`/`ts_ms`
/// when the client left them out. Fields set by the gate: `text_hash`, `char_len`, `pii`,
/// `tags`, `intent_hint`, `routing_hints`, `summary_extractive` (and `text` when a PII policy
/// masks or drops it). `embed_preview` and `embed_ref` are reserved for an embedding stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Envelope {
    pub version: u32,
    pub id: String,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub char_len: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pii: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent_hint: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routing_hints: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_extractive: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_preview: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_ref: Option<String>,
    pub ts_ms: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, serde_json::Value>,
    pub slot: u16,
    #[serde(default)]
    pub priority: Priority,
}

/// Why envelope bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not valid msgpack v1: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("envelope could not be encoded: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

impl Envelope {
    /// The stream this envelope is chained in: its tenant, or its source when it has none.
    pub fn stream(&self) -> &str {
        self.tenant.as_deref().unwrap_or(&self.source)
    }

    /// Canonical msgpack encoding (named map, sorted `meta`, empty optionals omitted).
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        // Sized up front: an empty Vec grows by doubling, which copied a 1 KiB text about
        // twice more and showed as a few percent of the forwarding CPU in profiles.
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// The canonical encoding written field by field with rmp's primitives, byte for byte
    /// what `rmp_serde::encode::write_named` writes for this struct (the test below compares
    /// the two on generated envelopes, so they cannot drift apart). Going through serde's
    /// struct serializer cost about twice as much, and the envelope is encoded twice per
    /// record end to end (at ingest and for the chain link). Only `meta` values and
    /// `embed_preview`, rare and of open shape, are still handed to rmp-serde. A field added to
    /// `Envelope` must be added to [`Fields`], in the same order and with the same omission
    /// rule.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        Fields {
            version: self.version,
            id: &self.id,
            source: &self.source,
            tenant: self.tenant.as_deref(),
            text: self.text.as_deref(),
            text_hash: self.text_hash.as_deref(),
            char_len: self.char_len,
            pii: &self.pii,
            tags: &self.tags,
            intent_hint: self.intent_hint.as_deref(),
            routing_hints: &self.routing_hints,
            summary_extractive: self.summary_extractive.as_deref(),
            embed_preview: self.embed_preview.as_deref(),
            embed_ref: self.embed_ref.as_deref(),
            ts_ms: self.ts_ms,
            meta: &self.meta,
            slot: self.slot,
            priority: self.priority,
        }
        .encode_into(out)
    }

    /// About the encoded size: the variable-length strings plus room for keys and numbers.
    /// Only a capacity hint; `meta` is counted by its key lengths alone.
    pub(crate) fn encoded_len_hint(&self) -> usize {
        const FIXED_BYTES: usize = 192;
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        FIXED_BYTES
            + self.id.len()
            + self.source.len()
            + opt(&self.tenant)
            + opt(&self.text)
            + opt(&self.text_hash)
            + opt(&self.intent_hint)
            + opt(&self.summary_extractive)
            + opt(&self.embed_ref)
            + self.tags.iter().map(|t| t.len() + 1).sum::<usize>()
            + self.pii.keys().map(|k| k.len() + 10).sum::<usize>()
            + self
                .routing_hints
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
            + self.meta.keys().map(|k| k.len() + 16).sum::<usize>()
            + self.embed_preview.as_ref().map_or(0, |v| v.len() * 5)
    }

    /// Decodes envelope bytes: directly when they are in the subset spoolgate writes (see
    /// `envelope/decode.rs`), through rmp-serde otherwise, with the same result either way.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if let Some(env) = decode::decode(bytes) {
            return Ok(env);
        }
        Ok(rmp_serde::from_slice(bytes)?)
    }

    /// [`Envelope::decode`] for readers that need everything but the text (the start-up
    /// scan): the same bytes decode or fail alike, but the text, most of an envelope, is only
    /// checked, not copied, and comes back as `None`. (An envelope outside the direct
    /// decoder's subset is decoded whole, text included.)
    pub fn decode_without_text(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        if let Some(env) = decode::decode_with(bytes, false) {
            return Ok(env);
        }
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// An envelope as ingest builds it, before the gate: the fields a client sets and those
/// spoolgate fills in at ingest (`version` is always [`ENVELOPE_VERSION`]), without the text,
/// which ingest keeps borrowed from the request body until it encodes it. Ingest moves a
/// request's envelopes several times between decoding and the spool; at about a third of an
/// [`Envelope`]'s size (whose gate fields are all empty then), those moves cost a third.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewEnvelope {
    pub id: String,
    pub source: String,
    pub tenant: Option<String>,
    pub ts_ms: u64,
    pub meta: BTreeMap<String, serde_json::Value>,
    pub slot: u16,
    pub priority: Priority,
}

impl NewEnvelope {
    /// The stream this envelope is chained in, as [`Envelope::stream`].
    pub fn stream(&self) -> &str {
        self.tenant.as_deref().unwrap_or(&self.source)
    }

    /// The bytes [`Envelope::encode`] gives for this envelope with `text` as its text.
    pub fn encode_with_text_into(
        &self,
        text: Option<&str>,
        out: &mut Vec<u8>,
    ) -> Result<(), EnvelopeError> {
        let (pii, routing_hints) = (BTreeMap::new(), BTreeMap::new());
        Fields {
            version: ENVELOPE_VERSION,
            id: &self.id,
            source: &self.source,
            tenant: self.tenant.as_deref(),
            text,
            text_hash: None,
            char_len: None,
            pii: &pii,
            tags: &[],
            intent_hint: None,
            routing_hints: &routing_hints,
            summary_extractive: None,
            embed_preview: None,
            embed_ref: None,
            ts_ms: self.ts_ms,
            meta: &self.meta,
            slot: self.slot,
            priority: self.priority,
        }
        .encode_into(out)
    }

    /// About the encoded size, as [`Envelope`]'s hint counts it, the text left out.
    pub fn encoded_len_hint(&self) -> usize {
        const FIXED_BYTES: usize = 192;
        FIXED_BYTES
            + self.id.len()
            + self.source.len()
            + self.tenant.as_ref().map_or(0, String::len)
            + self.meta.keys().map(|k| k.len() + 16).sum::<usize>()
    }

    /// The [`Envelope`] this is, with `text`.
    pub fn into_envelope(self, text: Option<String>) -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            id: self.id,
            source: self.source,
            tenant: self.tenant,
            text,
            ts_ms: self.ts_ms,
            meta: self.meta,
            slot: self.slot,
            priority: self.priority,
            ..Default::default()
        }
    }
}

/// An envelope's fields, borrowed, in the order of its canonical encoding: what both
/// [`Envelope`] and [`NewEnvelope`] are encoded from, so that they cannot differ.
struct Fields<'a> {
    version: u32,
    id: &'a str,
    source: &'a str,
    tenant: Option<&'a str>,
    text: Option<&'a str>,
    text_hash: Option<&'a str>,
    char_len: Option<u64>,
    pii: &'a BTreeMap<String, u64>,
    tags: &'a [String],
    intent_hint: Option<&'a str>,
    routing_hints: &'a BTreeMap<String, String>,
    summary_extractive: Option<&'a str>,
    embed_preview: Option<&'a [f32]>,
    embed_ref: Option<&'a str>,
    ts_ms: u64,
    meta: &'a BTreeMap<String, serde_json::Value>,
    slot: u16,
    priority: Priority,
}

impl Fields<'_> {
    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        let key = put_str;
        fn str_field(out: &mut Vec<u8>, name: &str, value: &str) {
            put_str(out, name);
            put_str(out, value);
        }
        fn uint_field(out: &mut Vec<u8>, name: &str, value: u64) {
            put_str(out, name);
            put_uint(out, value);
        }
        let present = |b: bool| u32::from(b);
        // version, id, source, ts_ms, slot and priority are always written.
        let fields = 6
            + present(self.tenant.is_some())
            + present(self.text.is_some())
            + present(self.text_hash.is_some())
            + present(self.char_len.is_some())
            + present(!self.pii.is_empty())
            + present(!self.tags.is_empty())
            + present(self.intent_hint.is_some())
            + present(!self.routing_hints.is_empty())
            + present(self.summary_extractive.is_some())
            + present(self.embed_preview.is_some())
            + present(self.embed_ref.is_some())
            + present(!self.meta.is_empty());
        let _ = rmp::encode::write_map_len(out, fields);
        uint_field(out, "version", u64::from(self.version));
        str_field(out, "id", self.id);
        str_field(out, "source", self.source);
        if let Some(v) = self.tenant {
            str_field(out, "tenant", v);
        }
        if let Some(v) = self.text {
            str_field(out, "text", v);
        }
        if let Some(v) = self.text_hash {
            str_field(out, "text_hash", v);
        }
        if let Some(v) = self.char_len {
            uint_field(out, "char_len", v);
        }
        if !self.pii.is_empty() {
            key(out, "pii");
            let _ = rmp::encode::write_map_len(out, map_len(self.pii.len())?);
            for (k, v) in self.pii {
                uint_field(out, k, *v);
            }
        }
        if !self.tags.is_empty() {
            key(out, "tags");
            let _ = rmp::encode::write_array_len(out, map_len(self.tags.len())?);
            for t in self.tags {
                put_str(out, t);
            }
        }
        if let Some(v) = self.intent_hint {
            str_field(out, "intent_hint", v);
        }
        if !self.routing_hints.is_empty() {
            key(out, "routing_hints");
            let _ = rmp::encode::write_map_len(out, map_len(self.routing_hints.len())?);
            for (k, v) in self.routing_hints {
                str_field(out, k, v);
            }
        }
        if let Some(v) = self.summary_extractive {
            str_field(out, "summary_extractive", v);
        }
        if let Some(v) = self.embed_preview {
            key(out, "embed_preview");
            rmp_serde::encode::write_named(out, v)?;
        }
        if let Some(v) = self.embed_ref {
            str_field(out, "embed_ref", v);
        }
        uint_field(out, "ts_ms", self.ts_ms);
        if !self.meta.is_empty() {
            key(out, "meta");
            let _ = rmp::encode::write_map_len(out, map_len(self.meta.len())?);
            for (k, v) in self.meta {
                key(out, k);
                rmp_serde::encode::write_named(out, v)?;
            }
        }
        uint_field(out, "slot", u64::from(self.slot));
        str_field(out, "priority", self.priority.as_str());
        Ok(())
    }
}

/// A msgpack str, in its smallest form. Writing into a Vec cannot fail; rmp's error type
/// exists for other writers. Shared with the chain's seal entries and canonical head.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    let _ = rmp::encode::write_str(out, s);
}

/// A msgpack uint, in the smallest encoding for its value.
pub(crate) fn put_uint(out: &mut Vec<u8>, n: u64) {
    let _ = rmp::encode::write_uint(out, n);
}

/// A collection length as msgpack's 32-bit length, as rmp-serde refuses longer ones.
fn map_len(len: usize) -> Result<u32, EnvelopeError> {
    u32::try_from(len).map_err(|_| {
        EnvelopeError::Encode(rmp_serde::encode::Error::Syntax(format!(
            "a collection of {len} items is longer than msgpack allows"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_omits_empty_fields() {
        let env = Envelope {
            version: ENVELOPE_VERSION,
            id: "a".into(),
            source: "s".into(),
            ts_ms: 7,
            slot: 3,
            ..Default::default()
        };
        let bytes = env.encode().unwrap();
        assert_eq!(Envelope::decode(&bytes).unwrap(), env);
        // Five keys only: version, id, source, ts_ms, slot, priority.
        assert_eq!(bytes[0], 0x80 | 6);
    }

    /// What rmp-serde writes for the struct: the oracle `encode` must match byte for byte.
    fn serde_bytes(env: &Envelope) -> Vec<u8> {
        rmp_serde::to_vec_named(env).unwrap()
    }

    fn full_envelope() -> Envelope {
        let meta = serde_json::json!({
            "b": {"nested": [1, -2, 3.5, null, true, "x"], "big": u64::MAX},
            "a": -9_007_199_254_740_993i64,
            "c": "é",
            "d": 0.1,
        });
        Envelope {
            version: 70_000,
            id: "01a2".into(),
            source: "svc".into(),
            tenant: Some("acme".into()),
            text: Some("x".repeat(300)),
            text_hash: Some("ab".repeat(32)),
            char_len: Some(300),
            pii: [("email".to_string(), 2), ("phone".to_string(), 70_000)].into(),
            tags: vec!["billing".into(), String::new(), "é".repeat(40)],
            intent_hint: Some("refund".into()),
            routing_hints: [("lane".to_string(), "high".to_string())].into(),
            summary_extractive: Some("S".repeat(70_000)),
            embed_preview: Some(vec![0.5, -1.25, f32::MAX]),
            embed_ref: Some("ref".into()),
            ts_ms: u64::MAX,
            meta: serde_json::from_value(meta).unwrap(),
            slot: 1023,
            priority: Priority::Low,
        }
    }

    #[test]
    fn the_hand_written_encoding_is_rmp_serdes_with_every_field_present_or_absent() {
        let full = full_envelope();
        assert_eq!(full.encode().unwrap(), serde_bytes(&full));
        let minimal = Envelope {
            version: 1,
            id: "a".into(),
            source: "s".into(),
            ..Default::default()
        };
        assert_eq!(minimal.encode().unwrap(), serde_bytes(&minimal));
        // Each optional field alone, so a wrong field count or a wrong omission rule for any
        // one of them shows.
        let alone: Vec<fn(&mut Envelope, &Envelope)> = vec![
            |e, f| e.tenant = f.tenant.clone(),
            |e, f| e.text = f.text.clone(),
            |e, f| e.text_hash = f.text_hash.clone(),
            |e, f| e.char_len = f.char_len,
            |e, f| e.pii = f.pii.clone(),
            |e, f| e.tags = f.tags.clone(),
            |e, f| e.intent_hint = f.intent_hint.clone(),
            |e, f| e.routing_hints = f.routing_hints.clone(),
            |e, f| e.summary_extractive = f.summary_extractive.clone(),
            |e, f| e.embed_preview = f.embed_preview.clone(),
            |e, f| e.embed_ref = f.embed_ref.clone(),
            |e, f| e.meta = f.meta.clone(),
            |e, _| e.priority = Priority::High,
        ];
        for (i, set) in alone.iter().enumerate() {
            let mut env = minimal.clone();
            set(&mut env, &full);
            assert_eq!(env.encode().unwrap(), serde_bytes(&env), "field {i} alone");
        }
    }

    proptest::proptest! {
        #[test]
        fn generated_envelopes_encode_as_rmp_serde_does(
            version in proptest::prelude::any::<u32>(),
            id in ".{0,40}",
            text in proptest::option::of(".{0,300}"),
            tenant in proptest::option::of("[a-z]{0,40}"),
            char_len in proptest::option::of(proptest::prelude::any::<u64>()),
            pii in proptest::collection::btree_map("[a-z_]{1,12}", proptest::prelude::any::<u64>(), 0..4),
            tags in proptest::collection::vec(".{0,20}", 0..20),
            ts_ms in proptest::prelude::any::<u64>(),
            slot in 0u16..1024,
            meta in proptest::collection::btree_map(".{0,8}", proptest::prelude::any::<i64>(), 0..3),
        ) {
            let env = Envelope {
                version,
                id,
                source: "s".into(),
                tenant,
                text,
                char_len,
                pii,
                tags,
                ts_ms,
                slot,
                meta: meta.into_iter().map(|(k, v)| (k, serde_json::Value::from(v))).collect(),
                ..Default::default()
            };
            let bytes = env.encode().unwrap();
            proptest::prop_assert_eq!(&bytes, &serde_bytes(&env));
            // Ingest's encoding of the same fields, with the text kept apart, gives the bytes
            // of the envelope with those fields (the gate's are empty at ingest).
            let new = NewEnvelope {
                id: env.id.clone(),
                source: env.source.clone(),
                tenant: env.tenant.clone(),
                ts_ms: env.ts_ms,
                meta: env.meta.clone(),
                slot: env.slot,
                priority: env.priority,
            };
            let mut with_text = Vec::new();
            new.encode_with_text_into(env.text.as_deref(), &mut with_text).unwrap();
            let expected = Envelope {
                version: ENVELOPE_VERSION,
                char_len: None,
                pii: BTreeMap::new(),
                tags: Vec::new(),
                ..env.clone()
            };
            proptest::prop_assert_eq!(&with_text, &expected.encode().unwrap());
            proptest::prop_assert_eq!(new.into_envelope(env.text.clone()), expected);
            proptest::prop_assert_eq!(Envelope::decode(&bytes).unwrap(), env);
        }
    }

    /// spool-format.md §5 on `meta` values, byte for byte: a reader in another language
    /// recomputes chain hashes from them.
    #[test]
    fn meta_values_take_the_encodings_spool_format_names() {
        let meta = serde_json::json!({"m": {"t": true, "s": "x", "n": null, "l": [1],
                                            "f": 0.5, "b": 1, "a": -200}});
        let env = Envelope {
            meta: serde_json::from_value(meta).unwrap(),
            ..Default::default()
        };
        let bytes = env.encode().unwrap();
        let expected: &[u8] = &[
            0xa4, b'm', b'e', b't', b'a', 0x81, 0xa1, b'm', 0x87, // "meta": {"m": {7 keys
            0xa1, b'a', 0xd1, 0xff, 0x38, // "a": int16 -200
            0xa1, b'b', 0x01, // "b": positive fixint 1
            0xa1, b'f', 0xcb, 0x3f, 0xe0, 0, 0, 0, 0, 0, 0, // "f": float64 0.5
            0xa1, b'l', 0x91, 0x01, // "l": [1]
            0xa1, b'n', 0xc0, // "n": nil
            0xa1, b's', 0xa1, b'x', // "s": "x"
            0xa1, b't', 0xc3, // "t": true
        ];
        assert!(
            bytes.windows(expected.len()).any(|w| w == expected),
            "{bytes:02x?}"
        );
    }

    #[test]
    fn readers_ignore_fields_they_do_not_know() {
        #[derive(Serialize)]
        struct Future<'a> {
            version: u32,
            id: &'a str,
            source: &'a str,
            ts_ms: u64,
            slot: u16,
            shiny_new_field: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&Future {
            version: 2,
            id: "x",
            source: "s",
            ts_ms: 1,
            slot: 0,
            shiny_new_field: "ignored",
        })
        .unwrap();
        let env = Envelope::decode(&bytes).unwrap();
        assert_eq!(env.id, "x");
        assert_eq!(env.priority, Priority::Normal);
    }

    #[test]
    fn stream_is_tenant_then_source() {
        let mut env = Envelope {
            source: "svc".into(),
            ..Default::default()
        };
        assert_eq!(env.stream(), "svc");
        env.tenant = Some("acme".into());
        assert_eq!(env.stream(), "acme");
    }
}
