//! JSON for forward records, byte for byte what `serde_json::to_writer` writes for a
//! [`ForwardRecord`], only faster where it matters: strings.
//!
//! serde_json escapes a string one byte at a time. A forwarded record is mostly strings (the
//! text, its summary, hashes, ids), and in end-to-end profiles that loop was the largest single
//! item (8% of the daemon's CPU at a steady 45k env/s, 1 KiB texts). Here strings are scanned
//! eight bytes at a time for the bytes JSON must escape (`"`, `\` and controls below 0x20)
//! and copied in runs; the escapes themselves are serde_json's (`\"`, `\\`, `\b`, `\f`, `\n`,
//! `\r`, `\t`, else `\u00xx` in lowercase hex). Numbers are written as serde_json writes them
//! (decimal integers), and the rare parts (client `meta` values, `embed_preview` floats) are
//! handed to serde_json itself. The tests compare the output with serde_json's for every
//! byte value and for records with every optional field present and absent, so the two cannot
//! drift apart; the file sink's lines are part of the contract (spool-format.md §8). A field
//! added to `Envelope` must be added here and set in that test's full record.

use crate::chain::ForwardRecord;
use crate::envelope::Envelope;

/// Appends `record` as one compact JSON object (no newline).
pub fn write_record(out: &mut Vec<u8>, record: &ForwardRecord) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"stream\":");
    write_str(out, &record.stream);
    out.extend_from_slice(b",\"seq\":");
    write_u64(out, record.seq);
    out.extend_from_slice(b",\"prev_hash\":");
    write_str(out, &record.prev_hash);
    out.extend_from_slice(b",\"hash\":");
    write_str(out, &record.hash);
    out.extend_from_slice(b",\"slot\":");
    write_u64(out, u64::from(record.slot));
    out.extend_from_slice(b",\"envelope\":");
    write_envelope(out, &record.envelope)?;
    out.push(b'}');
    Ok(())
}

/// Appends `records` as one JSON array, as `serde_json::to_vec` of the slice would.
pub fn write_records<R: AsRef<ForwardRecord>>(
    out: &mut Vec<u8>,
    records: &[R],
) -> Result<(), serde_json::Error> {
    out.push(b'[');
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_record(out, r.as_ref())?;
    }
    out.push(b']');
    Ok(())
}

/// The envelope's fields in declaration order, with the same omissions as its serde derive.
fn write_envelope(out: &mut Vec<u8>, e: &Envelope) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"version\":");
    write_u64(out, u64::from(e.version));
    field_str(out, "id", &e.id);
    field_str(out, "source", &e.source);
    if let Some(v) = &e.tenant {
        field_str(out, "tenant", v);
    }
    if let Some(v) = &e.text {
        field_str(out, "text", v);
    }
    if let Some(v) = &e.text_hash {
        field_str(out, "text_hash", v);
    }
    if let Some(v) = e.char_len {
        key(out, "char_len");
        write_u64(out, v);
    }
    if !e.pii.is_empty() {
        key(out, "pii");
        write_map(out, &e.pii, |out, v| {
            write_u64(out, *v);
            Ok(())
        })?;
    }
    if !e.tags.is_empty() {
        key(out, "tags");
        out.push(b'[');
        for (i, t) in e.tags.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, t);
        }
        out.push(b']');
    }
    if let Some(v) = &e.intent_hint {
        field_str(out, "intent_hint", v);
    }
    if !e.routing_hints.is_empty() {
        key(out, "routing_hints");
        write_map(out, &e.routing_hints, |out, v| {
            write_str(out, v);
            Ok(())
        })?;
    }
    if let Some(v) = &e.summary_extractive {
        field_str(out, "summary_extractive", v);
    }
    if let Some(v) = &e.embed_preview {
        key(out, "embed_preview");
        serde_json::to_writer(&mut *out, v)?;
    }
    if let Some(v) = &e.embed_ref {
        field_str(out, "embed_ref", v);
    }
    key(out, "ts_ms");
    write_u64(out, e.ts_ms);
    if !e.meta.is_empty() {
        key(out, "meta");
        write_map(out, &e.meta, |out, v| serde_json::to_writer(out, v))?;
    }
    key(out, "slot");
    write_u64(out, u64::from(e.slot));
    field_str(out, "priority", e.priority.as_str());
    out.push(b'}');
    Ok(())
}

/// A JSON object from a map with string keys (in the map's order, as serde_json writes it).
fn write_map<V>(
    out: &mut Vec<u8>,
    map: &std::collections::BTreeMap<String, V>,
    mut value: impl FnMut(&mut Vec<u8>, &V) -> Result<(), serde_json::Error>,
) -> Result<(), serde_json::Error> {
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        value(out, v)?;
    }
    out.push(b'}');
    Ok(())
}

