//! Failures through the filesystem seam: ENOSPC, failed fdatasync, the directory lock.

mod spool_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use spool_common::*;
use spoolgate::spool::fs::{FaultFs, Faults, StdFs};
use spoolgate::spool::{RecordKind, SpoolError};

#[test]
fn enospc_during_a_write_fails_that_batch_cleanly_and_the_spool_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    append(&s, 0);
    faults.enospc_writes.store(true, Ordering::SeqCst);
    let err = s
        .append_blocking(
            vec![
                (RecordKind::ENVELOPE, payload(1)),
                (RecordKind::ENVELOPE, payload(2)),
            ],
            false,
        )
        .unwrap_err();
    assert!(matches!(err, SpoolError::Full(_)), "{err}");
    assert!(s.poison_reason().is_none());
    assert_eq!(
        read_all(&s),
        vec![0],
        "nothing of the failed batch is readable"
    );
    faults.enospc_writes.store(false, Ordering::SeqCst);
    append(&s, 3);
    assert_eq!(read_all(&s), vec![0, 3]);
    s.close().unwrap();
    // Nor does anything of it come back after a restart.
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), vec![0, 3]);
    assert!(report.damaged.is_empty());
}

#[test]
fn enospc_while_creating_a_preallocated_segment_fails_the_batch_and_a_later_rotation_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    let mut n = 0;
    while s.segments().len() == 1 && n < 30 {
        append(&s, n);
        n += 1;
    }
    let before = read_all(&s);
    // The disk is full for new files: the next rotation hits ENOSPC while zero-filling.
    faults.enospc_new_files.store(true, Ordering::SeqCst);
    let mut full = None;
    for m in 100..200 {
        match s.append_blocking(vec![(RecordKind::ENVELOPE, payload(m))], false) {
            Ok(_) => continue,
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    assert!(matches!(full, Some(SpoolError::Full(_))), "{full:?}");
    assert!(s.poison_reason().is_none());
    faults.enospc_new_files.store(false, Ordering::SeqCst);
    append(&s, 500);
    let after = read_all(&s);
    assert!(after.starts_with(&before));
    assert_eq!(*after.last().unwrap(), 500);
}

#[test]
fn no_file_descriptor_for_a_new_segment_refuses_the_batch_without_poisoning_and_a_later_one_rotates(
) {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    // Out of descriptors from now on: the first append that needs a new segment is refused.
    faults.emfile_creates.store(true, Ordering::SeqCst);
    let mut busy = None;
    let mut accepted = Vec::new();
    for n in 0..200 {
        match s.append_blocking(vec![(RecordKind::ENVELOPE, payload(n))], false) {
            Ok(_) => accepted.push(n),
            Err(e) => {
                busy = Some(e);
                break;
            }
        }
    }
    assert!(matches!(busy, Some(SpoolError::Busy(_))), "{busy:?}");
    assert!(
        s.poison_reason().is_none(),
        "nothing was lost, so no poison"
    );
    assert_eq!(read_all(&s), accepted);
    // Descriptors free again: the next append rotates and is written.
    faults.emfile_creates.store(false, Ordering::SeqCst);
    append(&s, 500);
    assert_eq!(s.segments().len(), 2);
    accepted.push(500);
    assert_eq!(read_all(&s), accepted);
    s.close().unwrap();
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), accepted);
    assert!(report.damaged.is_empty());
}

#[test]
fn no_descriptor_to_fsync_the_directory_of_a_new_segment_removes_it_and_refuses_without_poison() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    faults.emfile_dir_syncs.store(true, Ordering::SeqCst);
    let mut busy = None;
    for n in 0..200 {
        if let Err(e) = s.append_blocking(vec![(RecordKind::ENVELOPE, payload(n))], false) {
            busy = Some(e);
            break;
        }
    }
    assert!(matches!(busy, Some(SpoolError::Busy(_))), "{busy:?}");
    assert!(s.poison_reason().is_none());
    // The segment it made and could not make durable is gone again.
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    faults.emfile_dir_syncs.store(false, Ordering::SeqCst);
    append(&s, 500);
    assert_eq!(s.segments().len(), 2);
}

