//! One test per row of the recovery decision table in spool-format.md §4.

mod spool_common;

use spool_common::*;
use spoolgate::spool::format::HEADER_LEN;
use spoolgate::spool::{Position, RecordKind};

fn seg(dir: &std::path::Path, id: u64) -> std::path::PathBuf {
    dir.join(format!("{id:020}.seg"))
}

fn write_and_close(opts: &spoolgate::spool::SpoolOptions, n: u64) -> Vec<Position> {
    let (s, _, _) = open(opts);
    let positions = (0..n).map(|i| append(&s, i)).collect();
    s.close().unwrap();
    positions
}

/// Appends `n` records and drops the spool without closing it, as a killed process leaves it:
/// the durable end is where this start left it (row 14), not after the records.
fn write_and_crash(opts: &spoolgate::spool::SpoolOptions, n: u64) -> Vec<Position> {
    let (s, _, _) = open(opts);
    let positions = (0..n).map(|i| append(&s, i)).collect();
    drop(s);
    positions
}

/// The names of the durable-end markers in `dir`.
fn durable_markers(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("durable-"))
        .collect();
    names.sort();
    names
}

/// Flips one bit in the payload of the frame at `at` (in segment file `at.segment`), as a
/// failing disk would; returns the file's path and its bytes as left.
fn flip_a_payload_bit(dir: &std::path::Path, at: Position) -> (std::path::PathBuf, Vec<u8>) {
    let path = seg(dir, at.segment);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at.offset as usize + 20] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn durable_marker(end: Position) -> String {
    format!("durable-{:020}-{:020}", end.segment, end.offset)
}

#[test]
fn row_1_valid_frames_are_all_kept_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    write_and_close(&opts, 100);
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), (0..100).collect::<Vec<_>>());
    assert!(
        report.segments > 1,
        "100 records span several 4 KiB segments"
    );
    assert!(report.damaged.is_empty());
    assert_eq!(report.records, 100);
}

#[test]
fn row_2_a_damaged_frame_mid_segment_costs_only_itself_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 3);
    flip_a_payload_bit(dir.path(), positions[1]);
    let (s, report, metrics) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 2]);
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].offset, positions[1].offset);
    assert_eq!(report.damaged[0].records_lost, 1);
    assert_eq!(metrics.recovery_corrupt_records_dropped_total.get(), 1);
}

#[test]
fn row_3_data_ends_at_zeros_in_a_preallocated_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    write_and_close(&opts, 5);
    assert_eq!(std::fs::metadata(seg(dir.path(), 1)).unwrap().len(), 4096);
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1, 2, 3, 4]);
    assert_eq!(report.torn_tail_bytes, 0);
    append(&s, 5);
    assert_eq!(read_all(&s), vec![0, 1, 2, 3, 4, 5]);
}

#[test]
fn row_4_a_torn_tail_of_the_newest_segment_is_zeroed_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_crash(&opts, 3);
    assert_eq!(
        durable_markers(dir.path()),
        vec![durable_marker(Position {
            segment: 1,
            offset: HEADER_LEN
        })],
        "the start's, before any record"
    );
    let path = seg(dir.path(), 1);
    let bytes = std::fs::read(&path).unwrap();
    // Cut the last frame in half: a write that was in flight when the power went.
    let cut = positions[2].offset as usize + 20;
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let (s, report, metrics) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1]);
    assert_eq!(report.torn_tail_bytes, (cut as u64) - positions[2].offset);
    assert_eq!(
        metrics.recovery_torn_tail_bytes_truncated_total.get(),
        report.torn_tail_bytes
    );
    assert!(
        report.damaged.is_empty(),
        "a torn tail is not counted as corruption"
    );
    append(&s, 7);
    s.close().unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1, 7]);
    assert_eq!(report.torn_tail_bytes, 0);
}

#[test]
fn row_5_a_damaged_tail_of_an_older_segment_is_reported_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 100);
    let last_in_first: Vec<&Position> = positions.iter().filter(|p| p.segment == 1).collect();
    let victim = **last_in_first.last().unwrap();
    let path = seg(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[victim.offset as usize + 18] ^= 0x01;
    // And the rotation frame after it, so nothing valid follows the damage in segment 1.
    let rotation_at = victim.offset as usize + payload(last_in_first.len() as u64 - 1).len();
    let rotation_at = rotation_at.next_multiple_of(8) + 16;
    assert_eq!(bytes[rotation_at + 8], RecordKind::ROTATION.0);
    bytes[rotation_at + 20] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let (s, report, _) = open(&opts);
    let all = read_all(&s);
    assert_eq!(all.len(), 99);
    assert!(!all.contains(&(last_in_first.len() as u64 - 1)));
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].segment, 1);
    assert_eq!(report.torn_tail_bytes, 0);
}

