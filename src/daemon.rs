//! `spoolgate serve`: the daemon's lifecycle.
//!
//! Start-up order matters for the guarantees:
//! 1. bind both listeners first, so a port conflict fails fast and clients get 503 (not a
//!    refused connection) while recovery runs;
//! 2. load the chain heads and the dedup checkpoints, then open the spool: take the directory
//!    lock, recover every segment, and scan each record recovery keeps as it goes (one read of
//!    the spool) to rebuild the dedup index, the ledger (pending, sealed, complete) and the
//!    chain heads;
//! 3. start the pipeline, which replays whatever is pending;
//! 4. only then publish the spool to the handlers — `/readyz` turns 200 and ingest answers.
//!
//! Shutdown (SIGTERM or SIGINT): mark draining (new requests get 503, `/readyz` fails), stop
//! accepting, let in-flight requests finish, stop the pipeline after its in-flight batch, close
//! the spool (flush and fdatasync), exit 0 — all within `shutdown.deadline_ms`. Past the
//! deadline the process exits anyway with status 1: nothing acknowledged is lost by that, since
//! it is on disk and replays at the next start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use std::sync::Mutex;

use crate::chain::Chains;
use crate::compaction::Compactor;
use crate::config::Config;
use crate::forward::dead_letter::DeadLetter;
use crate::forward::ledger::{self, Ledger, ScanSummary};
use crate::forward::pipeline::{Pipeline, PipelineParts};
use crate::forward::sink::build_sinks;
use crate::gate::Gate;
use crate::ingest::backpressure::{filesystem_free_bytes, SAMPLE_INTERVAL};
use crate::ingest::server::{serve, stopped, ConnectionLimits, ConnectionMetrics};
use crate::ingest::{self, dedup_file, IngestState};
use crate::metrics::Metrics;
use crate::ring::Ring;
use crate::spool::{Spool, SpoolError};

/// Chain heads checkpoint, in the data directory (see `compaction`).
pub const CHAIN_HEADS_FILE: &str = "chain-heads";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create or make durable the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the data directory {0} is in use by another spoolgate (it holds {0}/LOCK)")]
    DataDirLocked(std::path::PathBuf),
    #[error("cannot write the address file {path}: {source}")]
    AddressFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("a start-up task failed: {0}")]
    Task(String),
    #[error("cannot start the pipeline: {0}")]
    Pipeline(String),
}

/// Takes `<data_dir>/LOCK` (an exclusive `flock`, released when the process ends however it
/// ends).
fn lock_data_dir(data_dir: &std::path::Path) -> Result<Box<dyn Send + Sync>, DaemonError> {
    use crate::spool::fs::FileSystem;
    crate::spool::fs::StdFs
        .lock(&data_dir.join("LOCK"))
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::WouldBlock {
                DaemonError::DataDirLocked(data_dir.to_path_buf())
            } else {
                DaemonError::DataDir {
                    path: data_dir.to_path_buf(),
                    source,
                }
            }
        })
}

/// How `run` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Everything drained within the deadline.
    Clean,
    /// The deadline passed first.
    DeadlineExceeded,
}