/// `,"name":` (every envelope field after the first).
fn key(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn field_str(out: &mut Vec<u8>, name: &str, value: &str) {
    key(out, name);
    write_str(out, value);
}

/// Appends `v` in decimal. By hand rather than through `write!`, whose formatting machinery
/// showed as ~1% of batch ingest (three numbers per envelope in the 202 body).
pub(crate) fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    // u64::MAX has 20 digits.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Non-zero when any byte of `w` is below 0x20, or is `"` or `\`. Bytes of 0x80 and above
/// (UTF-8 continuation and lead bytes) never count: the subtractions only borrow into a byte's
/// high bit for bytes below the bound, and `!w` clears the high bit of bytes already >= 0x80.
fn needs_escape(w: u64) -> u64 {
    let below_space = w.wrapping_sub(LOW_BITS * 0x20);
    let quote = w ^ (LOW_BITS * u64::from(b'"'));
    let backslash = w ^ (LOW_BITS * u64::from(b'\\'));
    (below_space | quote.wrapping_sub(LOW_BITS) | backslash.wrapping_sub(LOW_BITS)) & !w & HIGH_BITS
}

/// Appends `s` as a JSON string, quotes included.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run_start = 0;
    let mut i = 0;
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    while i < bytes.len() {
        // Four words per test while nothing needs escaping (most text): one branch per 32
        // bytes instead of per 8.
        if i + 32 <= bytes.len() {
            let any = needs_escape(word(i))
                | needs_escape(word(i + 8))
                | needs_escape(word(i + 16))
                | needs_escape(word(i + 24));
            if any == 0 {
                i += 32;
                continue;
            }
        }
        if i + 8 <= bytes.len() {
            let w = word(i);
            if needs_escape(w) == 0 {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => &[],
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[run_start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.extend_from_slice(escape);
        }
        i += 1;
        run_start = i;
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Priority;
    use std::collections::BTreeMap;

    fn serde_str(s: &str) -> Vec<u8> {
        serde_json::to_vec(s).unwrap()
    }

    fn fast_str(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        write_str(&mut out, s);
        out
    }

    #[test]
    fn numbers_are_written_as_display_writes_them() {
        let mut k = 0x9e37_79b9_7f4a_7c15u64;
        let mut values = vec![0, 1, 9, 10, 99, 100, u64::MAX, u64::MAX - 1, 1 << 63];
        for _ in 0..1000 {
            k = k
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            values.push(k >> (k % 64));
        }
        for v in values {
            let mut out = b"x".to_vec();
            write_u64(&mut out, v);
            assert_eq!(out, format!("x{v}").into_bytes());
        }
    }

    #[test]
    fn every_character_below_0x80_and_some_beyond_escape_as_serde_json_does() {
        for c in (0u32..0x80).chain([0xa0, 0xe9, 0x2028, 0xfeff, 0x1f600]) {
            let c = char::from_u32(c).unwrap();
            // Alone, and at every position of a 32-byte block and of its words, so both scans
            // see it everywhere.
            for at in 0..66 {
                let mut s: String = "abcdefghijklmnopqrstuvwxyz0123456789"
                    .chars()
                    .cycle()
                    .take(at)
                    .collect();
                s.push(c);
                s.push_str("tail-of-text-long-enough-for-another-block");
                assert_eq!(fast_str(&s), serde_str(&s), "{c:?} at {at}");
            }
        }
    }

    #[test]
    fn mixed_text_escapes_as_serde_json_does() {
        let texts = [
            "",
            "plain ascii text that is longer than one word",
            "line one\nline two\r\n\ttabbed \"quoted\" back\\slash",
            "naïve café – “smart quotes” 😀 and \u{1} \u{1f} \u{7f}",
            "\"\"\"\"\"\"\"\"\\\\\\\\\\\\\\\\",
        ];
        for t in texts {
            assert_eq!(fast_str(t), serde_str(t), "{t:?}");
        }
    }

    fn record(full: bool) -> ForwardRecord {
        let mut e = Envelope {
            version: 1,
            id: "id-1".into(),
            source: "svc".into(),
            tenant: None,
            text: None,
            text_hash: None,
            char_len: None,
            pii: BTreeMap::new(),
            tags: Vec::new(),
            intent_hint: None,
            routing_hints: BTreeMap::new(),
            summary_extractive: None,
            embed_preview: None,
            embed_ref: None,
            ts_ms: 1_700_000_000_000,
            meta: BTreeMap::new(),
            slot: 1005,
            priority: Priority::Normal,
        };
        if full {
            e.tenant = Some("acme \"corp\"".into());
            e.text = Some("Refund for jane@example.com\nplease.".into());
            e.text_hash = Some("ab".repeat(32));
            e.char_len = Some(35);
            e.pii = [("email".to_string(), 1), ("phone".to_string(), 2)].into();
            e.tags = vec!["billing".into(), "re\tfund".into()];
            e.intent_hint = Some("refund_request".into());
            e.routing_hints = [("lane".to_string(), "high".to_string())].into();
            e.summary_extractive = Some("Refund for jane@example.com please.".into());
            e.embed_preview = Some(vec![0.5, -1.25, 3.0e-7]);
            e.embed_ref = Some("vec://1".into());
            e.meta = [
                (
                    "k\u{1}".to_string(),
                    serde_json::json!({"a": [1, 2.5, null, "x\ny"]}),
                ),
                ("z".to_string(), serde_json::json!(true)),
            ]
            .into();
            e.priority = Priority::High;
        }
        ForwardRecord {
            stream: "acme".into(),
            seq: u64::MAX,
            prev_hash: "0".repeat(64),
            hash: "f".repeat(64),
            slot: 1005,
            envelope: e,
        }
    }

    #[test]
    fn records_with_and_without_every_optional_field_are_byte_identical_to_serde_json() {
        for full in [false, true] {
            let r = record(full);
            let mut fast = Vec::new();
            write_record(&mut fast, &r).unwrap();
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                serde_json::to_string(&r).unwrap()
            );
        }
        let batch = vec![
            std::sync::Arc::new(record(false)),
            std::sync::Arc::new(record(true)),
        ];
        let mut fast = Vec::new();
        write_records(&mut fast, &batch).unwrap();
        assert_eq!(fast, serde_json::to_vec(&batch).unwrap());
    }
}