#[test]
fn row_6_a_damaged_segment_header_still_yields_its_frames() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    write_and_close(&opts, 3);
    let path = seg(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1, 2]);
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(
        (report.damaged[0].offset, report.damaged[0].len_bytes),
        (0, HEADER_LEN)
    );
    assert_eq!(report.damaged[0].records_lost, 0);
    // New records go to a fresh segment, not after frames in a doubtful container.
    let p = append(&s, 3);
    assert_eq!(p.segment, 2);
    assert_eq!(read_all(&s), vec![0, 1, 2, 3]);
}

#[test]
fn row_7_an_all_zero_newest_segment_is_an_interrupted_rotation_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    write_and_close(&opts, 3);
    std::fs::write(seg(dir.path(), 2), vec![0u8; 4096]).unwrap();
    let (s, report, _) = open(&opts);
    assert!(!seg(dir.path(), 2).exists());
    assert_eq!(read_all(&s), vec![0, 1, 2]);
    assert_eq!(report.segments, 1);
}

#[test]
fn row_8_a_header_naming_another_id_is_trusted_by_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    write_and_close(&opts, 3);
    std::fs::rename(seg(dir.path(), 1), seg(dir.path(), 5)).unwrap();
    let (s, _, _) = open(&opts);
    assert_eq!(s.first_position().segment, 5);
    assert_eq!(read_all(&s), vec![0, 1, 2]);
}

#[test]
fn row_9_a_gap_in_segment_ids_is_stepped_over() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 300);
    assert!(positions.last().unwrap().segment >= 3);
    std::fs::remove_file(seg(dir.path(), 2)).unwrap();
    let (s, report, metrics) = open(&opts);
    let expected: Vec<u64> = positions
        .iter()
        .enumerate()
        .filter(|(_, p)| p.segment != 2)
        .map(|(n, _)| n as u64)
        .collect();
    assert_eq!(read_all(&s), expected);
    // The gap is acknowledged data lost, and said so, as damage is.
    assert_eq!(report.missing_segments, vec![[2, 2]]);
    assert_eq!(metrics.recovery_segments_missing_total.get(), 1);
    s.close().unwrap();
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.missing_segments, vec![[2, 2]]);
    assert!(inspected.to_string().contains("MISSING segments 2..=2"));
}

/// Appends numbered records to a preallocating spool's 4 KiB segment 1 until it is past half
/// full, where the writer prepares segment 2 in the background; returns how many.
fn append_until_segment_two_is_prepared(s: &spoolgate::spool::Spool) -> u64 {
    let mut n = 0;
    while s.durable_end().offset < 2600 {
        append(s, n);
        n += 1;
    }
    n
}

/// The record numbers of `positions` outside segment `lost`.
fn numbers_outside(positions: &[Position], lost: u64) -> Vec<u64> {
    positions
        .iter()
        .enumerate()
        .filter(|(_, p)| p.segment != lost)
        .map(|(n, _)| n as u64)
        .collect()
}

#[test]
fn every_full_segment_ends_with_a_rotation_frame_naming_the_next_and_readers_skip_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 300);
    let last = positions.last().unwrap().segment;
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    for s in &inspected.segments {
        let rotations = s.records.get("rotation").copied().unwrap_or(0);
        assert_eq!(rotations, u64::from(s.id < last), "segment {}", s.id);
    }
    // The frame is the last thing in the segment and names the next one.
    let bytes = std::fs::read(seg(dir.path(), 1)).unwrap();
    let scanned = spoolgate::spool::format::scan(&bytes, 1024);
    let Some(spoolgate::spool::format::Scanned::Frame {
        kind,
        payload_start,
        payload_len,
        ..
    }) = scanned.items.last().cloned()
    else {
        panic!("segment 1 ends with a frame");
    };
    assert_eq!(kind, RecordKind::ROTATION.0);
    let rotation = spoolgate::spool::format::Rotation::decode(
        &bytes[payload_start..payload_start + payload_len],
    );
    assert_eq!(rotation.map(|r| r.next_segment), Some(2));
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), (0..300).collect::<Vec<_>>());
    assert_eq!(report.records, 300, "rotation frames are not records");
    assert!(report.missing_segments.is_empty());
    assert!(inspected.missing_segments.is_empty());
}