pub async fn run(config: Config) -> Result<Exit, DaemonError> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let metrics = Arc::new(Metrics::new());
    metrics.register_process_collector();
    metrics
        .start_time_seconds
        .set(ingest::now_ms() as f64 / 1000.0);

    // The segments are fdatasync'd and their directory fsync'd, but a power loss could still
    // take the spool directory's own entry, or the data directory's, with every acknowledged
    // segment in them: each is made to exist durably (created if need be, its parent fsync'd).
    // Blocking, once, before anything is served.
    let durable = |dir: std::path::PathBuf| {
        crate::forward::durable_dir::DurableDir::new(&dir)
            .ensure()
            .map_err(|source| DaemonError::DataDir { path: dir, source })
    };
    durable(config.data_dir.clone())?;
    // Held for the life of the process, before anything in the data directory is touched: a
    // second daemon started on it by mistake would otherwise overwrite the address file and,
    // on a full disk, spend the running one's reserve before failing on the spool's lock.
    let _data_dir_lock = lock_data_dir(&config.data_dir)?;
    durable(config.spool_dir())?;
    let mut signals = ShutdownSignals::install();
    let ingest_listener = TcpListener::bind(config.ingest.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            what: "ingest",
            addr: config.ingest.listen,
            source,
        })?;
    let admin_listener = TcpListener::bind(config.metrics.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            what: "metrics",
            addr: config.metrics.listen,
            source,
        })?;
    tracing::info!(
        ingest = %ingest_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        metrics = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %config.data_dir.display(),
        durability = ?config.spool.durability,
        version = env!("CARGO_PKG_VERSION"),
        "spoolgate starting"
    );

    // Made here, not with the compactor: a start on a full filesystem may have to spend it.
    let reserve = Arc::new(crate::compaction::reserve::Reserve::new(
        &config.data_dir,
        config.spool.reserve_bytes,
        config.spool.disk_free_hard_bytes,
        config.spool.disk_free_soft_bytes,
        metrics.spool_reserve_bytes.clone(),
        metrics.spool_reserve_spent_total.clone(),
    ));
    publish_addresses(&config, &ingest_listener, &admin_listener, &reserve)?;

    let state = Arc::new(IngestState::new(config.clone(), metrics.clone()));
    if state.reserve.set(reserve.clone()).is_err() {
        return Err(DaemonError::Task("disk reserve published twice".into()));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = ConnectionLimits {
        connections_max: config.ingest.connections_max,
        header_read_timeout: Duration::from_millis(config.ingest.header_read_timeout_ms),
        idle_timeout: Duration::from_millis(config.ingest.idle_timeout_ms),
    };
    let ingest_server = {
        let state = state.clone();
        tokio::spawn(serve(
            ingest_listener,
            move |req| ingest::handle(state.clone(), req),
            limits,
            stop_rx.clone(),
            Some(ConnectionMetrics {
                open: metrics.ingest_connections_open.clone(),
                evicted_total: metrics.ingest_connections_evicted_total.clone(),
                timed_out_total: metrics.ingest_connections_timed_out_total.clone(),
            }),
        ))
    };
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_server = {
        let state = state.clone();
        tokio::spawn(serve(
            admin_listener,
            move |req| ingest::handle_admin(state.clone(), req),
            ConnectionLimits {
                connections_max: 64,
                ..limits
            },
            admin_stop_rx,
            None,
        ))
    };

    let ring = Arc::new(if config.forward.enabled {
        Ring::new(
            config.ring.capacity_records,
            config.ring.capacity_bytes,
            metrics.clone(),
        )
    } else {
        Ring::counting_only(metrics.clone())
    });
    // The chain heads and the dedup checkpoints are loaded before the spool is opened: the
    // start-up scan runs inside recovery (one read of the spool, not two) and advances the
    // heads past every seal it finds and indexes the ids still in the spool, which must win
    // over older checkpointed ones. Both files are written whole (temp file and rename), so a
    // second process that holds the spool's lock cannot show us half of one; we would fail on
    // the lock in any case.
    let heads_path = config.data_dir.join(CHAIN_HEADS_FILE);
    let chains = Chains::load(&heads_path).map_err(|e| DaemonError::Pipeline(e.to_string()))?;
    let checkpoint_first_kept = chains.first_kept;
    let chains = Arc::new(Mutex::new(chains));
    let ledger = Arc::new(Ledger::default());
    let dedup_checkpoints = {
        let (state, metrics, dir) = (state.clone(), metrics.clone(), config.data_dir.clone());
        tokio::task::spawn_blocking(move || load_dedup_checkpoints(&state, &metrics, &dir))
            .await
            .map_err(|e| DaemonError::Task(e.to_string()))?
    };
    refuse_a_spool_the_heads_cannot_vouch_for(&config, &heads_path, checkpoint_first_kept)?;
    let opened = {
        let opts = config.spool_options();
        let metrics = metrics.clone();
        let observer: Arc<dyn crate::spool::CommitObserver> = ring.clone();
        let fs = filesystem_with_failpoints();
        let (state, ledger, chains) = (state.clone(), ledger.clone(), chains.clone());
        let recovery = tokio::task::spawn_blocking(
            move || -> Result<(Spool, crate::spool::RecoveryReport, ScanSummary), SpoolError> {
                let mut chains = chains.lock().unwrap_or_else(|p| p.into_inner());
                let oldest = crate::spool::oldest_segment(fs.as_ref(), &opts.dir)?;
                let mut scan = ledger::Scan::new(&ledger, ingest::now_ms(), oldest);
                let mut on_envelope = |env: &crate::envelope::Envelope, position| {
                    state.streams.insert_recovered(env.stream());
                    // Ids spoolgate generated are never retried; only client ids are indexed.
                    if !crate::ingest::ids::is_generated(&env.id) {
                        state.dedup.insert_recovered(
                            crate::ingest::dedup::key(env.tenant.as_deref(), &env.id),
                            position,
                            env.slot,
                        )
                    }
                };
                let mut on_head = |stream: &str, head| chains.advance(stream, head);
                let (spool, report) =
                    Spool::open_visiting(opts, fs, metrics, Some(observer), &mut |record| {
                        scan.record(record, &mut on_envelope, &mut on_head)
                    })?;
                let segments: Vec<u64> = spool.segments().iter().map(|s| s.id).collect();
                let summary = scan.finish(spool.first_position(), &segments, on_envelope);
                Ok((spool, report, summary))
            },
        );
        tokio::select! {
            opened = recovery => opened.map_err(|e| DaemonError::Task(e.to_string()))?,
            _ = signals.recv() => {
                // Nothing was accepted yet (ingest answers 503 until ready), and recovery is
                // safe to cut short at any point, as a crash would: stop here. The recovery
                // thread ends with the process.
                tracing::info!("shutdown requested during recovery; stopping before ready");
                return Ok(Exit::Clean);
            }
        }
    };
    let (spool, report, summary) = opened?;
    // Only now, with the directory lock held, is every temp file in the data directory a
    // leftover of a process that was killed while writing a checkpoint.
    let stale = remove_stale_temp_files(&config.data_dir);
    if stale > 0 {
        tracing::info!(
            files = stale,
            "removed temp files left by an interrupted checkpoint write"
        );
    }
    tracing::info!(
        segments = report.segments,
        records = report.records,
        torn_tail_bytes = report.torn_tail_bytes,
        damaged_ranges = report.damaged.len(),
        missing_segment_ranges = report.missing_segments.len(),
        duration_ms = report.duration.as_millis() as u64,
        "recovery finished"
    );
    for d in &report.damaged {
        tracing::warn!(
            segment = d.segment,
            offset = d.offset,
            bytes = d.len_bytes,
            records_lost = d.records_lost,
            "recovery dropped a damaged range"
        );
    }

    {
        let chains = chains.lock().unwrap_or_else(|p| p.into_inner());
        for stream in chains.streams() {
            state.streams.insert_recovered(stream);
        }
        // The workers set it as they seal; until the first seal it must not read 0.
        metrics.chain_streams.set(chains.len() as i64);
    }
    // Every envelope the scan found pending is fed to the consumers again: counted here, from
    // the scan, so that the count does not depend on how many epochs the replay takes.
    if config.forward.enabled {
        metrics.replay_recovered_total.inc_by(summary.pending);
    }
    if state.streams.len() > config.ingest.streams_max {
        tracing::warn!(
            streams = state.streams.len(),
            streams_max = config.ingest.streams_max,
            "more streams than ingest.streams_max exist; they keep working, new ones are refused"
        );
    }
    tracing::info!(
        envelopes = summary.envelopes,
        pending = summary.pending,
        sealed = summary.sealed,
        tombstoned = summary.tombstoned,
        undecodable = summary.undecodable,
        "spool scanned; pending envelopes will be replayed"
    );
    if summary.orphans > 0 {
        tracing::warn!(
            envelopes = summary.orphans,
            "envelope records lost to damage or a removed segment were sealed before: they are forwarded again from their seals, identically"
        );
        metrics
            .recovery_envelopes_resent_from_seals_total
            .inc_by(summary.orphans);
    }
    if summary.orphans_dropped > 0 {
        tracing::error!(
            envelopes = summary.orphans_dropped,
            kept = crate::forward::ledger::ORPHANS_MAX,
            "more sealed envelopes lost their records than a start keeps to re-send from their seals; these are lost with the damage"
        );
    }

    crate::gate::quiet_classify_panics();
    let gate = Arc::new(
        Gate::with_sinks(
            &config.gate,
            metrics.clone(),
            config.sinks.keys().cloned().collect(),
        )
        .map_err(|e| DaemonError::Pipeline(e.to_string()))?,
    );
    let _rules_watcher = gate
        .watch()
        .map_err(|e| DaemonError::Pipeline(e.to_string()))?;
    let sinks = build_sinks(&config.sinks, &config.data_dir)
        .map_err(|e| DaemonError::Pipeline(e.to_string()))?;
    let compaction_wake = Arc::new(tokio::sync::Notify::new());
    if !config.forward.enabled {
        tracing::warn!(
            "forward.enabled = false: ingest only, nothing will be forwarded or compacted"
        );
    }
    let pipeline = config.forward.enabled.then(|| {
        Pipeline::start(PipelineParts {
            spool: spool.clone(),
            ring: ring.clone(),
            gate,
            chains: chains.clone(),
            ledger: ledger.clone(),
            sinks,
            dead_letter: DeadLetter::new(
                &config.dead_letter_dir(),
                config.forward.dead_letter_bytes_max,
            )
            .with_gauge(metrics.dead_letter_bytes.clone()),
            config: config.forward.clone(),
            metrics: metrics.clone(),
            compaction: compaction_wake.clone(),
            reserve: Some(reserve.clone()),
            restart_backoff: Default::default(),
        })
    });
    let (compactor_stop_tx, compactor_stop_rx) = watch::channel(false);
    let compactor = Compactor {
        spool: spool.clone(),
        ledger,
        chains,
        ring: ring.clone(),
        heads_path,
        dedup_dir: config.data_dir.clone(),
        dedup_checkpoints: Arc::new(Mutex::new(dedup_checkpoints)),
        ingest: state.clone(),
        // Entries of segments deleted before this start are already in checkpoints
        // (loaded above); only segments still present need checkpointing again.
        dedup_checkpointed_below: std::sync::atomic::AtomicU64::new(
            spool.segments().first().map_or(0, |s| s.id),
        ),
        metrics: metrics.clone(),
        wake: compaction_wake,
        reserve,
    };
    let gauges = compactor.gauges();
    metrics.refresh_before_render(move |m| gauges.refresh(m));
    let compactor = tokio::spawn(compactor.run(compactor_stop_rx));

    let sampler = tokio::spawn(sample_loop(state.clone(), spool.clone(), stop_rx.clone()));
    // The first sample must land before ingest opens, or the watermarks would read as empty.
    take_sample(&state, &spool, 0, Duration::ZERO);
    if state.spool.set(spool.clone()).is_err() {
        return Err(DaemonError::Task("spool published twice".into()));
    }
    tracing::info!("ready");

    signals.recv().await;
    let deadline = Duration::from_millis(config.shutdown.deadline_ms);
    let stopping_since = std::time::Instant::now();
    tracing::info!(
        deadline_ms = deadline.as_millis() as u64,
        "shutdown requested; draining"
    );
    state
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(deadline, async {
        let _ = ingest_server.await;
        let _ = sampler.await;
        if let Some(pipeline) = pipeline {
            pipeline.shutdown().await;
        }
        let _ = compactor_stop_tx.send(true);
        let _ = compactor.await;
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || spool.close()).await
    })
    .await;
    let _ = admin_stop_tx.send(true);
    // Its connections get a moment to finish, up to a second and never past the deadline: a
    // metrics client that stalls a response must not hold the exit.
    let mut admin_server = admin_server;
    let admin_wait = deadline
        .saturating_sub(stopping_since.elapsed())
        .min(Duration::from_secs(1));
    if tokio::time::timeout(admin_wait, &mut admin_server)
        .await
        .is_err()
    {
        admin_server.abort();
    }
    match drained {
        Ok(Ok(Ok(()))) => {
            tracing::info!("shutdown complete");
            Ok(Exit::Clean)
        }
        Ok(Ok(Err(e))) => {
            tracing::error!(error = %e, "closing the spool failed");
            Err(e.into())
        }
        Ok(Err(e)) => Err(DaemonError::Task(e.to_string())),
        Err(_) => {
            tracing::warn!("shutdown deadline passed; exiting with work in flight (it replays at the next start)");
            Ok(Exit::DeadlineExceeded)
        }
    }
}