#[test]
fn a_segment_a_failed_create_could_not_remove_is_replaced_at_the_next_attempt_without_poison() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    // The disk is full for new files, and removing the partial one fails too: it stays.
    faults.enospc_new_files.store(true, Ordering::SeqCst);
    faults.fail_removes.store(true, Ordering::SeqCst);
    let mut accepted = Vec::new();
    let mut full = None;
    for n in 0..200 {
        match s.append_blocking(vec![(RecordKind::ENVELOPE, payload(n))], false) {
            Ok(_) => accepted.push(n),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    assert!(matches!(full, Some(SpoolError::Full(_))), "{full:?}");
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".seg")
        })
        .count();
    assert_eq!(leftovers, 2, "the partial segment could not be removed");
    // Room again: the next rotation replaces the leftover instead of poisoning on it.
    faults.enospc_new_files.store(false, Ordering::SeqCst);
    faults.fail_removes.store(false, Ordering::SeqCst);
    append(&s, 500);
    accepted.push(500);
    assert!(s.poison_reason().is_none());
    assert_eq!(s.segments().len(), 2);
    assert_eq!(read_all(&s), accepted);
}

/// Record `n` with a payload of `len` bytes.
fn sized(n: u64, len: usize) -> bytes::Bytes {
    let mut p = payload(n).to_vec();
    p.resize(len, b'.');
    bytes::Bytes::from(p)
}

#[test]
fn a_request_queued_behind_one_whose_fdatasync_failed_is_refused_even_when_it_rotates() {
    // Two requests taken by the writer together: the first fits the active segment and its
    // fdatasync fails; the second needs a new segment. A second fdatasync of the same file
    // usually succeeds (the kernel reports a writeback error once), so the rotation must not
    // go ahead and the second request must not be acknowledged.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    let append_sized = |s: &spoolgate::spool::Spool, n: u64, len: usize| {
        s.append_blocking(vec![(RecordKind::ENVELOPE, sized(n, len))], false)
    };
    for n in 0..3 {
        append_sized(&s, n, 900).unwrap();
    }
    // Header 64 + 3 frames of 920: the next starts at 2824. After the 120-byte frame of
    // request 3 and the 920 of request 4, request 5 no longer fits a 4096-byte segment with
    // its 40 bytes kept for the rotation frame.
    faults.hold_syncs.store(true, Ordering::SeqCst);
    faults.syncs_until_failure.store(2, Ordering::SeqCst);
    std::thread::scope(|scope| {
        let held = scope.spawn(|| append_sized(&s, 3, 100));
        wait_until("the writer to hold request 3's fdatasync", || {
            faults.syncs_held.load(Ordering::SeqCst) == 1
        });
        let fits = scope.spawn(|| append_sized(&s, 4, 900));
        wait_until("request 4 queued", || s.queued_requests() == 1);
        let rotates = scope.spawn(|| append_sized(&s, 5, 900));
        wait_until("request 5 queued", || s.queued_requests() == 2);
        faults.hold_syncs.store(false, Ordering::SeqCst);
        let held = held.join().unwrap().unwrap();
        assert_eq!((held[0].segment, held[0].offset), (1, 2824));
        let fits = fits.join().unwrap().unwrap_err();
        assert!(matches!(fits, SpoolError::Poisoned(_)), "{fits}");
        let rotates = rotates.join().unwrap();
        assert!(
            matches!(rotates, Err(SpoolError::Poisoned(_))),
            "a request behind a failed fdatasync was answered {rotates:?}"
        );
    });
    assert_eq!(s.segments().len(), 1, "no rotation after the poison");
    assert_eq!(read_all(&s), vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn a_panic_on_the_writer_thread_poisons_the_spool_instead_of_leaving_it_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _, _) = open(&options(dir.path()));
    // A commit hook runs on the writer thread: one that panics stands for any bug there.
    let failed = s
        .append_then(
            vec![(RecordKind::ENVELOPE, payload(1))],
            Box::new(|_: &[spoolgate::spool::Position]| panic!("a hook that fails")),
        )
        .await;
    assert!(matches!(failed, Err(SpoolError::Poisoned(_))), "{failed:?}");
    let reason = s
        .poison_reason()
        .expect("poisoned before the append returned");
    assert!(reason.contains("writer thread"), "{reason}");
    let err = s
        .append(vec![(RecordKind::ENVELOPE, payload(2))])
        .await
        .unwrap_err();
    assert!(matches!(err, SpoolError::Poisoned(_)), "{err}");
    // Nor is closing it a clean close (the daemon would exit 0 with a poisoned spool).
    let closed = tokio::task::spawn_blocking(move || s.close())
        .await
        .unwrap();
    assert!(matches!(closed, Err(SpoolError::Poisoned(_))), "{closed:?}");
}