#[test]
fn row_9_the_newest_segment_removed_is_named_by_the_rotation_frame_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 300);
    let last = positions.last().unwrap().segment;
    assert!(last >= 3);
    std::fs::remove_file(seg(dir.path(), last)).unwrap();
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.missing_segments, vec![[last, last]]);
    let (s, report, metrics) = open(&opts);
    assert_eq!(read_all(&s), numbers_outside(&positions, last));
    assert_eq!(report.missing_segments, vec![[last, last]]);
    assert_eq!(metrics.recovery_segments_missing_total.get(), 1);
    // Appends go on after the missing segment, not in its id: the loss stays a gap that every
    // later start reports, until compaction deletes past it.
    assert_eq!(append(&s, 1000).segment, last + 1);
    s.close().unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(report.missing_segments, vec![[last, last]]);
    let mut expected = numbers_outside(&positions, last);
    expected.push(1000);
    assert_eq!(read_all(&s), expected);
}

#[test]
fn row_7_an_all_zero_segment_that_a_rotation_frame_names_is_reported_missing() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 300);
    let last = positions.last().unwrap().segment;
    // The rotation frame is written only once the segment it names has its header synced, so
    // a named segment with no header lost its contents.
    std::fs::write(seg(dir.path(), last), vec![0u8; 4096]).unwrap();
    let (s, report, metrics) = open(&opts);
    assert!(!seg(dir.path(), last).exists());
    assert_eq!(read_all(&s), numbers_outside(&positions, last));
    assert_eq!(report.missing_segments, vec![[last, last]]);
    assert_eq!(metrics.recovery_segments_missing_total.get(), 1);
    assert_eq!(append(&s, 1000).segment, last + 1);
}

#[test]
fn row_9_a_start_that_takes_over_a_prepared_segment_names_it_so_its_removal_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let (s, _, _) = open(&opts);
    // The stop leaves the prepared segment 2 empty.
    let n = append_until_segment_two_is_prepared(&s);
    s.close().unwrap();
    drop(s);
    assert!(seg(dir.path(), 2).exists(), "segment 2 was prepared");
    // The start takes segment 2 over and names it at the end of segment 1.
    let (s, report, _) = open(&opts);
    assert!(report.missing_segments.is_empty());
    assert_eq!(append(&s, n).segment, 2);
    s.close().unwrap();
    drop(s);
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.segments[0].records.get("rotation"), Some(&1));
    for id in 2..=3 {
        let _ = std::fs::remove_file(seg(dir.path(), id));
    }
    let (s, report, metrics) = open(&opts);
    assert_eq!(report.missing_segments, vec![[2, 2]]);
    assert_eq!(metrics.recovery_segments_missing_total.get(), 1);
    assert_eq!(read_all(&s), (0..n).collect::<Vec<_>>());
    assert_eq!(append(&s, 1000).segment, 3);
}

#[test]
fn row_7_a_crash_while_creating_the_first_segment_starts_the_spool_at_segment_one_again() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    // The file was created, and the crash came before its header was synced.
    std::fs::write(seg(dir.path(), 1), vec![0u8; 4096]).unwrap();
    let (s, report, _) = open(&opts);
    // Segment 2 as the first would read as a spool that compaction had already shortened.
    assert_eq!(s.first_position().segment, 1);
    assert!(report.missing_segments.is_empty());
    assert_eq!(append(&s, 0).segment, 1);
}

/// A spool whose segment 1 ended with a rotation frame naming segment 2, with segment 2's
/// file replaced by `then` (nothing, or files of zeros standing for crashed creations).
fn rotated_once_then(dir: &std::path::Path, then: &[u64]) -> Vec<Position> {
    let opts = options(dir);
    let (s, _, _) = open(&opts);
    let mut positions = Vec::new();
    let mut n = 0;
    while s.durable_end().segment == 1 {
        positions.push(append(&s, n));
        n += 1;
    }
    s.close().unwrap();
    drop(s);
    std::fs::remove_file(seg(dir, 2)).unwrap();
    for &id in then {
        std::fs::write(seg(dir, id), vec![0u8; 4096]).unwrap();
    }
    positions
}

