//! A device that fails reads under a running pipeline: the dispatcher, which reads the spool
//! for the workers, fails, is counted, and starts over after a growing delay; nothing is
//! skipped, and once reads work again every record is delivered, in order.

mod pipeline_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pipeline_common::{append, wait_until, RecordingSink};
use spoolgate::chain::Chains;
use spoolgate::config::ForwardConfig;
use spoolgate::forward::ledger::Ledger;
use spoolgate::forward::pipeline::Pipeline;
use spoolgate::ring::Ring;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_errors_stop_forwarding_without_skipping_anything_until_reads_work_again() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, ring, metrics, faults) = pipeline_common::open_faulty_spool(dir.path());
    // A backlog from before the start: the pipeline reads it from the segments.
    for n in 0..3 {
        append(&spool, "t", format!("e-{n}"), format!("Record {n}.")).await;
    }
    let sink = Arc::new(RecordingSink::default());
    // A ring that has not seen the backlog, as after a restart: the dispatcher must read it.
    drop(ring);
    let fresh_ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let parts = pipeline_common::parts(
        &spool,
        fresh_ring,
        &metrics,
        sink.clone(),
        ForwardConfig {
            linger_ms: 1,
            ..ForwardConfig::default()
        },
        dir.path(),
        Arc::new(std::sync::Mutex::new(Chains::new())),
        Arc::new(Ledger::default()),
        None,
    );
    faults.fail_reads.store(true, Ordering::SeqCst);
    let pipeline = Pipeline::start(parts);

    wait_until("the dispatcher failed twice", || {
        metrics.forward_dispatcher_failures_total.get() >= 2
    })
    .await;
    assert!(faults.reads_failed.load(Ordering::SeqCst) >= 2);
    assert!(
        sink.delivered.lock().unwrap().is_empty(),
        "nothing is forwarded past a record that cannot be read"
    );

    faults.fail_reads.store(false, Ordering::SeqCst);
    wait_until("the backlog delivered", || {
        sink.delivered.lock().unwrap().len() == 3
    })
    .await;
    let got: Vec<(String, u64)> = sink
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.envelope.id.clone(), r.seq))
        .collect();
    assert_eq!(
        got,
        vec![
            ("e-0".to_string(), 1),
            ("e-1".to_string(), 2),
            ("e-2".to_string(), 3)
        ]
    );
    pipeline.shutdown().await;
}
