//! Worker takeover, in process: a sink that panics on one slot's records kills the worker that
//! owns the slot; its secondary takes the slots over from their last tombstone and delivers
//! everything, identically.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spoolgate::chain::{Chains, ForwardRecord, SharedRecord};
use spoolgate::config::{ForwardConfig, GateConfig};
use spoolgate::envelope::{Envelope, ENVELOPE_VERSION};
use spoolgate::forward::dead_letter::DeadLetter;
use spoolgate::forward::ledger::{self, Ledger};
use spoolgate::forward::pipeline::{Pipeline, PipelineParts};
use spoolgate::forward::sink::{DeliverFuture, Sink};
use spoolgate::gate::Gate;
use spoolgate::metrics::Metrics;
use spoolgate::ring::Ring;
use spoolgate::slots::slot_of;
use spoolgate::spool::{Durability, RecordKind, Spool, SpoolOptions};

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
    let opts = SpoolOptions {
        dir: dir.path().join("spool"),
        segment_bytes_max: 1 << 20,
        record_bytes_max: 64 * 1024,
        durability: Durability::Always,
        commit_batch_records_max: 256,
        commit_batch_bytes_max: 1 << 20,
        queue_depth_max: 256,
        preallocate: false,
        preallocate_zeros: false,
        zero_ahead_bytes: spoolgate::spool::ZERO_AHEAD_BYTES_DEFAULT,
        cached_behind_bytes: spoolgate::spool::CACHED_BEHIND_BYTES_DEFAULT,
        cached_unread_bytes_max: spoolgate::spool::CACHED_UNREAD_BYTES_MAX_DEFAULT,
    };
    let observer: Arc<dyn spoolgate::spool::CommitObserver> = ring.clone();
    let (spool, _) = Spool::open(opts, metrics.clone(), Some(observer)).unwrap();
    let ledger = Arc::new(Ledger::default());
    let scanned = ledger::scan(&spool, &ledger, 0, |_, _| {}, |_| {}).unwrap();
    let sink = Arc::new(PanickySink {
        victim: "tenant-3".into(),
        panicked: AtomicBool::new(false),
        delivered: Mutex::new(Vec::new()),
    });
    let mut sinks: BTreeMap<String, Arc<dyn Sink>> = BTreeMap::new();
    sinks.insert("default".into(), sink.clone());
    let pipeline = Pipeline::start(PipelineParts {
        spool: spool.clone(),
        ring,
        gate: Arc::new(Gate::new(&GateConfig::default(), metrics.clone()).unwrap()),
        chains: Arc::new(Mutex::new(Chains::new())),
        ledger,
        sinks,
        dead_letter: DeadLetter::new(&dir.path().join("dl"), 1 << 30),
        config: ForwardConfig {
            workers: 3,
            linger_ms: 1,
            ..ForwardConfig::default()
        },
        metrics: metrics.clone(),
        compaction: Arc::new(tokio::sync::Notify::new()),
        replay_end: scanned.end,
    });

    let total = 120;
    for n in 0..total {
        let tenant = format!("tenant-{}", n % 6);
        let env = Envelope {
            version: ENVELOPE_VERSION,
            id: format!("id-{n}"),
            source: "test".into(),
            slot: slot_of(&tenant),
            tenant: Some(tenant),
            text: Some(format!("record {n}")),
            ts_ms: 1,
            ..Default::default()
        };
        spool
            .append(vec![(
                RecordKind::ENVELOPE,
                Bytes::from(env.encode().unwrap()),
            )])
            .await
            .unwrap();
    }

    let started = Instant::now();
    loop {
        let got: std::collections::HashSet<String> = sink
            .delivered
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.envelope.id.clone())
            .collect();
        if got.len() == total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {} of {total} delivered",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
