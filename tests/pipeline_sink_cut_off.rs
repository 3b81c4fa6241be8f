//! A sink that closes the connection while a batch is being sent, with no answer, is retried;
//! a batch cut off several times running is sent in halves, as after a 413, because a server
//! with a body limit may answer 413 before reading the body and close, and the client then
//! sees only the reset. Order and identity hold as for any split.

mod pipeline_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pipeline_common::{append, quick_retries, wait_until};
use spoolgate::chain::{ForwardRecord, SharedRecord};
use spoolgate::forward::sink::{DeliverFuture, Sink, SinkError};

/// Cuts off every batch of more than `records_max` records; takes the others.
struct BodyLimitSink {
    records_max: usize,
    cut_off: AtomicUsize,
    taken: Mutex<Vec<ForwardRecord>>,
}

impl Sink for BodyLimitSink {
    fn name(&self) -> &str {
        "default"
    }

    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a> {
        Box::pin(async move {
            if batch.len() > self.records_max {
                self.cut_off.fetch_add(1, Ordering::SeqCst);
                return Err(SinkError::CutOff {
                    reason: "error writing a body to connection: Connection reset by peer".into(),
                });
            }
            self.taken
                .lock()
                .unwrap()
                .extend(batch.iter().map(|r| (**r).clone()));
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_sink_cuts_off_three_times_running_is_sent_in_halves_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, ring, metrics, _faults) = pipeline_common::open_faulty_spool(dir.path());
    let n = 40;
    for i in 0..n {
        append(&spool, "t", format!("e{i}"), format!("text {i}")).await;
    }
    let sink = Arc::new(BodyLimitSink {
        records_max: 8,
        cut_off: AtomicUsize::new(0),
        taken: Mutex::new(Vec::new()),
    });
    let pipeline = pipeline_common::start(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        spoolgate::config::ForwardConfig {
            // One batch of all 40, not batches cut short by the linger.
            linger_ms: 60_000,
            batch_records_max: n,
            ..quick_retries()
        },
        dir.path(),
    );
    wait_until("every record taken", || {
        sink.taken.lock().unwrap().len() >= n
    })
    .await;
    pipeline.shutdown().await;
    let taken = sink.taken.lock().unwrap().clone();
    let seqs: Vec<u64> = taken.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=n as u64).collect::<Vec<_>>(),
        "each once, in order"
    );
    // 40 -> 20 -> 10 -> 5: three levels of halving, each after three cut-offs running (the
    // halves of 20 and of 10 each cut off three times before their own halves went).
    let cut_offs = sink.cut_off.load(Ordering::SeqCst);
    assert_eq!(cut_offs, 3 * (1 + 2 + 4), "{cut_offs} cut-offs");
}