/// After [`rotated_once_then`] with `then`: inspect and recovery both report segment 2
/// missing, once; nothing else is lost; appends go on in segment 3, not after segment 1's
/// rotation frame.
fn assert_segment_two_missing_once(then: &[u64]) {
    let dir = tempfile::tempdir().unwrap();
    let positions = rotated_once_then(dir.path(), then);
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.missing_segments, vec![[2, 2]]);
    let (s, report, metrics) = open(&options(dir.path()));
    assert_eq!(report.missing_segments, vec![[2, 2]]);
    assert_eq!(metrics.recovery_segments_missing_total.get(), 1);
    assert_eq!(read_all(&s), numbers_outside(&positions, 2));
    assert_eq!(append(&s, 1000).segment, 3);
}

#[test]
fn rows_7_and_9_a_named_segment_left_as_zeros_is_missing_for_recovery_and_inspect_alike() {
    assert_segment_two_missing_once(&[2]);
}

#[test]
fn rows_7_and_9_a_missing_segment_both_a_gap_and_named_by_a_rotation_is_counted_once() {
    assert_segment_two_missing_once(&[3]);
}

#[test]
fn a_rotation_frame_naming_any_segment_but_the_next_names_nothing() {
    use spoolgate::spool::missing_after_newest;
    assert_eq!(missing_after_newest(4, Some(5)), Some([5, 5]));
    assert_eq!(missing_after_newest(4, None), None);
    for other in [0, 3, 4, 6, u64::MAX] {
        assert_eq!(missing_after_newest(4, Some(other)), None, "{other}");
    }
    assert_eq!(missing_after_newest(u64::MAX, Some(u64::MAX)), None);
}

#[test]
fn row_9_a_prefix_deleted_by_compaction_is_not_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 300);
    let last = positions.last().unwrap().segment;
    assert!(last >= 4);
    std::fs::remove_file(seg(dir.path(), 1)).unwrap();
    std::fs::remove_file(seg(dir.path(), last - 1)).unwrap();
    let (_, report, metrics) = open(&opts);
    assert_eq!(report.missing_segments, vec![[last - 1, last - 1]]);
    assert_eq!(metrics.recovery_segments_missing_total.get(), 1);
}

#[test]
fn row_10_a_void_marker_drops_the_refused_batch() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 4);
    let marker = dir
        .path()
        .join(format!("void-{:020}-{:020}", 1, positions[2].offset));
    std::fs::write(&marker, b"").unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1]);
    assert!(report.torn_tail_bytes > 0);
    assert!(!marker.exists());
}

#[test]
fn row_11_an_empty_directory_gets_segment_one() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&dir.path().join("fresh"));
    let (s, report, _) = open(&opts);
    assert_eq!(report.segments, 1);
    assert_eq!(
        s.first_position(),
        Position {
            segment: 1,
            offset: HEADER_LEN
        }
    );
    assert!(seg(&dir.path().join("fresh"), 1).exists());
    assert!(read_all(&s).is_empty());
}

#[test]
fn unknown_record_kinds_survive_recovery_and_are_returned_to_readers_to_skip() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let (s, _, _) = open(&opts);
    s.append_blocking(vec![(RecordKind(77), payload(1))], false)
        .unwrap();
    append(&s, 2);
    s.close().unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(report.records, 2);
    let mut r = s.reader(s.first_position());
    assert_eq!(r.next_record().unwrap().unwrap().kind, RecordKind(77));
    assert_eq!(r.next_record().unwrap().unwrap().kind, RecordKind::ENVELOPE);
}

