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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_of_several_records_is_written_one_record_at_a_time_each_durable_before_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, ring, metrics, faults) = pipeline_common::open_faulty_spool(dir.path());
    // 300 envelopes of one stream, about 1.2 KB each sealed: a seal of some 400 KB, six or
    // more records of at most 64 KiB.
    let n = 300;
    for i in 0..n {
        append(
            &spool,
            "t",
            format!("e{i}"),
            format!("{i}: {}", "text ".repeat(200)),
        )
        .await;
    }
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
        quick_retries(),
        dir.path(),
        chains.clone(),
        ledger.clone(),
        None,
    );
    wait_until("the second seal record refused for want of room", || {
        metrics.spool_full_errors_total.get() > 0
    })
    .await;
    pipeline.shutdown().await;
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
    let mut heads = spoolgate::chain::Chains::new();
    let restarted = spoolgate::forward::ledger::Ledger::default();
    spoolgate::forward::ledger::scan(&spool, &restarted, 0, |_, _| {}, |s, h| heads.advance(s, h))
        .unwrap();
    let sink = Arc::new(RecordingSink::default());
    let pipeline = pipeline_common::start_sharing(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        quick_retries(),
        dir.path(),
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
    assert_one_whole_chain(&delivered, n);
    for (first, again) in sealed.iter().zip(&delivered) {
        assert_eq!(**first, *again, "re-sent from its seal, byte for byte");
    }
}
