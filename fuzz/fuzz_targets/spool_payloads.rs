//! Fuzzes the decoders of what recovery and the `chain-heads` command read from disk: SEALED
//! and TOMBSTONE payloads, envelopes decoded without their text (the start-up scan), the
//! `chain-heads` checkpoint (current and unversioned form), dedup checkpoints, and the heads
//! exchange JSON `chain-heads import` reads. A CRC only says the bytes are what was written,
//! not that the writer was this build or that the bytes were ever valid, so none may panic.
//! Where a decode succeeds, encoding the value and decoding that must give the same value and
//! the same bytes again: what recovery accepts, it can write back unchanged.
//!
//! The segment_reader target reaches the payload decoders only through frames whose CRC
//! holds, and the checkpoints not at all; here the target writes the magic and CRC itself
//! (for the checkpoints' current form), so every input reaches the body decoder.
//!
//! Input: the first byte picks the decoder (modulo 7); the rest is its input.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run spool_payloads fuzz/corpus/spool_payloads --
//! -max_total_time=480` (stable toolchains need RUSTC_BOOTSTRAP for the sanitizer flags
//! cargo-fuzz passes).
#![no_main]

use std::collections::BTreeMap;
use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use spoolgate::chain::restore::{heads_from_json, heads_to_json};
use spoolgate::chain::{Chains, SealedBatch, Tombstone, CHAIN_HEADS_MAGIC};
use spoolgate::envelope::Envelope;
use spoolgate::ingest::dedup_file::{self, DEDUP_FILE_MAGIC};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 7 {
        0 => {
            // The scan decodes without the text; the same bytes must decode or fail alike.
            let whole = Envelope::decode(body);
            let without = Envelope::decode_without_text(body);
            assert_eq!(
                whole.is_ok(),
                without.is_ok(),
                "decode and decode_without_text disagree"
            );
            if let (Ok(mut whole), Ok(mut without)) = (whole, without) {
                whole.text = None;
                without.text = None;
                assert_same(&whole, &without);
            }
        }
        1 => {
            if let Ok(batch) = SealedBatch::decode(body) {
                round_trip(
                    &batch,
                    |b| b.encode().unwrap(),
                    |b| SealedBatch::decode(b).ok(),
                );
            }
        }
        2 => {
            if let Ok(tombstone) = Tombstone::decode(body) {
                round_trip(
                    &tombstone,
                    |t| t.encode().unwrap(),
                    |b| Tombstone::decode(b).ok(),
                );
            }
        }
        3 => checkpoint(&with_header(CHAIN_HEADS_MAGIC, body)),
        4 => checkpoint(body),
        5 => {
            for bytes in [with_header(DEDUP_FILE_MAGIC, body), body.to_vec()] {
                if let Ok(entries) = dedup_file::decode(&bytes) {
                    round_trip(
                        &entries,
                        |e| dedup_file::encode(e).unwrap(),
                        |b| dedup_file::decode(b).ok(),
                    );
                }
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(body) else {
                return;
            };
            if let Ok(chains) = heads_from_json(text) {
                let json = serde_json::to_string(&heads_to_json(&chains)).unwrap();
                let again = heads_from_json(&json).expect("exported heads import again");
                assert_eq!(heads_of(&chains), heads_of(&again));
            }
        }
    }
});

/// `magic || CRC-32 of body || body`: a checkpoint's current form around the fuzzer's body.
fn with_header(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(12 + body.len());
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// A `chain-heads` checkpoint that loads writes back as the same heads, and what it writes
/// loads again and writes the same bytes.
fn checkpoint(bytes: &[u8]) {
    let Ok(chains) = Chains::from_checkpoint_bytes(bytes) else {
        return;
    };
    let written = chains.checkpoint_bytes().unwrap();
    let again = Chains::from_checkpoint_bytes(&written).expect("a written checkpoint loads");
    assert_eq!(heads_of(&chains), heads_of(&again));
    assert_eq!(written, again.checkpoint_bytes().unwrap());
}

/// Every stream's `(seq, hash)` and the kept segment, as [`heads_of`] gives them.
type Heads = (BTreeMap<String, (u64, [u8; 32])>, Option<u64>);

/// Every head and the kept segment, in an order that does not depend on the map's hasher.
fn heads_of(chains: &Chains) -> Heads {
    let heads = chains
        .iter()
        .map(|(stream, head)| (stream.to_string(), (head.seq, head.hash)))
        .collect();
    (heads, chains.first_kept)
}

/// `value` encodes, its encoding decodes to the same value, and that encodes to the same bytes.
fn round_trip<T: Debug>(
    value: &T,
    encode: impl Fn(&T) -> Vec<u8>,
    decode: impl Fn(&[u8]) -> Option<T>,
) {
    let bytes = encode(value);
    let again = decode(&bytes).expect("an encoded value decodes");
    assert_same(value, &again);
    assert_eq!(bytes, encode(&again), "the value re-encodes to other bytes");
}

/// Equal values, compared through `Debug`: unlike `==`, it tells -0.0 from 0.0 and takes a NaN
/// (which a float in `meta` or `embed_preview` may be) for itself.
fn assert_same<T: Debug>(a: &T, b: &T) {
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}