#[test]
fn row_12_a_segment_from_a_format_version_this_build_does_not_know_is_refused_untouched() {
    // A newer version, and 0, which no version of spoolgate wrote.
    for version in [3u16, 0] {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(dir.path());
        write_and_close(&opts, 3);
        let path = seg(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..10].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&bytes[0..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let metrics = std::sync::Arc::new(spoolgate::metrics::Metrics::new());
        let err = match spoolgate::spool::Spool::open(opts.clone(), metrics, None) {
            Ok(_) => panic!("a spool written by format version {version} was opened"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&format!("format version {version}")), "{err}");
        assert!(err.contains("00000000000000000001.seg"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the segment was changed"
        );
    }
}

#[test]
fn a_frame_longer_than_a_lowered_record_bytes_max_is_read_by_the_bound_its_segment_recorded() {
    // An operator lowers spool.record_bytes_max with a long record still in the newest
    // segment: read with the new bound alone, its frame would look torn and be zeroed.
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    let (s, _, _) = open(&opts);
    append(&s, 1);
    let long = {
        let mut p = payload(2).to_vec();
        p.resize(1000, b'.');
        bytes::Bytes::from(p)
    };
    s.append_blocking(vec![(RecordKind::ENVELOPE, long)], false)
        .unwrap();
    s.close().unwrap();
    drop(s);
    let before = std::fs::read(seg(dir.path(), 1)).unwrap();
    assert_eq!(
        u32::from_le_bytes(before[40..44].try_into().unwrap()),
        1024,
        "the header records the writer's bound"
    );

    opts.record_bytes_max = 512;
    let (s, report, _) = open(&opts);
    assert!(report.damaged.is_empty(), "{report:?}");
    assert_eq!(report.records, 2, "{report:?}");
    assert_eq!(read_all(&s), vec![1, 2]);
    // New appends keep to the new bound, and every record is still read after them.
    append(&s, 3);
    s.close().unwrap();
    drop(s);
    let (s, report, _) = open(&opts);
    assert!(report.damaged.is_empty(), "{report:?}");
    assert_eq!(read_all(&s), vec![1, 2, 3]);
}

#[test]
fn row_4_a_torn_tail_before_a_headerless_newest_segment_is_still_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 3);
    let end = positions[2].offset + spoolgate::spool::format::frame_len(payload(2).len());
    // A torn write at the end of segment 1, and segment 2 created by a rotation (or its
    // preparation) that crashed before the header: the kill came during both.
    let path = seg(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(end as usize);
    bytes.extend_from_slice(&[0xF7; 24]);
    std::fs::write(&path, bytes).unwrap();
    std::fs::write(seg(dir.path(), 2), vec![0u8; 4096]).unwrap();
    let (s, report, metrics) = open(&opts);
    assert!(!seg(dir.path(), 2).exists());
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert_eq!(report.torn_tail_bytes, 24);
    assert_eq!(metrics.recovery_corrupt_records_dropped_total.get(), 0);
    assert_eq!(read_all(&s), vec![0, 1, 2]);
    // Appends continue in segment 1, over zeros.
    assert_eq!(append(&s, 3).segment, 1);
    s.close().unwrap();
    drop(s);
    let (s, report, _) = open(&opts);
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert_eq!(read_all(&s), vec![0, 1, 2, 3]);
}

#[test]
fn row_6_a_damaged_header_before_a_headerless_newest_segment_sends_appends_to_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    write_and_close(&opts, 3);
    let path = seg(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    std::fs::write(seg(dir.path(), 2), vec![0u8; 4096]).unwrap();
    let (s, _, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1, 2]);
    assert_eq!(append(&s, 3).segment, 2);
}

#[test]
fn row_12_a_newer_segment_anywhere_refuses_the_spool_before_any_other_segment_is_changed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 300);
    let last = positions.last().unwrap().segment;
    // Segment 1 holds a refused batch that a start would zero; the newest is from a newer
    // format.
    let marker = dir
        .path()
        .join(format!("void-{:020}-{:020}", 1, positions[1].offset));
    std::fs::write(&marker, b"").unwrap();
    let path = seg(dir.path(), last);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..10].copy_from_slice(&3u16.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let first = std::fs::read(seg(dir.path(), 1)).unwrap();
    let metrics = std::sync::Arc::new(spoolgate::metrics::Metrics::new());
    assert!(spoolgate::spool::Spool::open(opts.clone(), metrics, None).is_err());
    assert_eq!(
        std::fs::read(seg(dir.path(), 1)).unwrap(),
        first,
        "segment 1 was changed"
    );
    assert!(marker.exists(), "the void marker was consumed");
}

#[test]
fn row_4_a_torn_tail_before_a_prepared_next_segment_is_still_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let (s, _, _) = open(&opts);
    let n = append_until_segment_two_is_prepared(&s);
    assert_eq!(s.durable_end().segment, 1);
    let end = s.durable_end().offset;
    s.close().unwrap();
    assert!(seg(dir.path(), 2).exists(), "segment 2 was prepared");
    // A torn write at the end of segment 1: a frame marker and junk, never acknowledged.
    let path = seg(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[end as usize..end as usize + 24].copy_from_slice(&[0xF7; 24]);
    std::fs::write(&path, bytes).unwrap();
    let (s, report, metrics) = open(&opts);
    assert_eq!(read_all(&s), (0..n).collect::<Vec<_>>());
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert_eq!(report.torn_tail_bytes, 24);
    assert_eq!(metrics.recovery_corrupt_records_dropped_total.get(), 0);
    // Appends continue, in the prepared segment.
    let p = append(&s, n);
    assert_eq!(p.segment, 2);
}

