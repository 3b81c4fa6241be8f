//! Exhaustive corruption of a small log: truncate at every byte offset, flip a bit in every
//! byte. Recovery always terminates, never panics, and loses only records whose bytes were
//! touched.

mod spool_common;

use spool_common::*;
use spoolgate::spool::Position;

struct Log {
    bytes: Vec<u8>,
    /// (number, frame start, frame end incl. padding) of every record.
    frames: Vec<(u64, u64, u64)>,
}

fn build(dir: &std::path::Path) -> Log {
    let opts = options(dir);
    let (s, _, _) = open(&opts);
    let positions: Vec<Position> = (0..6).map(|n| append(&s, n)).collect();
    let end = s.durable_end();
    s.close().unwrap();
    assert!(positions.iter().all(|p| p.segment == 1));
    let bytes = std::fs::read(dir.join(format!("{:020}.seg", 1))).unwrap();
    let mut frames = Vec::new();
    for (n, p) in positions.iter().enumerate() {
        let next = positions.get(n + 1).map_or(end.offset, |q| q.offset);
        frames.push((n as u64, p.offset, next));
    }
    Log { bytes, frames }
}

fn recover_with(bytes: &[u8]) -> Vec<u64> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(format!("{:020}.seg", 1)), bytes).unwrap();
    let (s, _, _) = open(&options(dir.path()));
    read_all(&s)
}

#[test]
fn truncating_at_any_offset_keeps_exactly_the_records_before_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let log = build(dir.path());
    for cut in 0..=log.bytes.len() {
        let got = recover_with(&log.bytes[..cut]);
        // A record survives when its header and payload (not necessarily its padding) do.
        let expected: Vec<u64> = log
            .frames
            .iter()
            .filter(|&&(_, start, _)| {
                let len = u32::from_le_bytes(
                    log.bytes[start as usize + 4..start as usize + 8]
                        .try_into()
                        .unwrap(),
                );
                start + 16 + u64::from(len) <= cut as u64
            })
            .map(|f| f.0)
            .collect();
        assert_eq!(got, expected, "cut at {cut}");
    }
}

#[test]
fn flipping_a_bit_in_any_byte_loses_only_the_record_it_lands_in() {
    let dir = tempfile::tempdir().unwrap();
    let log = build(dir.path());
    for at in 0..log.bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut bytes = log.bytes.clone();
            bytes[at] ^= bit;
            let got = recover_with(&bytes);
            for &(n, start, end) in &log.frames {
                let touched = (at as u64) >= start && (at as u64) < end;
                if !touched {
                    assert!(
                        got.contains(&n),
                        "flip {bit:#x} at {at} lost untouched record {n}: {got:?}"
                    );
                }
            }
            let mut sorted = got.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted, got, "records stay in order and appear once");
        }
    }
}