#[test]
fn a_failed_fdatasync_poisons_the_spool_and_the_refused_batch_never_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    {
        let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
        append(&s, 0);
        append(&s, 1);
        faults.syncs_until_failure.store(1, Ordering::SeqCst);
        let err = s
            .append_blocking(vec![(RecordKind::ENVELOPE, payload(2))], false)
            .unwrap_err();
        assert!(matches!(err, SpoolError::Poisoned(_)), "{err}");
        assert!(s.poison_reason().unwrap().contains("fdatasync"));
        // Every later append is refused too: no retry-and-ignore.
        let err = s
            .append_blocking(vec![(RecordKind::ENVELOPE, payload(3))], false)
            .unwrap_err();
        assert!(matches!(err, SpoolError::Poisoned(_)));
        assert!(
            matches!(s.close(), Err(SpoolError::Poisoned(_))),
            "close reports the poison"
        );
    }
    let (s, _, _) = open(&opts);
    assert_eq!(
        read_all(&s),
        vec![0, 1],
        "the refused record must not be recovered and forwarded"
    );
    append(&s, 4);
    assert_eq!(read_all(&s), vec![0, 1, 4]);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let (s, _, _) = open(&opts);
    let err = spoolgate::spool::Spool::open(
        opts.clone(),
        Arc::new(spoolgate::metrics::Metrics::new()),
        None,
    )
    .err()
    .expect("second open must fail");
    assert!(matches!(err, SpoolError::Locked(_)), "{err}");
    s.close().unwrap();
    drop(s);
    let (s2, _, _) = open(&opts);
    drop(s2);
}

#[test]
fn records_over_the_bound_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let (s, _, _) = open(&opts);
    let big = bytes::Bytes::from(vec![b'x'; 2000]);
    let err = s
        .append_blocking(
            vec![
                (RecordKind::ENVELOPE, payload(0)),
                (RecordKind::ENVELOPE, big),
            ],
            false,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        SpoolError::TooLarge {
            len: 2000,
            max: 1024
        }
    ));
    assert!(read_all(&s).is_empty());
}

#[test]
fn a_record_whose_stored_length_is_over_the_bound_is_refused_though_its_payload_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let (s, _, _) = open(&opts);
    // 600 bytes, 500 of them 0xF7: stored stuffed as 1100 bytes (spool-format.md §3).
    let mut p = payload(1).to_vec();
    p.resize(100, b'x');
    p.resize(600, 0xF7);
    let err = s
        .append_blocking(
            vec![
                (RecordKind::ENVELOPE, payload(0)),
                (RecordKind::ENVELOPE, bytes::Bytes::from(p.clone())),
            ],
            false,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        SpoolError::TooLarge {
            len: 1100,
            max: 1024
        }
    ));
    assert!(read_all(&s).is_empty());
    // At 400 bytes 0xF7 it fits stored (1000), and reads back as it was appended.
    p.truncate(500);
    s.append_blocking(
        vec![(RecordKind::ENVELOPE, bytes::Bytes::from(p.clone()))],
        false,
    )
    .unwrap();
    let records = read_records(&s);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].2, p);
}