/// Rewrites segment `id`'s header as format version `version`, with a matching CRC.
fn set_version(dir: &std::path::Path, id: u64, version: u16) {
    let path = seg(dir, id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..10].copy_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
}

#[test]
fn row_13_a_spool_of_format_version_1_is_read_and_appends_go_on_in_a_new_version_2_segment() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 5);
    assert!(positions.iter().all(|p| p.segment == 1));
    // What a build from before 2026-12-04 left: a version 1 segment, the newest.
    set_version(dir.path(), 1, 1);
    let (s, report, _) = open(&opts);
    assert_eq!(report.records, 5);
    assert_eq!(read_all(&s), (0..5).collect::<Vec<u64>>());
    // A payload that is stored stuffed goes to a new segment, not after version 1 frames.
    let stuffed = bytes::Bytes::from_static(b"record-000005-\xf7SGF");
    let at = s
        .append_blocking(vec![(RecordKind::ENVELOPE, stuffed.clone())], false)
        .unwrap()[0];
    assert_eq!(at.segment, 2);
    s.close().unwrap();
    let header = |id| {
        spoolgate::spool::format::SegmentHeader::decode(
            &std::fs::read(seg(dir.path(), id)).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(header(1).version, 1);
    assert_eq!(header(2).version, spoolgate::spool::format::FORMAT_VERSION);
    // `inspect` names each segment's version, so an operator can tell a mixed spool.
    let listing = spoolgate::spool::inspect(dir.path()).unwrap().to_string();
    let line = |id: u64| {
        listing
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("segment {id:>6}")))
            .unwrap_or_else(|| panic!("no line for segment {id}: {listing}"))
            .to_string()
    };
    assert!(line(1).contains("header ok, version 1"), "{listing}");
    assert!(line(2).contains("header ok, version 2"), "{listing}");
    let (s, _, _) = open(&opts);
    let records = read_records(&s);
    assert_eq!(records.len(), 6);
    assert_eq!(records[5].2, stuffed.to_vec());
}

#[test]
fn row_13_an_empty_prepared_segment_of_format_version_1_becomes_version_2_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let (s, _, _) = open(&opts);
    let n = append_until_segment_two_is_prepared(&s);
    s.close().unwrap();
    set_version(dir.path(), 1, 1);
    set_version(dir.path(), 2, 1);
    let (s, _, _) = open(&opts);
    let at = append(&s, n);
    assert_eq!(at.segment, 2, "appends go on in the prepared segment");
    s.close().unwrap();
    assert!(!seg(dir.path(), 3).exists(), "no segment was created");
    let version = |id| {
        spoolgate::spool::format::SegmentHeader::decode(
            &std::fs::read(seg(dir.path(), id)).unwrap(),
        )
        .unwrap()
        .version
    };
    assert_eq!(version(1), 1);
    assert_eq!(version(2), spoolgate::spool::format::FORMAT_VERSION);
    let (s, report, _) = open(&opts);
    assert!(report.missing_segments.is_empty());
    assert_eq!(read_all(&s), (0..=n).collect::<Vec<u64>>());
}

#[test]
fn row_14_a_clean_close_and_every_start_record_the_durable_end_in_one_marker() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let (s, _, _) = open(&opts);
    assert_eq!(
        durable_markers(dir.path()),
        vec![durable_marker(s.durable_end())]
    );
    append(&s, 0);
    let end = s.durable_end();
    s.close().unwrap();
    assert_eq!(durable_markers(dir.path()), vec![durable_marker(end)]);
    let (s, report, _) = open(&opts);
    assert_eq!(durable_markers(dir.path()), vec![durable_marker(end)]);
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert_eq!(read_all(&s), vec![0]);
    assert_eq!(append(&s, 1).segment, end.segment, "appends go on in place");
}

