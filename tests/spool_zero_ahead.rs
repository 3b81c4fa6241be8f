//! Zeroing ahead of the writer (`spool.zero_ahead_bytes`): the writer keeps the active segment
//! zero-filled a bounded distance past its write offset, so appends overwrite written blocks.
//! These tests watch every write the spool issues through a recording filesystem.

mod spool_common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use spool_common::recording::{Log, RecordingFs};
use spool_common::*;
use spoolgate::spool::format::HEADER_LEN;
use spoolgate::spool::{Position, RecordKind};

fn segment_file(dir: &Path, id: u64) -> String {
    dir.join(format!("{id:020}.seg")).display().to_string()
}

/// A preallocated spool of 8 KiB segments on a recording filesystem, zeroing `ahead` bytes
/// ahead; the temporary directory must outlive the spool.
fn recording_spool(
    ahead: u64,
) -> (
    tempfile::TempDir,
    spoolgate::spool::SpoolOptions,
    spoolgate::spool::Spool,
    Arc<Mutex<Log>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    opts.segment_bytes_max = 8 * 1024;
    opts.zero_ahead_bytes = ahead;
    let log = Arc::new(Mutex::new(Log::default()));
    let (s, _) = open_fs(&opts, Arc::new(RecordingFs { log: log.clone() }));
    (dir, opts, s, log)
}

#[test]
fn the_writer_keeps_the_active_segment_zeroed_ahead_and_never_zeroes_acknowledged_bytes() {
    let (dir, opts, s, log) = recording_spool(1024);
    // After each append: how far the write log had got, and the durable end of the data.
    let mut acked: Vec<(usize, Position)> = Vec::new();
    for n in 0..400 {
        let positions = s
            .append_blocking(vec![(RecordKind::ENVELOPE, payload(n))], false)
            .expect("append");
        assert_eq!(positions.len(), 1);
        let end = s.durable_end();
        acked.push((log.lock().unwrap().writes.len(), end));
        // The writer zeroes after it has answered a commit, so by the time this append was
        // answered the previous one's zeroing was done: the zeroed region reaches at least
        // `zero_ahead_bytes` past the previous end (or the end of its segment).
        if let Some(&(_, prev)) = acked.iter().rev().nth(1) {
            let want = (prev.offset + opts.zero_ahead_bytes).min(opts.segment_bytes_max);
            let path = segment_file(dir.path(), prev.segment);
            let zeroed_to = log
                .lock()
                .unwrap()
                .writes
                .iter()
                .filter(|w| w.path == path && w.all_zero)
                .map(|w| w.offset + w.len)
                .max()
                .unwrap_or(0);
            assert!(
                zeroed_to >= want,
                "after record {n}: zeroed to {zeroed_to}, data ended at {prev:?}, wanted {want}"
            );
        }
    }
    assert!(s.segments().len() > 3, "the run crossed rotations");
    // No all-zero write ever started below data acknowledged before it was issued.
    let writes = log.lock().unwrap().writes.clone();
    for (i, w) in writes.iter().enumerate() {
        if !w.all_zero {
            continue;
        }
        for (issued_after, end) in &acked {
            if i >= *issued_after && w.path == segment_file(dir.path(), end.segment) {
                assert!(
                    w.offset >= end.offset,
                    "zeros at {}+{} in segment {} after data up to {} was acknowledged",
                    w.offset,
                    w.len,
                    end.segment,
                    end.offset
                );
            }
        }
    }
    // And every acknowledged record reads back.
    assert_eq!(read_all(&s), (0..400).collect::<Vec<_>>());
}

#[test]
fn with_zero_ahead_off_only_frames_and_headers_are_written() {
    let (_dir, _, s, log) = recording_spool(0);
    for n in 0..50 {
        append(&s, n);
    }
    let writes = log.lock().unwrap().writes.clone();
    assert!(!writes.is_empty());
    assert!(
        writes.iter().all(|w| !w.all_zero),
        "an all-zero write was issued: {:?}",
        writes.iter().find(|w| w.all_zero)
    );
    assert!(writes.iter().any(|w| w.offset == 0 && w.len == HEADER_LEN));
}

#[test]
fn commits_of_zero_ahead_bytes_or_more_write_no_zeros_ahead() {
    let (_dir, _, s, log) = recording_spool(512);
    for _ in 0..30 {
        let big = bytes::Bytes::from(vec![b'x'; 600]);
        s.append_blocking(vec![(RecordKind::ENVELOPE, big)], false)
            .expect("append");
    }
    // One small commit: zeros follow it (and prove the spool would zero here at all).
    append(&s, 1);
    append(&s, 2);
    let writes = log.lock().unwrap().writes.clone();
    let first_zero = writes.iter().position(|w| w.all_zero);
    let last_big = writes.iter().rposition(|w| w.len >= 600 && !w.all_zero);
    assert!(
        matches!((first_zero, last_big), (Some(z), Some(b)) if z > b),
        "zeros were written among the large commits: first zero write {first_zero:?}, last large write {last_big:?}"
    );
}