#[test]
fn interval_and_never_modes_acknowledge_without_waiting_for_fdatasync_and_close_flushes() {
    // An interval of an hour: no tick comes during the test, so every fdatasync counted is
    // one the test asked for.
    for durability in [
        spoolgate::spool::Durability::Interval(std::time::Duration::from_secs(3600)),
        spoolgate::spool::Durability::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path());
        opts.durability = durability;
        let metrics = Arc::new(spoolgate::metrics::Metrics::new());
        let (s, _) = spoolgate::spool::Spool::open(opts.clone(), metrics.clone(), None).unwrap();
        let syncs = || metrics.spool_fsync_duration_seconds.get_sample_count();
        let syncs_before = syncs();
        append(&s, 0);
        assert_eq!(
            syncs(),
            syncs_before,
            "{durability:?}: acknowledged unsynced"
        );
        s.append_blocking(vec![(RecordKind::ENVELOPE, payload(1))], true)
            .unwrap();
        assert_eq!(
            syncs(),
            syncs_before + 1,
            "{durability:?}: a synced append always fdatasyncs"
        );
        append(&s, 2);
        assert_eq!(syncs(), syncs_before + 1, "{durability:?}");
        s.close().unwrap();
        assert_eq!(
            syncs(),
            syncs_before + 2,
            "{durability:?}: close fdatasyncs what is unsynced"
        );
        let (s, _, _) = open(&opts);
        assert_eq!(read_all(&s), vec![0, 1, 2]);
    }
}

/// Waits until `cond` holds, failing the test after a minute (a hang, not a timing check).
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let started = std::time::Instant::now();
    while !cond() {
        assert!(
            started.elapsed().as_secs() < 60,
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn in_interval_mode_the_ticker_fdatasyncs_what_was_acknowledged_unsynced() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.durability = spoolgate::spool::Durability::Interval(std::time::Duration::from_millis(1));
    let metrics = Arc::new(spoolgate::metrics::Metrics::new());
    let faults = Faults::new();
    let (s, _) = open_checked(
        &opts,
        Arc::new(FaultFs::new(StdFs, faults.clone())),
        metrics.clone(),
    );
    let syncs = || metrics.spool_fsync_duration_seconds.get_sample_count();
    // Held fdatasyncs show that the acknowledgement did not wait for one.
    faults.hold_syncs.store(true, Ordering::SeqCst);
    let held_before = faults.syncs_held.load(Ordering::SeqCst);
    append(&s, 0);
    // Nobody asks for a sync (a fresh spool has nothing unsynced before this append): interval
    // mode starts this one by itself, at the ticker's request or finding the interval past.
    wait_until("the ticker's fdatasync", || {
        faults.syncs_held.load(Ordering::SeqCst) > held_before
    });
    let before = syncs();
    faults.hold_syncs.store(false, Ordering::SeqCst);
    wait_until("the ticker's fdatasync to finish", || syncs() > before);
    assert!(s.poison_reason().is_none());
}

#[test]
fn in_interval_mode_a_failed_fdatasync_of_the_ticker_poisons_and_refuses_further_appends() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.durability = spoolgate::spool::Durability::Interval(std::time::Duration::from_millis(1));
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    // A fresh spool has nothing unsynced, so the first fdatasync from here is the one interval
    // mode makes for this append, after acknowledging it (after write(2), as the mode
    // promises). It fails, and the spool must not go on as if the record were safe.
    faults.syncs_until_failure.store(1, Ordering::SeqCst);
    append(&s, 0);
    wait_until("the poison", || s.poison_reason().is_some());
    assert!(s.poison_reason().unwrap().contains("fdatasync"));
    let err = s
        .append_blocking(vec![(RecordKind::ENVELOPE, payload(1))], false)
        .unwrap_err();
    assert!(matches!(err, SpoolError::Poisoned(_)), "{err}");
}

