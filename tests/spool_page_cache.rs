//! Page cache: the writer releases the cached pages of segments far behind the active one,
//! but not those the consumer has yet to read, until they are `cached_unread_bytes_max`
//! behind. These tests watch the releases through a recording filesystem, with 8 KiB segments
//! and a cached window of two segments. The releases run on a helper thread, so what has not
//! been released yet is read from the writer's own bound (`cache_released_below`, decided
//! before an append returns), and what was released from the log once `close` joined the
//! helper.

mod spool_common;

use std::sync::{Arc, Mutex};

use spool_common::recording::{Log, RecordingFs};
use spool_common::*;
use spoolgate::spool::{RecordKind, Spool};

const SEGMENT_BYTES: u64 = 8 * 1024;

/// A spool of 8 KiB segments on a recording filesystem that keeps two segments cached behind
/// the active one, and unread ones up to `unread_segments_max` segments behind.
fn recording_spool(unread_segments_max: u64) -> (tempfile::TempDir, Spool, Arc<Mutex<Log>>) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.segment_bytes_max = SEGMENT_BYTES;
    opts.cached_behind_bytes = 2 * SEGMENT_BYTES;
    opts.cached_unread_bytes_max = unread_segments_max * SEGMENT_BYTES;
    let log = Arc::new(Mutex::new(Log::default()));
    let (s, _) = open_fs(&opts, Arc::new(RecordingFs { log: log.clone() }));
    (dir, s, log)
}

/// Appends numbered records until segment `active` is the one being written.
fn append_until_active(s: &Spool, active: u64, n: &mut u64) {
    while s.durable_end().segment < active {
        s.append_blocking(vec![(RecordKind::ENVELOPE, payload(*n))], false)
            .expect("append");
        *n += 1;
    }
    assert_eq!(s.durable_end().segment, active, "one segment at a time");
}

#[test]
fn segments_the_consumer_has_not_read_keep_their_pages_and_read_ones_are_released() {
    let (dir, s, log) = recording_spool(16);
    let mut n = 0;
    // The consumer is still in segment 1: however far the writer gets (short of 16 segments
    // ahead), nothing is released.
    s.note_read_segment(1);
    append_until_active(&s, 12, &mut n);
    assert_eq!(s.cache_released_below(), 1, "nothing released");
    // It has read segments 1-4: at the next rotation they go, and 5 onwards stay.
    s.note_read_segment(5);
    append_until_active(&s, 16, &mut n);
    s.close().expect("close");
    assert_eq!(
        log.lock().unwrap().released_segments(dir.path()),
        vec![1, 2, 3, 4]
    );
}

#[test]
fn an_unread_segment_is_released_once_it_is_the_unread_bound_behind() {
    let (dir, s, log) = recording_spool(8);
    let mut n = 0;
    s.note_read_segment(1);
    // At segment 10, segment 1 has eight whole segments after it: it goes although unread.
    append_until_active(&s, 9, &mut n);
    assert_eq!(s.cache_released_below(), 1, "nothing released");
    append_until_active(&s, 10, &mut n);
    s.close().expect("close");
    assert_eq!(log.lock().unwrap().released_segments(dir.path()), vec![1]);
}

#[test]
fn without_a_consumer_segments_are_released_by_distance_alone() {
    let (dir, s, log) = recording_spool(16);
    let mut n = 0;
    // Segment 1 falls out of the two-segment window when segment 4 becomes active.
    append_until_active(&s, 3, &mut n);
    assert_eq!(s.cache_released_below(), 1, "nothing released");
    append_until_active(&s, 4, &mut n);
    s.close().expect("close");
    assert_eq!(log.lock().unwrap().released_segments(dir.path()), vec![1]);
}