/// Environment variable naming a failpoint for fault-injection drills and tests: the N-th
/// fdatasync of the spool (counting from 1) fails with EIO, as a dying disk would. Recovery's
/// own fdatasyncs of the newest segments count too, on a spool that holds data.
pub const FAILPOINT_FSYNC_ENV: &str = "SPOOLGATE_FAILPOINT_FSYNC_FAILS_AT";

/// Environment variable naming a failpoint for tests: while the file it names exists, every
/// fdatasync of the spool waits (a disk that has stalled), so requests queue behind it.
pub const FAILPOINT_HOLD_FSYNC_ENV: &str = "SPOOLGATE_FAILPOINT_HOLD_FSYNC_WHILE";

/// The checks on the spool's segments against the `chain-heads` checkpoint, made before the
/// spool is opened so that a refused start changes nothing in it. Both refuse a spool whose
/// seals since the checkpoint may be gone: the heads would then be older than what the sinks
/// have, and a stream would send a sequence number twice with different records.
/// `spoolgate chain-heads import` restores the heads and vouches for the spool as it is.
fn refuse_a_spool_the_heads_cannot_vouch_for(
    config: &Config,
    heads_path: &std::path::Path,
    first_kept: Option<u64>,
) -> Result<(), DaemonError> {
    let dir = config.spool_options().dir;
    let span = crate::spool::segment_id_span(&crate::spool::fs::StdFs, &dir)?;
    let (oldest, newest) = (span.map(|(o, _)| o), span.map(|(_, n)| n));
    let pipeline = |e: crate::chain::ChainError| DaemonError::Pipeline(e.to_string());
    // Compaction writes the chain heads before it deletes any segment, so a spool that no
    // longer starts at segment 1 without them has lost them.
    let heads_present = heads_path.try_exists().map_err(|source| {
        pipeline(crate::chain::ChainError::Io {
            path: heads_path.to_path_buf(),
            source,
        })
    })?;
    if let Some(first_segment) = oldest.filter(|&o| o > 1 && !heads_present) {
        return Err(pipeline(crate::chain::ChainError::CheckpointMissing {
            path: heads_path.to_path_buf(),
            first_segment,
        }));
    }
    // The segments below the one compaction last kept are its own work; it and every later
    // one hold the seals written since, unless something else removed them.
    let Some(kept) = first_kept else {
        return Ok(());
    };
    let missing = match (oldest, newest) {
        (Some(oldest), _) if oldest > kept => format!("segments {kept} to {}", oldest - 1),
        (_, Some(newest)) if newest >= kept => return Ok(()),
        _ => format!("every segment from {kept} on"),
    };
    tracing::error!(
        first_kept = kept,
        oldest_segment = oldest,
        newest_segment = newest,
        "segments compaction kept are missing: {missing}"
    );
    Err(pipeline(crate::chain::ChainError::SegmentsMissing {
        dir,
        missing,
    }))
}