#[test]
fn dropping_an_interval_mode_spool_without_close_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.durability = spoolgate::spool::Durability::Interval(std::time::Duration::from_millis(1));
    let (s, _, _) = open(&opts);
    append(&s, 7);
    // Dropping joins the writer thread; with a ticker keeping the channel open this hung.
    drop(s);
    let (s, _, _) = open(&opts);
    assert_eq!(read_all(&s), vec![7]);
}

/// Records whether it ran or was dropped without running.
struct HookProbe {
    ran: Arc<std::sync::atomic::AtomicBool>,
    dropped_unrun: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for HookProbe {
    fn drop(&mut self) {
        if !self.ran.load(Ordering::SeqCst) {
            self.dropped_unrun.store(true, Ordering::SeqCst);
        }
    }
}

#[test]
fn a_commit_hook_runs_before_its_records_are_visible_and_never_for_a_refused_append() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    append(&s, 1);

    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dropped_unrun = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen_end = Arc::new(std::sync::Mutex::new(None));
    let probe = HookProbe {
        ran: ran.clone(),
        dropped_unrun: dropped_unrun.clone(),
    };
    let (spool, seen) = (s.clone(), seen_end.clone());
    let hook: spoolgate::spool::CommitHook = Box::new(move |positions| {
        // What a reader could see at this moment: the durable end must not cover the record.
        *seen.lock().unwrap() = Some((spool.durable_end(), positions[0]));
        probe.ran.store(true, Ordering::SeqCst);
    });
    let positions = rt
        .block_on(s.append_then(vec![(RecordKind::ENVELOPE, payload(2))], hook))
        .unwrap();
    let (end_then, at) = seen_end.lock().unwrap().expect("the hook ran");
    assert_eq!(at, positions[0]);
    assert!(
        end_then <= at,
        "durable end {end_then:?} already covered {at:?}"
    );
    assert!(s.durable_end() > at);
    assert!(ran.load(Ordering::SeqCst) && !dropped_unrun.load(Ordering::SeqCst));

    // A refused append (ENOSPC) drops its hook without running it, before it answers.
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dropped_unrun = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = HookProbe {
        ran: ran.clone(),
        dropped_unrun: dropped_unrun.clone(),
    };
    faults.enospc_writes.store(true, Ordering::SeqCst);
    let result = rt.block_on(s.append_then(
        vec![(RecordKind::ENVELOPE, payload(3))],
        Box::new(move |_| probe.ran.store(true, Ordering::SeqCst)),
    ));
    assert!(matches!(result, Err(SpoolError::Full(_))), "{result:?}");
    assert!(!ran.load(Ordering::SeqCst) && dropped_unrun.load(Ordering::SeqCst));
}

/// Appends numbered records from `n` on while the next one still fits segment 1 with room for
/// the rotation frame: the append after the last of them rotates. Returns the next number.
fn fill_segment_one(s: &spoolgate::spool::Spool, opts: &spoolgate::spool::SpoolOptions) -> u64 {
    use spoolgate::spool::format::{frame_len, ROTATION_FRAME_BYTES_MAX};
    let mut n = 0;
    while s.durable_end().offset + frame_len(payload(n).len()) + ROTATION_FRAME_BYTES_MAX
        <= opts.segment_bytes_max
    {
        append(s, n);
        n += 1;
    }
    assert_eq!(s.durable_end().segment, 1);
    n
}