#[test]
fn row_14_damage_to_the_last_record_before_a_clean_close_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 3);
    let (path, bytes) = flip_a_payload_bit(dir.path(), positions[2]);
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.segments[0].damaged.len(), 1, "{inspected:?}");
    assert_eq!(inspected.segments[0].tail_garbage_bytes, 0);
    let (s, report, metrics) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1]);
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].segment, 1);
    assert_eq!(report.damaged[0].offset, positions[2].offset);
    assert_eq!(report.damaged[0].records_lost, 1);
    assert_eq!(metrics.recovery_corrupt_records_dropped_total.get(), 1);
    assert_eq!(metrics.recovery_torn_tail_bytes_truncated_total.get(), 0);
    assert_eq!(
        std::fs::read(&path).unwrap()[..bytes.len()],
        bytes[..],
        "the damaged bytes are left as found"
    );
    // Appends do not go on over the damage: a new segment takes them.
    assert_eq!(append(&s, 7).segment, 2);
    s.close().unwrap();
    // Segment 1 is an older one now: its damaged tail is row 5, reported at every start.
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1, 7]);
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.torn_tail_bytes, 0);
}

#[test]
fn row_14_damage_found_by_a_start_that_was_then_killed_is_still_reported_and_never_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 3);
    let (path, bytes) = flip_a_payload_bit(dir.path(), positions[2]);
    // The start that finds it is killed before it appends anything.
    let (s, report, _) = open(&opts);
    assert_eq!(report.damaged.len(), 1);
    drop(s);
    let (s, report, _) = open(&opts);
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(append(&s, 7).segment, 2);
    assert_eq!(
        std::fs::read(&path).unwrap()[..bytes.len()],
        bytes[..],
        "nothing was appended over the damaged record"
    );
}

#[test]
fn row_14_after_a_kill_damage_before_the_starts_durable_end_is_corruption_and_after_it_a_torn_tail()
{
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    write_and_close(&opts, 3);
    // A run that was killed: its start recorded the durable end after the first three.
    let second = write_and_crash(&opts, 2);
    assert_eq!(
        durable_markers(dir.path()),
        vec![durable_marker(Position {
            segment: 1,
            offset: second[0].offset
        })]
    );
    flip_a_payload_bit(dir.path(), second[1]);
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1, 2, 0]);
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert!(
        report.torn_tail_bytes > 0,
        "after the start's durable end: torn"
    );
    drop(s);

    // Two killed runs, no clean close at all: the second start's durable end is after the
    // first run's records.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let first = write_and_crash(&opts, 3);
    write_and_crash(&opts, 2);
    let path = seg(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    // The third record of the first run, and the second run's two records after it: nothing
    // valid follows the damage, but it starts before the durable end.
    bytes[first[2].offset as usize + 20..].fill(0xAA);
    std::fs::write(&path, &bytes).unwrap();
    let (_s, report, _) = open(&opts);
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].offset, first[2].offset);
}

#[test]
fn row_14_the_last_records_before_a_clean_close_read_as_zeros_are_reported_lost_and_left_as_found()
{
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 3);
    let path = seg(dir.path(), 1);
    let bytes = std::fs::read(&path).unwrap();
    // The file cut where the last record began: its blocks lost, or the file truncated.
    let cut = bytes[..positions[2].offset as usize].to_vec();
    std::fs::write(&path, &cut).unwrap();
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.segments[0].damaged.len(), 1, "{inspected:?}");
    let (s, report, metrics) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1]);
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].offset, positions[2].offset);
    assert_eq!(
        report.damaged[0].len_bytes,
        bytes.len() as u64 - positions[2].offset
    );
    assert_eq!(
        inspected.segments[0].damaged[0].len_bytes,
        report.damaged[0].len_bytes
    );
    assert_eq!(metrics.recovery_corrupt_records_dropped_total.get(), 1);
    assert_eq!(append(&s, 7).segment, 2);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        cut,
        "no rotation frame is written over the reported range"
    );
}

