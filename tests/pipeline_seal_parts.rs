//! A batch whose seal is larger than one spool record is sealed in several SEALED records.
//! They are written one at a time, each durable before the next: written together under one
//! fdatasync, a power loss before it could keep a later record without an earlier one, and
//! the restart would then seal the earlier envelopes afresh after the later ones, leaving a
//! gap and a reordering in their stream's chain.

mod pipeline_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pipeline_common::{append, quick_retries, wait_until, RecordingSink};
use spoolgate::spool::RecordKind;

/// SEALED frames in the spool directory as the disk's page cache holds them now.
fn sealed_frames(dir: &std::path::Path) -> usize {
    let mut sealed = 0;
    spoolgate::spool::for_each_frame(&dir.join("spool"), |_, kind, _| {
        if kind == RecordKind::SEALED.0 {
            sealed += 1;
        }
        Ok::<(), spoolgate::spool::SpoolError>(())
    })
    .unwrap();
    sealed
}

/// `delivered` is one stream's records 1 to `n`, in order, each linked to the one before.
fn assert_one_whole_chain(delivered: &[spoolgate::chain::ForwardRecord], n: usize) {
    let seqs: Vec<u64> = delivered.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=n as u64).collect::<Vec<_>>(),
        "gapless, in order"
    );
    for pair in delivered.windows(2) {
        assert_eq!(
            pair[1].prev_hash, pair[0].hash,
            "each record links to the one before"
        );
    }
}

