//! Golden bytes: the encoder's output must equal the vectors printed in spool-format.md, byte
//! for byte. If this fails, either the format changed (bump the version and update the
//! contract) or the document is wrong.

mod common;

use spoolgate::envelope::{Envelope, Priority, ENVELOPE_VERSION};
use spoolgate::spool::format::{encode_frame, SegmentHeader};

/// The three-record segment of spool-format.md, built with the library's encoders.
fn golden_segment() -> Vec<u8> {
    let header = SegmentHeader {
        version: spoolgate::spool::format::FORMAT_VERSION,
        segment_id: 1,
        created_ms: 1_700_000_000_000,
        segment_bytes_max: 1_048_576,
        record_bytes_max: 1_114_112,
    };
    let mut bytes = header.encode().to_vec();
    let first = Envelope {
        version: ENVELOPE_VERSION,
        id: "a1".into(),
        source: "svc".into(),
        text: Some("hi".into()),
        ts_ms: 1_700_000_000_000,
        slot: spoolgate::slots::slot_of("svc"),
        priority: Priority::Normal,
        ..Default::default()
    };
    let second = Envelope {
        id: "a2".into(),
        tenant: Some("acme".into()),
        text: None,
        slot: spoolgate::slots::slot_of("acme"),
        priority: Priority::High,
        ..first.clone()
    };
    encode_frame(1, &first.encode().unwrap(), &mut bytes);
    encode_frame(1, &second.encode().unwrap(), &mut bytes);
    encode_frame(1, &third().encode().unwrap(), &mut bytes);
    bytes
}

/// The third envelope of the golden segment: its `meta` holds -9, encoded as the byte 0xF7, so
/// its frame is stored stuffed.
fn third() -> Envelope {
    Envelope {
        version: ENVELOPE_VERSION,
        id: "a3".into(),
        source: "svc".into(),
        ts_ms: 1_700_000_000_000,
        slot: spoolgate::slots::slot_of("svc"),
        priority: Priority::Normal,
        meta: [("n".to_string(), serde_json::json!(-9))].into(),
        ..Default::default()
    }
}

/// The hex between the `golden-segment` markers of spool-format.md.
fn documented_hex() -> String {
    common::spec_hex("golden-segment")
}

#[test]
fn the_documented_rotation_frame_is_what_the_writer_writes_and_names_segment_two() {
    use spoolgate::spool::format::{frame_at, FrameAt, Rotation};
    let bytes = Rotation { next_segment: 2 }.frame();
    let documented = common::spec_hex("golden-rotation");
    assert_eq!(
        hex::encode(&bytes),
        documented,
        "current bytes:\n{}",
        common::hexdump(&bytes)
    );
    let bytes = hex::decode(documented).unwrap();
    let FrameAt::Valid {
        kind,
        payload_start,
        payload_len,
        stuffed: false,
        total,
    } = frame_at(&bytes, 0, 1024)
    else {
        panic!("the documented rotation frame is not a valid frame");
    };
    assert_eq!((kind, total), (4, 32));
    assert_eq!(
        Rotation::decode(&bytes[payload_start..payload_start + payload_len]),
        Some(Rotation { next_segment: 2 })
    );
}

#[test]
fn the_documented_segment_is_what_the_encoder_writes() {
    let bytes = golden_segment();
    let documented = documented_hex();
    assert_eq!(
        hex::encode(&bytes),
        documented,
        "spool-format.md's golden segment differs from the encoder; current bytes:\n{}",
        common::hexdump(&bytes)
    );
}

#[test]
fn the_documented_segment_decodes_to_its_three_envelopes() {
    let bytes = hex::decode(documented_hex()).unwrap();
    let scanned = spoolgate::spool::format::scan(&bytes, 1 << 20);
    let mut stuffed_frames = Vec::new();
    let payloads: Vec<Envelope> = scanned
        .items
        .iter()
        .map(|item| match item {
            spoolgate::spool::format::Scanned::Frame {
                payload_start,
                payload_len,
                kind: 1,
                stuffed,
                ..
            } => {
                stuffed_frames.push(*stuffed);
                let stored = &bytes[*payload_start..payload_start + payload_len];
                Envelope::decode(&spoolgate::spool::format::unstuffed(stored, *stuffed)).unwrap()
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(stuffed_frames, [false, false, true]);
    assert_eq!(payloads.len(), 3);
    assert_eq!(payloads[0].id, "a1");
    assert_eq!(payloads[1].tenant.as_deref(), Some("acme"));
    assert_eq!(payloads[2], third());
    assert_eq!(scanned.data_end, bytes.len() as u64);
}