/// The real filesystem, wrapped in the fault-injecting one when a failpoint is set.
fn filesystem_with_failpoints() -> Arc<dyn crate::spool::fs::FileSystem> {
    use crate::spool::fs::{FaultFs, Faults, StdFs};
    let fails_at = std::env::var(FAILPOINT_FSYNC_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0);
    let hold_while = std::env::var_os(FAILPOINT_HOLD_FSYNC_ENV).map(std::path::PathBuf::from);
    if fails_at.is_none() && hold_while.is_none() {
        return Arc::new(StdFs);
    }
    let faults = Faults::new();
    if let Some(n) = fails_at {
        tracing::warn!(
            failpoint = FAILPOINT_FSYNC_ENV,
            at = n,
            "fault injection enabled: fdatasync number {n} will fail"
        );
        faults
            .syncs_until_failure
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some(path) = hold_while {
        tracing::warn!(
            failpoint = FAILPOINT_HOLD_FSYNC_ENV,
            path = %path.display(),
            "fault injection enabled: fdatasyncs wait while this file exists"
        );
        let _ = faults.hold_while_exists.set(path);
    }
    Arc::new(FaultFs::new(StdFs, faults))
}

/// Name of the file, in the data directory, that holds the bound listen addresses.
pub const ADDRESSES_FILE: &str = "spoolgate.addr";

/// Writes the address file (see [`write_addresses`]). It takes a few bytes of new space, which
/// a filesystem filled to the last block does not have, and a daemon that cannot start cannot
/// answer 429 or deliver what it holds: so on ENOSPC the disk reserve is spent (see
/// `compaction::reserve`) and the write tried again, and without a reserve the stale file of
/// the previous process is removed (tools that read it must not find its pid and ports) and
/// the daemon starts without one.
fn publish_addresses(
    config: &Config,
    ingest: &TcpListener,
    admin: &TcpListener,
    reserve: &crate::compaction::reserve::Reserve,
) -> Result<(), DaemonError> {
    let no_space = |e: &DaemonError| matches!(e, DaemonError::AddressFile { source, .. } if source.kind() == std::io::ErrorKind::StorageFull);
    let first = match write_addresses(config, ingest, admin) {
        Err(e) if no_space(&e) => e,
        other => return other,
    };
    let spent = reserve
        .spend_to_start()
        .map_err(|source| DaemonError::AddressFile {
            path: reserve.path(),
            source,
        })?;
    let last = if spent {
        match write_addresses(config, ingest, admin) {
            Err(e) if no_space(&e) => e,
            other => return other,
        }
    } else {
        first
    };
    let path = config.data_dir.join(ADDRESSES_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(DaemonError::AddressFile { path, source }),
    }
    tracing::error!(error = %last, "the data filesystem is full: starting without an address file");
    Ok(())
}

/// Writes the bound addresses to `<data_dir>/spoolgate.addr` as JSON, so tools started with port
/// 0 (tests, drills) can find the daemon without guessing free ports. Written atomically.
fn write_addresses(
    config: &Config,
    ingest: &TcpListener,
    admin: &TcpListener,
) -> Result<(), DaemonError> {
    let io = |source| DaemonError::AddressFile {
        path: config.data_dir.join(ADDRESSES_FILE),
        source,
    };
    let body = serde_json::json!({
        "ingest": ingest.local_addr().map_err(io)?.to_string(),
        "metrics": admin.local_addr().map_err(io)?.to_string(),
        "pid": std::process::id(),
    });
    let mut tmp = tempfile::NamedTempFile::new_in(&config.data_dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, body.to_string().as_bytes()).map_err(io)?;
    tmp.persist(config.data_dir.join(ADDRESSES_FILE))
        .map_err(|e| io(e.error))?;
    Ok(())
}

fn take_sample(state: &IngestState, spool: &Spool, reclaimed: u64, elapsed: Duration) {
    let spool_bytes = spool.disk_bytes();
    let free = filesystem_free_bytes(&state.config.data_dir).unwrap_or(u64::MAX);
    state
        .backpressure
        .sample(spool_bytes, free, reclaimed, elapsed);
    let m = &state.metrics;
    m.spool_disk_bytes.set(spool_bytes as i64);
    m.spool_filesystem_free_bytes
        .set(free.min(i64::MAX as u64) as i64);
    m.spool_poisoned
        .set(i64::from(spool.poison_reason().is_some()));
    m.ingest_dedup_entries.set(state.dedup.len() as i64);
}

async fn sample_loop(state: Arc<IngestState>, spool: Spool, mut stop: watch::Receiver<bool>) {
    let mut last = Instant::now();
    let mut last_reclaimed = state.metrics.compaction_bytes_reclaimed_total.get();
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    // After a stall, one late sample covers the gap: catching up with a burst of samples
    // microseconds apart would only add noise.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let reclaimed_total = state.metrics.compaction_bytes_reclaimed_total.get();
        take_sample(&state, &spool, reclaimed_total - last_reclaimed, now - last);
        last = now;
        last_reclaimed = reclaimed_total;
    }
}