#[test]
fn no_room_for_a_rotation_frame_costs_only_the_frame_and_the_spool_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    let n = fill_segment_one(&s, &opts);
    // The filesystem has no room past segment 1's data: the rotation frame's write fails
    // half-way, while segment 2 (whose bytes lie below that offset) takes the record.
    faults
        .enospc_from_offset
        .store(s.durable_end().offset, Ordering::SeqCst);
    assert_eq!(append(&s, n).segment, 2);
    faults.enospc_from_offset.store(u64::MAX, Ordering::SeqCst);
    assert!(s.poison_reason().is_none());
    assert_eq!(read_all(&s), (0..=n).collect::<Vec<_>>());
    s.close().unwrap();
    let inspected = spoolgate::spool::inspect(dir.path()).unwrap();
    assert_eq!(inspected.segments[0].records.get("rotation"), None);
    assert_eq!(
        inspected.segments[0].tail_garbage_bytes, 0,
        "the half frame was undone"
    );
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), (0..=n).collect::<Vec<_>>());
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert!(report.missing_segments.is_empty());
}

#[test]
fn a_failed_fdatasync_of_a_rotation_frame_poisons_the_spool_and_the_next_start_drops_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let n = {
        let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
        let n = fill_segment_one(&s, &opts);
        // The rotation syncs segment 2's header first, then segment 1 with its rotation frame.
        faults.syncs_until_failure.store(2, Ordering::SeqCst);
        let err = s
            .append_blocking(vec![(RecordKind::ENVELOPE, payload(n))], false)
            .unwrap_err();
        assert!(matches!(err, SpoolError::Poisoned(_)), "{err}");
        assert!(s.poison_reason().unwrap().contains("before rotation"));
        assert!(
            matches!(s.close(), Err(SpoolError::Poisoned(_))),
            "close reports the poison"
        );
        n
    };
    let (s, report, _) = open(&opts);
    assert_eq!(read_all(&s), (0..n).collect::<Vec<_>>());
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert!(report.missing_segments.is_empty());
    assert!(
        report.torn_tail_bytes > 0,
        "the void marker zeroed the frame"
    );
    append(&s, n + 1);
    assert_eq!(read_all(&s), (0..n).chain([n + 1]).collect::<Vec<_>>());
}

#[test]
fn a_segment_compaction_fails_to_remove_stays_in_the_spool_so_no_later_pass_leaves_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    for n in 0..300 {
        append(&s, n);
    }
    let active = s.durable_end().segment;
    assert!(active >= 4);
    faults.fail_removes.store(true, Ordering::SeqCst);
    let err = s.remove_segments_below(3).unwrap_err();
    assert!(err.to_string().contains("remove segment"), "{err}");
    assert_eq!(
        s.segments()[0].id,
        1,
        "segment 1 is still on disk, so still the spool's"
    );
    faults.fail_removes.store(false, Ordering::SeqCst);
    // The next pass deletes from the oldest again: a prefix, never a gap.
    s.remove_segments_below(active).unwrap();
    s.close().unwrap();
    drop(s);
    let (_, report, _) = open(&opts);
    assert!(
        report.missing_segments.is_empty(),
        "{:?}",
        report.missing_segments
    );
}

#[test]
fn a_start_makes_the_active_segment_durable_and_refuses_to_open_if_it_cannot() {
    // Whether the bytes a start finds were synced cannot be seen from here (a killed process's
    // unsynced writes read back like synced ones), so the start must fdatasync the active
    // segment in any case: this one's fails, and the spool must not open.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    {
        let (s, _, _) = open(&opts);
        append(&s, 0);
    }
    let faults = Faults::new();
    faults.syncs_until_failure.store(1, Ordering::SeqCst);
    let opened = spoolgate::spool::Spool::open_with_fs(
        opts.clone(),
        Arc::new(FaultFs::new(StdFs, faults.clone())),
        Arc::new(spoolgate::metrics::Metrics::new()),
        None,
    );
    match opened {
        Err(SpoolError::Io { op, .. }) => assert_eq!(op, "fdatasync"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a start whose fdatasync of the active segment failed opened the spool"),
    }
}