#[test]
fn row_14_zeros_where_the_durable_end_was_are_reported_with_a_prepared_segment_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let (s, _, _) = open(&opts);
    // Segment 1 full, segment 2 holding records and half full, segment 3 prepared.
    let mut n = 0;
    let mut in_first = Vec::new();
    while s.durable_end().segment < 2 || s.durable_end().offset < 2600 {
        if append(&s, n).segment == 1 {
            in_first.push(n);
        }
        n += 1;
    }
    let end = s.durable_end();
    assert_eq!(end.segment, 2);
    s.close().unwrap();
    assert!(seg(dir.path(), 3).exists(), "segment 3 was prepared");
    // Every record of segment 2 reads as zeros now, as a prepared segment would.
    let path = seg(dir.path(), 2);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[HEADER_LEN as usize..end.offset as usize].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), in_first);
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].segment, 2);
    assert_eq!(report.damaged[0].offset, HEADER_LEN);
    assert_eq!(report.damaged[0].len_bytes, end.offset - HEADER_LEN);
    assert_eq!(
        inspected.segments[1].damaged, report.damaged,
        "{inspected:?}"
    );
    // Appends go on in the prepared segment, and segment 2 gets no rotation frame.
    assert_eq!(append(&s, n).segment, 3);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn row_14_damage_to_the_last_record_is_reported_with_a_prepared_segment_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let (s, _, _) = open(&opts);
    let n = append_until_segment_two_is_prepared(&s);
    let last = append(&s, n);
    s.close().unwrap();
    flip_a_payload_bit(dir.path(), last);
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), (0..n).collect::<Vec<_>>());
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].offset, last.offset);
    assert_eq!(
        inspected.segments[0].damaged, report.damaged,
        "{inspected:?}"
    );
    assert_eq!(append(&s, n + 1).segment, 2);
}

#[test]
fn row_14_the_segment_a_clean_close_appended_to_removed_is_reported_missing() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    write_and_close(&opts, 3);
    std::fs::remove_file(seg(dir.path(), 1)).unwrap();
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.missing_segments, vec![[1, 1]]);
    let (s, report, metrics) = open(&opts);
    assert_eq!(report.missing_segments, vec![[1, 1]]);
    assert_eq!(metrics.recovery_segments_missing_total.get(), 1);
    assert!(read_all(&s).is_empty());
    assert_eq!(
        append(&s, 7).segment,
        2,
        "the lost segment's id is not reused"
    );
}

#[test]
fn row_14_the_durable_ends_segment_removed_with_a_prepared_one_after_it_is_reported_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let (s, _, _) = open(&opts);
    append_until_segment_two_is_prepared(&s);
    s.close().unwrap();
    std::fs::remove_file(seg(dir.path(), 1)).unwrap();
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.missing_segments, vec![[1, 1]]);
    let (s, report, _) = open(&opts);
    assert_eq!(report.missing_segments, vec![[1, 1]]);
    assert!(read_all(&s).is_empty());
    assert_eq!(
        append(&s, 7).segment,
        2,
        "appends go on in the prepared one"
    );
}

#[test]
fn row_14_a_missing_newest_segment_that_a_rotation_frame_also_names_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let positions = write_and_close(&opts, 300);
    let last = positions.last().unwrap().segment;
    std::fs::remove_file(seg(dir.path(), last)).unwrap();
    let (_s, report, metrics) = open(&opts);
    assert_eq!(report.missing_segments, vec![[last, last]]);
    assert_eq!(metrics.recovery_segments_missing_total.get(), 1);
}

#[test]
fn row_14_compaction_moves_the_durable_end_past_the_segments_it_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.durability = spoolgate::spool::Durability::Never;
    let (s, _, _) = open(&opts);
    let mut n = 0;
    while s.durable_end().segment < 2 {
        append(&s, n);
        n += 1;
    }
    assert_eq!(
        durable_markers(dir.path()),
        vec![durable_marker(Position {
            segment: 1,
            offset: HEADER_LEN
        })]
    );
    s.remove_segments_below(2).unwrap();
    assert_eq!(
        durable_markers(dir.path()),
        vec![durable_marker(Position {
            segment: 2,
            offset: HEADER_LEN
        })]
    );
    drop(s);
    // A power loss before segment 2's first fdatasync: it holds its header only.
    let path = seg(dir.path(), 2);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..HEADER_LEN as usize]).unwrap();
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert!(inspected.missing_segments.is_empty(), "{inspected:?}");
    let (_s, report, _) = open(&opts);
    assert!(
        report.missing_segments.is_empty(),
        "segment 1 was compacted, not lost: {report:?}"
    );
    assert!(report.damaged.is_empty(), "{report:?}");
}

#[test]
fn a_file_cut_inside_the_last_frames_padding_keeps_the_frame_and_appends_stay_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    // Record 3's payload is 17 bytes: its frame ends in 7 bytes of padding.
    assert_eq!(payload(3).len(), 17);
    write_and_crash(&opts, 4);
    let path = seg(dir.path(), 1);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1, 2, 3]);
    assert_eq!(report.torn_tail_bytes, 0);
    let p = append(&s, 4);
    assert_eq!(p.offset % 8, 0, "{p:?}");
    drop(s);
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 1, 2, 3, 4]);
    assert!(report.damaged.is_empty(), "{report:?}");
}