/// SIGTERM and SIGINT, caught from the first moment of `run`: a signal that arrives while the
/// spool is being recovered must stop the daemon, not kill it by the default action (or, as
/// PID 1 in a container, be dropped by the kernel, leaving the daemon to turn ready and be
/// killed at the end of the grace period).
struct ShutdownSignals {
    /// `None` when the handlers could not be installed.
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignals {
    fn install() -> ShutdownSignals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => ShutdownSignals {
                streams: Some((term, int)),
            },
            _ => {
                // Without signal handlers the daemon can only be stopped by SIGKILL, which is
                // safe (everything acknowledged is on disk), so carry on.
                tracing::warn!("could not install signal handlers; stop with SIGKILL");
                ShutdownSignals { streams: None }
            }
        }
    }

    /// Waits for SIGTERM or SIGINT.
    async fn recv(&mut self) {
        match &mut self.streams {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// Loads every dedup checkpoint into the dedup index (before the spool scan adds the ids still
/// in the spool) and returns them for compaction to prune. A file that cannot be read is
/// skipped, logged and counted: the index serves retries, and a damaged part of it must not
/// keep the daemon from starting. It is still tracked (with no entries), so it is removed once
/// its write time leaves the window.
fn load_dedup_checkpoints(
    state: &IngestState,
    metrics: &Metrics,
    dir: &std::path::Path,
) -> dedup_file::Checkpoints {
    let mut checkpoints = dedup_file::Checkpoints::default();
    let files = match dedup_file::list(dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list dedup checkpoints; ids of compacted segments are not deduplicated");
            metrics.recovery_dedup_files_skipped_total.inc();
            return checkpoints;
        }
    };
    let now_ms = ingest::now_ms();
    let (mut loaded, mut kept) = (0u64, 0u64);
    for (path, written_ms) in files {
        let entries = match dedup_file::read(&path) {
            Ok(entries) => {
                loaded += 1;
                let count = entries.len();
                for entry in entries {
                    kept += u64::from(state.dedup.insert_checkpointed(entry, now_ms));
                }
                count
            }
            Err(e) => {
                tracing::warn!(error = %e, "dedup checkpoint skipped; the ids in it are not deduplicated");
                metrics.recovery_dedup_files_skipped_total.inc();
                0
            }
        };
        checkpoints.push(dedup_file::Checkpoint {
            path,
            written_ms,
            entries,
        });
    }
    if loaded > 0 {
        tracing::info!(files = loaded, ids = kept, "dedup checkpoints loaded");
    }
    checkpoints
}

/// Removes the temp files (`.tmp*`, as `tempfile` names them) that a kill left behind while the
/// chain heads, a dedup checkpoint or the address file was being written. Without this each
/// such kill would leave one file in the data directory for good.
fn remove_stale_temp_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let is_temp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".tmp"));
        if !is_temp || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not remove a stale temp file")
            }
        }
    }
    removed
}
