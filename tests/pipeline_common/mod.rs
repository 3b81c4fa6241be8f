//! Helpers shared by the in-process pipeline tests: starting a pipeline on an open spool with
//! one test sink, appending envelopes, and waiting for a condition.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
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
use spoolgate::spool::{Durability, Position, RecordKind, Spool, SpoolOptions};

/// Scans `spool` and starts a pipeline on it with `sink` as the default sink, the default
/// gate, and dead letters under `scratch`.
pub fn start(
    spool: &Spool,
    ring: Arc<Ring>,
    metrics: &Arc<Metrics>,
    sink: Arc<dyn Sink>,
    config: ForwardConfig,
    scratch: &Path,
) -> Pipeline {
    start_sharing(
        spool,
        ring,
        metrics,
        sink,
        config,
        scratch,
        Arc::new(Mutex::new(Chains::new())),
        Arc::new(Ledger::default()),
        None,
    )
}

/// [`start`] with the chain heads and the ledger given, for tests that look at them (or run
/// compaction on them) while the pipeline works, and a disk reserve for forwarding to spend.
#[allow(clippy::too_many_arguments)]
pub fn start_sharing(
    spool: &Spool,
    ring: Arc<Ring>,
    metrics: &Arc<Metrics>,
    sink: Arc<dyn Sink>,
    config: ForwardConfig,
    scratch: &Path,
    chains: Arc<Mutex<Chains>>,
    ledger: Arc<Ledger>,
    reserve: Option<Arc<spoolgate::compaction::reserve::Reserve>>,
) -> Pipeline {
    Pipeline::start(parts(
        spool, ring, metrics, sink, config, scratch, chains, ledger, reserve,
    ))
}

/// What [`start_sharing`] starts, for tests that change a part first.
#[allow(clippy::too_many_arguments)]
pub fn parts(
    spool: &Spool,
    ring: Arc<Ring>,
    metrics: &Arc<Metrics>,
    sink: Arc<dyn Sink>,
    config: ForwardConfig,
    scratch: &Path,
    chains: Arc<Mutex<Chains>>,
    ledger: Arc<Ledger>,
    reserve: Option<Arc<spoolgate::compaction::reserve::Reserve>>,
) -> PipelineParts {
    ledger::scan(spool, &ledger, 0, |_, _| {}, |_, _| {}).unwrap();
    let mut sinks: BTreeMap<String, Arc<dyn Sink>> = BTreeMap::new();
    sinks.insert("default".into(), sink);
    PipelineParts {
        spool: spool.clone(),
        ring,
        gate: Arc::new(Gate::new(&GateConfig::default(), metrics.clone()).unwrap()),
        chains,
        ledger,
        sinks,
        dead_letter: DeadLetter::new(&scratch.join("dl"), 1 << 30),
        config,
        metrics: metrics.clone(),
        compaction: Arc::new(tokio::sync::Notify::new()),
        reserve,
        restart_backoff: Default::default(),
    }
}

/// Opens a spool under `dir` with 1 MiB segments and 64 KiB records, durability `always`,
/// feeding `ring`.
pub fn open_spool(dir: &Path, ring: &Arc<Ring>, metrics: &Arc<Metrics>) -> Spool {
    open_spool_fs(dir, ring, metrics, Arc::new(spoolgate::spool::fs::StdFs))
}

/// A spool as [`open_spool`] opens it, on a filesystem that fails on command: the spool, the
/// ring it feeds, its metrics and the switches of its faults.
pub fn open_faulty_spool(
    dir: &Path,
) -> (
    Spool,
    Arc<Ring>,
    Arc<Metrics>,
    Arc<spoolgate::spool::fs::Faults>,
) {
    use spoolgate::spool::fs::{FaultFs, Faults, StdFs};
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let faults = Faults::new();
    let spool = open_spool_fs(
        dir,
        &ring,
        &metrics,
        Arc::new(FaultFs::new(StdFs, faults.clone())),
    );
    (spool, ring, metrics, faults)
}

/// [`open_spool`] on the filesystem `fs` (for fault injection).
pub fn open_spool_fs(
    dir: &Path,
    ring: &Arc<Ring>,
    metrics: &Arc<Metrics>,
    fs: Arc<dyn spoolgate::spool::fs::FileSystem>,
) -> Spool {
    let opts = SpoolOptions {
        dir: dir.join("spool"),
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
    Spool::open_with_fs(opts, fs, metrics.clone(), Some(observer))
        .unwrap()
        .0
}

/// An envelope of `tenant` with `id` and `text`, as ingest makes it.
pub fn envelope(tenant: &str, id: String, text: String) -> Envelope {
    Envelope {
        version: ENVELOPE_VERSION,
        id,
        source: "test".into(),
        slot: slot_of(tenant),
        tenant: Some(tenant.to_string()),
        text: Some(text),
        ts_ms: 1,
        ..Default::default()
    }
}

/// [`envelope`] as the record ingest writes.
pub fn envelope_record(tenant: &str, id: &str, text: String) -> (RecordKind, Bytes) {
    let env = envelope(tenant, id.to_string(), text);
    (RecordKind::ENVELOPE, Bytes::from(env.encode().unwrap()))
}

/// Appends an envelope of `tenant` with `id` and `text`; returns its position.
pub async fn append(spool: &Spool, tenant: &str, id: String, text: String) -> Position {
    spool
        .append(vec![envelope_record(tenant, &id, text)])
        .await
        .unwrap()[0]
}

/// Polls `cond` until it holds, failing after a minute. What it waits on (deliveries, metrics,
/// the recording filesystem's log) has no event to await, so it is looked at every few ms.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Takes every batch and keeps its records.
#[derive(Default)]
pub struct RecordingSink {
    pub delivered: Mutex<Vec<ForwardRecord>>,
}

impl Sink for RecordingSink {
    fn name(&self) -> &str {
        "default"
    }

    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a> {
        Box::pin(async move {
            self.delivered
                .lock()
                .unwrap()
                .extend(batch.iter().map(|r| (**r).clone()));
            Ok(())
        })
    }
}

/// A config whose retries come after 1-10 ms, so a test need not wait for them.
pub fn quick_retries() -> ForwardConfig {
    ForwardConfig {
        linger_ms: 1,
        retry_initial_ms: 1,
        retry_max_ms: 10,
        ..ForwardConfig::default()
    }
}