#[test]
fn a_deletion_that_fails_part_way_counts_and_fsyncs_what_it_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let metrics = Arc::new(spoolgate::metrics::Metrics::new());
    let (s, _) = open_checked(
        &opts,
        Arc::new(FaultFs::new(StdFs, faults.clone())),
        metrics.clone(),
    );
    for n in 0..300 {
        append(&s, n);
    }
    assert!(s.durable_end().segment >= 4);
    let first = s.segments()[0].clone();
    // The durable-end marker (segment 1's, from the start) moves to segment 3 first: one
    // removal and one directory fsync of its own. Then segment 1 goes, segment 2 does not.
    faults.removes_until_failure.store(3, Ordering::SeqCst);
    let syncs_before = faults.dir_syncs.load(Ordering::SeqCst);
    let err = s.remove_segments_below(3).unwrap_err();
    assert!(err.to_string().contains("remove segment"), "{err}");
    assert_eq!(s.segments()[0].id, 2);
    assert!(!first.path.exists());
    assert_eq!(metrics.compaction_segments_deleted_total.get(), 1);
    assert_eq!(
        metrics.compaction_bytes_reclaimed_total.get(),
        first.file_bytes
    );
    assert_eq!(
        faults.dir_syncs.load(Ordering::SeqCst),
        syncs_before + 2,
        "the marker moved and the deletion that happened are made durable"
    );
    assert_eq!(
        metrics.spool_segments_active.get(),
        s.segments().len() as i64
    );
}

#[test]
fn a_full_disk_the_preparing_helper_met_is_tried_again_when_the_segment_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.preallocate = true;
    let faults = Faults::new();
    let metrics = Arc::new(spoolgate::metrics::Metrics::new());
    let (s, _) = open_checked(
        &opts,
        Arc::new(FaultFs::new(StdFs, faults.clone())),
        metrics.clone(),
    );
    // Full while the helper prepares the next segment, which it starts once the active one
    // is half full; it meets the full disk and removes what it made.
    faults.enospc_new_files.store(true, Ordering::SeqCst);
    let mut n = 0;
    while s.durable_end().offset < opts.segment_bytes_max / 2 {
        append(&s, n);
        n += 1;
    }
    let started = std::time::Instant::now();
    while metrics.spool_full_errors_total.get() == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the helper never met the full disk"
        );
        std::thread::yield_now();
    }
    // Room again before the rotation: it must not refuse the batch for the helper's past.
    faults.enospc_new_files.store(false, Ordering::SeqCst);
    let mut m = 100;
    while s.segments().len() == 1 {
        s.append_blocking(vec![(RecordKind::ENVELOPE, payload(m))], false)
            .unwrap_or_else(|e| panic!("refused after room came back: {e}"));
        m += 1;
        assert!(m < 1_000, "no rotation happened");
    }
    assert!(s.poison_reason().is_none());
}

#[test]
fn each_segment_deletion_is_made_durable_before_the_next_so_only_a_prefix_can_be_gone() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let faults = Faults::new();
    let (s, _) = open_fs(&opts, Arc::new(FaultFs::new(StdFs, faults.clone())));
    for n in 0..300 {
        append(&s, n);
    }
    assert!(s.durable_end().segment >= 5);
    let syncs_before = faults.dir_syncs.load(Ordering::SeqCst);
    s.remove_segments_below(3).unwrap();
    assert_eq!(
        faults.dir_syncs.load(Ordering::SeqCst),
        syncs_before + 1 + 2,
        "one directory fsync for the durable-end marker moved past them, then one per \
         segment deleted"
    );
    // The directory cannot be fsync'd: the first deletion is attempted, the next is not, so
    // a crash can never keep a later segment's unlink without an earlier one's.
    let third = s.segments()[0].clone();
    let fourth = s.segments()[1].clone();
    assert_eq!((third.id, fourth.id), (3, 4));
    faults.emfile_dir_syncs.store(true, Ordering::SeqCst);
    let err = s.remove_segments_below(5).unwrap_err();
    assert!(err.to_string().contains("fsync directory"), "{err}");
    assert!(!third.path.exists());
    assert!(
        fourth.path.exists(),
        "not removed before the first was durable"
    );
    assert_eq!(s.segments()[0].id, 4);
}
