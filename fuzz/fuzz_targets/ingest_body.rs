//! Fuzzes request parsing, the first thing untrusted bytes meet: the direct msgpack road, the
//! serde roads and the `Value` road behind them, for every content type; and the envelope
//! decoder on raw bytes (the segment target reaches it only through valid frames). Nothing may
//! panic; an accepted request's encodings must decode back to its envelopes, and the `Value`
//! road alone must accept it too and build the same envelopes and texts.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run ingest_body -- -max_total_time=600` (the first input
//! byte picks the content type; the rest is the body).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spoolgate::config::UnknownFields;
use spoolgate::envelope::Envelope;
use spoolgate::ingest::parse::{parse_request, value_road_envelopes, ContentType, ParseLimits};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    if let Ok(envelope) = Envelope::decode(body) {
        // Whatever decodes re-encodes and decodes to itself.
        let bytes = envelope.encode().expect("a decoded envelope encodes");
        assert_eq!(
            Envelope::decode(&bytes).expect("its encoding decodes"),
            envelope
        );
    }
    let content_type = match selector % 3 {
        0 => ContentType::Json,
        1 => ContentType::NdJson,
        _ => ContentType::Msgpack,
    };
    let limits = ParseLimits {
        batch_items_max: 64,
        envelope_bytes_max: 64 * 1024,
        unknown_fields: if selector & 0x80 == 0 {
            UnknownFields::Meta
        } else {
            UnknownFields::Reject
        },
    };
    let auth = (selector & 0x40 != 0).then_some("acme");
    if let Ok(parsed) = parse_request(content_type, body, &limits, auth, 1_700_000_000_000) {
        // The oracle: the `Value` road accepts the same body and builds the same envelopes and
        // texts (the fast roads may only ever agree with it); ids generated differ per call.
        let by_values = value_road_envelopes(content_type, body, &limits, auth, 1_700_000_000_000)
            .expect("what parse_request accepts, the Value road accepts");
        assert_eq!(parsed.len(), by_values.len());
        for (p, (mut expected, generated, text)) in parsed.into_iter().zip(by_values) {
            let decoded = Envelope::decode(&p.encoded).expect("encoded envelopes decode");
            assert_eq!(decoded.text, text);
            assert_eq!(p.id_generated, generated);
            let mut built = p.envelope.clone();
            if generated {
                built.id.clear();
                expected.id.clear();
            }
            assert_eq!(built, expected);
            assert_eq!(decoded, p.envelope.into_envelope(text));
        }
    }
});