/// What a restart on `spool` does: the stream heads taken from the spool by the start-up scan,
/// a pipeline started with them, run until `n` records are delivered, then stopped. Returns
/// what was delivered.
async fn restart_and_deliver(
    spool: &spoolgate::spool::Spool,
    ring: Arc<spoolgate::ring::Ring>,
    metrics: &Arc<spoolgate::metrics::Metrics>,
    dir: &std::path::Path,
    n: usize,
) -> Vec<spoolgate::chain::ForwardRecord> {
    let mut heads = spoolgate::chain::Chains::new();
    let restarted = spoolgate::forward::ledger::Ledger::default();
    spoolgate::forward::ledger::scan(spool, &restarted, 0, |_, _| {}, |s, h| heads.advance(s, h))
        .unwrap();
    let sink = Arc::new(RecordingSink::default());
    let pipeline = pipeline_common::start_sharing(
        spool,
        ring,
        metrics,
        sink.clone(),
        quick_retries(),
        dir,
        Arc::new(std::sync::Mutex::new(heads)),
        Arc::new(spoolgate::forward::ledger::Ledger::default()),
        None,
    );
    wait_until("every record delivered", || {
        sink.delivered.lock().unwrap().len() >= n
    })
    .await;
    pipeline.shutdown().await;
    let delivered = sink.delivered.lock().unwrap().clone();
    delivered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_of_several_records_is_written_one_record_at_a_time_each_durable_before_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, ring, metrics, faults) = pipeline_common::open_faulty_spool(dir.path());
    // 300 envelopes of one stream, about 1.2 KB each sealed: a seal of some 400 KB, six or
    // more records of at most 64 KiB.
    let n = 300;
    append_stream(&spool, n).await;
    // Every fdatasync from here on waits until released: the first is the first seal
    // record's.
    faults.hold_syncs.store(true, Ordering::SeqCst);
    let sink = Arc::new(RecordingSink::default());
    let pipeline = pipeline_common::start(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        quick_retries(),
        dir.path(),
    );
    wait_until("the first seal record's fdatasync", || {
        faults.syncs_held.load(Ordering::SeqCst) > 0
    })
    .await;
    let sealed_while_held = sealed_frames(dir.path());
    // Released before any assertion: a failing test must not leave the writer held.
    faults.hold_syncs.store(false, Ordering::SeqCst);
    assert_eq!(
        sealed_while_held, 1,
        "the next seal record is not written before this one is durable"
    );
    wait_until("every record delivered", || {
        sink.delivered.lock().unwrap().len() >= n
    })
    .await;
    pipeline.shutdown().await;
    assert!(
        sealed_frames(dir.path()) > 1,
        "the batches' seals took several records"
    );
    assert_one_whole_chain(&sink.delivered.lock().unwrap(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_stop_leaves_of_a_seal_is_its_first_entries_sealed_and_a_restart_goes_on_from_them()
{
    let dir = tempfile::tempdir().unwrap();
    let (spool, ring, metrics, faults) = pipeline_common::open_faulty_spool(dir.path());
    let n = 300;
    let mut positions = Vec::new();
    for i in 0..n {
        positions.push(
            append(
                &spool,
                "t",
                format!("e{i}"),
                format!("{i}: {}", "text ".repeat(200)),
            )
            .await,
        );
    }
    // Room for the first seal record (at most 64 KiB) and not for the second: the worker
    // waits for room there until it is stopped.
    let end = spool.durable_end();
    assert_eq!(end.segment, 1);
    faults
        .enospc_from_offset
        .store(end.offset + 100_000, Ordering::SeqCst);
    let chains = Arc::new(std::sync::Mutex::new(spoolgate::chain::Chains::new()));
    let ledger = Arc::new(spoolgate::forward::ledger::Ledger::default());
    let sink = Arc::new(RecordingSink::default());
    let pipeline = pipeline_common::start_sharing(
        &spool,
        ring.clone(),
        &metrics,
        sink.clone(),
        // The first batch goes out full (256 KiB of envelopes, whose seal needs several
        // records), never after a linger of 1 ms that a loaded machine could cut it short at,
        // with a seal of one record that fits before the fault and is delivered.
        spoolgate::config::ForwardConfig {
            linger_ms: 60_000,
            ..quick_retries()
        },
        dir.path(),
        chains.clone(),
        ledger.clone(),
        None,
    );
    let waiting_full = metrics.forward_appends_waiting.with_label_values(&["full"]);
    wait_until(
        "the worker waiting for room for its second seal record",
        || metrics.spool_full_errors_total.get() > 0 && waiting_full.get() == 1,
    )
    .await;
    pipeline.shutdown().await;
    assert_eq!(waiting_full.get(), 0, "a stopped wait is no longer shown");
    assert!(
        sink.delivered.lock().unwrap().is_empty(),
        "nothing leaves before its whole seal"
    );
    assert_eq!(sealed_frames(dir.path()), 1);
    // The first record's entries are sealed, in order from the batch's first, and the
    // stream's head is the last of them; the rest are not sealed.
    let sealed: Vec<_> = positions.iter().map_while(|p| ledger.sealed(*p)).collect();
    assert!(
        !sealed.is_empty() && sealed.len() < n,
        "{} sealed",
        sealed.len()
    );
    assert!(positions[sealed.len()..]
        .iter()
        .all(|p| ledger.sealed(*p).is_none()));
    let head = chains.lock().unwrap().head("t").unwrap();
    assert_eq!(head.seq, sealed.len() as u64);
    assert_eq!(Some(head), sealed.last().unwrap().chain_head());

    // Room again, and a restart: the sealed entries are re-sent from their seal, the others
    // sealed after them, and the stream's chain is whole.
    faults.enospc_from_offset.store(u64::MAX, Ordering::SeqCst);
    let delivered = restart_and_deliver(&spool, ring, &metrics, dir.path(), n).await;
    assert_one_whole_chain(&delivered, n);
    for (first, again) in sealed.iter().zip(&delivered) {
        assert_eq!(**first, *again, "re-sent from its seal, byte for byte");
    }
}

/// Appends `n` envelopes of stream `t`, about 1.2 KB each sealed, to `spool`; returns their
/// positions.
async fn append_stream(
    spool: &spoolgate::spool::Spool,
    n: usize,
) -> Vec<spoolgate::spool::Position> {
    let mut positions = Vec::with_capacity(n);
    for i in 0..n {
        positions.push(
            append(
                spool,
                "t",
                format!("e{i}"),
                format!("{i}: {}", "text ".repeat(200)),
            )
            .await,
        );
    }
    positions
}

/// The start of every SEALED frame in the spool under `dir`, in log order.
fn sealed_positions(dir: &std::path::Path) -> Vec<spoolgate::spool::Position> {
    let mut at = Vec::new();
    spoolgate::spool::for_each_frame(&dir.join("spool"), |position, kind, _| {
        if kind == RecordKind::SEALED.0 {
            at.push(position);
        }
        Ok::<(), spoolgate::spool::SpoolError>(())
    })
    .unwrap();
    at
}

/// The second seal record's fdatasync fails. The spool refuses everything after it and marks
/// the failed record void; a restart re-sends what the first run sealed exactly as it was
/// sealed, seals the rest after it, and the stream is one whole chain. With `keep_the_void`
/// false the marker is removed before the restart, as if the disk had lost it and kept the
/// failed record's bytes (a failed fdatasync promises neither): the restart then takes that
/// record's entries as sealed too, and the chain is as whole.
async fn a_seal_cut_by_a_failed_fdatasync(keep_the_void: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (spool, ring, metrics, faults) = pipeline_common::open_faulty_spool(dir.path());
    let n = 300;
    let positions = append_stream(&spool, n).await;
    // Every envelope is durable: the next fdatasync is the first seal record's, the one after
    // it the second's.
    faults.syncs_until_failure.store(2, Ordering::SeqCst);
    let chains = Arc::new(std::sync::Mutex::new(spoolgate::chain::Chains::new()));
    let ledger = Arc::new(spoolgate::forward::ledger::Ledger::default());
    let sink = Arc::new(RecordingSink::default());
    let pipeline = pipeline_common::start_sharing(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        // The first batch goes out full (256 KiB of envelopes, a seal of several records),
        // never after a linger of 1 ms that a loaded machine could cut it short at. A short
        // first batch is sealed in one record (fdatasync 1), delivered, and its tombstone
        // appended in the background while the next batch's first seal record is: the two
        // can share one write and so fdatasync 2, the one that fails. With the void marker
        // lost the restart then finds that tombstone too, and rightly re-sends nothing of the
        // first batch, which this test would wait for.
        spoolgate::config::ForwardConfig {
            linger_ms: 60_000,
            ..quick_retries()
        },
        dir.path(),
        chains.clone(),
        ledger.clone(),
        None,
    );
    wait_until("the spool poisoned by the failed fdatasync", || {
        spool.poison_reason().is_some()
    })
    .await;
    pipeline.shutdown().await;
    assert_eq!(
        sealed_positions(dir.path()).len(),
        1,
        "the record whose fdatasync failed is void"
    );
    let head = chains
        .lock()
        .unwrap()
        .head("t")
        .expect("the first record sealed");
    assert!(
        head.seq > 0 && head.seq < n as u64,
        "the stream's head is the first record's last entry, not the batch's: {}",
        head.seq
    );
    assert!(
        sink.delivered.lock().unwrap().is_empty(),
        "nothing leaves before its whole seal"
    );
    // The durable first record's entries are sealed, the batch's first, up to the head.
    let sealed: Vec<_> = positions.iter().map_while(|p| ledger.sealed(*p)).collect();
    assert_eq!(sealed.len() as u64, head.seq);
    assert_eq!(sealed.last().unwrap().chain_head(), Some(head));
    let closed = tokio::task::block_in_place(|| spool.close());
    assert!(
        matches!(closed, Err(spoolgate::spool::SpoolError::Poisoned(_))),
        "{closed:?}"
    );
    drop(spool);
    let spool_dir = dir.path().join("spool");
    let voids: Vec<_> = std::fs::read_dir(&spool_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("void-")
        })
        .collect();
    assert_eq!(voids.len(), 1, "{voids:?}");
    if !keep_the_void {
        std::fs::remove_file(&voids[0]).unwrap();
        assert_eq!(sealed_positions(dir.path()).len(), 2);
    }

    let metrics = Arc::new(spoolgate::metrics::Metrics::new());
    let ring = Arc::new(spoolgate::ring::Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let delivered = restart_and_deliver(&spool, ring, &metrics, dir.path(), n).await;
    assert_one_whole_chain(&delivered, n);
    assert_eq!(delivered[head.seq as usize - 1].chain_head(), Some(head));
    for (first, again) in sealed.iter().zip(&delivered) {
        assert_eq!(**first, *again, "re-sent from its seal, byte for byte");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_between_seal_records_leaves_a_chain_a_restart_completes_whole() {
    a_seal_cut_by_a_failed_fdatasync(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_record_whose_fdatasync_failed_and_whose_void_marker_is_lost_still_leaves_one_chain()
{
    a_seal_cut_by_a_failed_fdatasync(false).await;
}
