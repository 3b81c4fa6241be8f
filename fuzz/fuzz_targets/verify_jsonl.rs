//! Fuzzes `spoolgate verify` on file-sink output (`Verifier`, `verify_jsonl`), which reads
//! lines an operator hands it from anywhere: nothing may panic, whatever the bytes. And since
//! `verify` exists to catch a changed record, an oracle: the input is real sink output (two
//! streams' chains, written with the library's own sealing and JSON writer, with a redelivered
//! line) with one edit the fuzzer chooses, and if `verify` accepts the edited bytes, every
//! line of them must decode to a record that was sealed. An edit that only re-renders a line
//! (whitespace, escapes, key order) or drops records at the end of a stream may pass; one
//! that changes what a record says must not. Random bytes alone would almost never reach the
//! chain checks, which need valid hashes; the edits start from lines that do.
//!
//! Input: the first byte's low bit picks raw bytes (the rest of the input) or an edit; bit 1
//! reads with `--partial`; bit 2 bounds lines at 600 bytes. An edit is a little-endian u16
//! offset into the output (modulo its length + 1), a byte giving how many bytes to delete
//! there (modulo 64), and the bytes to insert there (the rest of the input).
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run verify_jsonl fuzz/corpus/verify_jsonl --
//! -max_total_time=480` (stable toolchains need RUSTC_BOOTSTRAP for the sanitizer flags
//! cargo-fuzz passes).
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spoolgate::chain::{Chains, ForwardRecord, Verifier, VerifySummary};
use spoolgate::envelope::{Envelope, Priority};
use spoolgate::forward::json::write_record;
use spoolgate::slots::slot_of;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let partial = flags & 2 != 0;
    let short_lines = flags & 4 != 0;
    if flags & 1 == 0 {
        drop(verify(rest, partial, short_lines));
        return;
    }
    let (output, records) = sealed_output();
    let [lo, hi, delete, insert @ ..] = rest else {
        return;
    };
    let at = usize::from(u16::from_le_bytes([*lo, *hi])) % (output.len() + 1);
    let end = (at + usize::from(*delete % 64)).min(output.len());
    let mut edited = Vec::with_capacity(output.len() + insert.len());
    edited.extend_from_slice(&output[..at]);
    edited.extend_from_slice(insert);
    edited.extend_from_slice(&output[end..]);
    let Ok(summary) = verify(&edited, partial, short_lines) else {
        return;
    };
    // Accepted: every line is one of the sealed records, as `verify` splits lines.
    let mut lines = 0u64;
    for line in edited.split(|&b| b == b'\n') {
        let line = std::str::from_utf8(line).expect("verify accepted a line that is not UTF-8");
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let record: ForwardRecord =
            serde_json::from_str(line).expect("verify accepted a line that does not decode");
        assert!(
            records.contains(&record),
            "verify accepted a record that was never sealed: {line}"
        );
    }
    assert_eq!(
        summary.records + summary.unlinked_before_first,
        lines,
        "every line is counted once"
    );
});

/// Reads `input` as `spoolgate verify` does, with `--partial` or not.
fn verify(
    input: &[u8],
    partial: bool,
    short_lines: bool,
) -> Result<VerifySummary, spoolgate::chain::VerifyError> {
    let mut verifier = if short_lines {
        Verifier::with_line_bytes_max(600)
    } else {
        Verifier::new()
    };
    if partial {
        verifier = verifier.partial();
    }
    verifier.read(input, None)?;
    Ok(verifier.finish())
}

/// File-sink output of two interleaved streams, the second of them (a tenant's) redelivering
/// its first record at the end, and the records it holds. Built once: sealing is
/// deterministic, so every run edits the same bytes.
fn sealed_output() -> &'static (Vec<u8>, Vec<ForwardRecord>) {
    static OUTPUT: OnceLock<(Vec<u8>, Vec<ForwardRecord>)> = OnceLock::new();
    OUTPUT.get_or_init(|| {
        let mut chains = Chains::new();
        let mut records = Vec::new();
        for (i, tenant) in [None, Some("acme"), None, Some("acme"), None]
            .into_iter()
            .enumerate()
        {
            let mut envelope = Envelope {
                version: 1,
                id: format!("r{i}"),
                source: "s".into(),
                tenant: tenant.map(str::to_string),
                text: Some(format!("line {i}: \"quoted\", tab\t, caf\u{e9} \u{1f600}")),
                ts_ms: 1_700_000_000_000 + i as u64,
                ..Default::default()
            };
            envelope.slot = slot_of(envelope.stream());
            if i % 2 == 1 {
                // The optional fields and client meta of open shape, so that edits can reach
                // what an empty envelope leaves out.
                envelope.text_hash = Some("ab".repeat(16));
                envelope.char_len = Some(42);
                envelope.pii = BTreeMap::from([("email".to_string(), 1)]);
                envelope.tags = vec!["t1".into(), "t2".into()];
                envelope.intent_hint = Some("question".into());
                envelope.routing_hints = BTreeMap::from([("lane".to_string(), "b".to_string())]);
                envelope.summary_extractive = Some("summary".into());
                envelope.embed_preview = Some(vec![0.25, -1.5]);
                envelope.embed_ref = Some("e1".into());
                envelope.priority = Priority::High;
                envelope.meta = serde_json::from_str(
                    r#"{"f":1.5,"n":-3,"o":{"a":[1,"x",null,true]},"s":"\u0001"}"#,
                )
                .unwrap();
            }
            records.push(chains.seal(envelope).unwrap());
        }
        records.push(records[1].clone());
        let mut output = Vec::new();
        for record in &records {
            write_record(&mut output, record).unwrap();
            output.push(b'\n');
        }
        assert!(
            verify(&output, false, false).is_ok(),
            "the unedited output verifies"
        );
        (output, records)
    })
}
