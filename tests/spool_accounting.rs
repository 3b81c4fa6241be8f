//! What the spool counts as its size on disk, for the quota and `spoolgate_spool_disk_bytes`:
//! every segment file in its directory, at its allocated length.

mod spool_common;

use std::time::{Duration, Instant};

use spool_common::*;

/// The lengths of the segment files in `dir`, summed, and how many there are.
fn segment_files(dir: &std::path::Path) -> (u64, usize) {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .fold((0, 0), |(bytes, n), e| {
            (bytes + e.metadata().unwrap().len(), n + 1)
        })
}

#[test]
fn the_segment_prepared_ahead_of_rotation_counts_from_when_it_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let (s, _, _) = open(&opts);
    // Half the active segment written: the next one is prepared, preallocated in full.
    let mut n = 0;
    while s.durable_end().offset < opts.segment_bytes_max / 2 {
        append(&s, n);
        n += 1;
    }
    // The prepared file appears at length zero and is then allocated, so the wait is for the
    // allocated file: two files at two segments' length, and the spool counting what they hold.
    // Waiting only for the count to match the files would stop at the empty new file, before
    // the spool could count it.
    let started = Instant::now();
    loop {
        let (bytes, files) = segment_files(dir.path());
        if files == 2 && bytes == 2 * opts.segment_bytes_max && s.disk_bytes() == bytes {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the spool counts {} bytes; its {files} segment files hold {bytes}",
            s.disk_bytes()
        );
        std::thread::yield_now();
    }
    assert_eq!(s.segments().len(), 1, "not rotated yet");
    assert_eq!(s.disk_bytes(), 2 * opts.segment_bytes_max);
}
