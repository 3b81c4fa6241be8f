//! Worker takeover, in process: a sink that panics on one slot's records kills the worker that
//! owns the slot; its secondary takes the slots over from their last tombstone and delivers
//! everything, identically.

mod pipeline_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pipeline_common::{append, wait_until};
use spoolgate::chain::{ForwardRecord, SharedRecord};
use spoolgate::config::ForwardConfig;
use spoolgate::forward::sink::{DeliverFuture, Sink};
use spoolgate::metrics::Metrics;
use spoolgate::ring::Ring;

/// Panics the first time a batch holds a record of `victim`'s stream; records everything else.
struct PanickySink {
    victim: String,
    panicked: AtomicBool,
    delivered: Mutex<Vec<ForwardRecord>>,
}

impl Sink for PanickySink {
    fn name(&self) -> &str {
        "default"
    }

    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a> {
        Box::pin(async move {
            if batch.iter().any(|r| r.stream == self.victim)
                && !self.panicked.swap(true, Ordering::SeqCst)
            {
                panic!("simulated sink bug on stream {}", self.victim);
            }
            self.delivered
                .lock()
                .unwrap()
                .extend(batch.iter().map(|r| (**r).clone()));
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_is_replaced_by_its_secondary_and_every_record_is_delivered_identically()
{
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let sink = Arc::new(PanickySink {
        victim: "tenant-3".into(),
        panicked: AtomicBool::new(false),
        delivered: Mutex::new(Vec::new()),
    });
    let pipeline = pipeline_common::start(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        ForwardConfig {
            workers: 3,
            linger_ms: 1,
            ..ForwardConfig::default()
        },
        dir.path(),
    );

    let total = 120;
    for n in 0..total {
        let tenant = format!("tenant-{}", n % 6);
        append(&spool, &tenant, format!("id-{n}"), format!("record {n}")).await;
    }

    let delivered_ids = || -> std::collections::HashSet<String> {
        sink.delivered
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.envelope.id.clone())
            .collect()
    };
    wait_until("every record delivered", || delivered_ids().len() == total).await;
    assert!(
        sink.panicked.load(Ordering::SeqCst),
        "the sink must have panicked once"
    );
    assert!(metrics.worker_takeovers_total.get() >= 1);

    // Every copy of a record is identical, and every stream is gapless.
    let delivered = sink.delivered.lock().unwrap().clone();
    let mut by_key: HashMap<(String, u64), ForwardRecord> = HashMap::new();
    for r in &delivered {
        if let Some(first) = by_key.insert((r.stream.clone(), r.seq), r.clone()) {
            assert_eq!(first, *r, "a re-delivered record differs");
        }
    }
    let lines: Vec<String> = delivered
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    let summary = spoolgate::chain::verify_jsonl(std::io::Cursor::new(lines.join("\n"))).unwrap();
    assert_eq!(summary.records as usize, delivered.len());
    pipeline.shutdown().await;
}
