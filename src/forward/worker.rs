//! A consumer worker: owns a set of slots, and for each batch of their envelopes runs
//! gate → chain → seal → sink → tombstone.
//!
//! Why seal before forwarding: a record forwarded twice must be forwarded identically, even if
//! the process dies after the sink received it and before the tombstone, and even if the rules
//! file changed in between. The worker therefore appends one SEALED record holding the complete
//! forward records of the batch (sequence numbers, hashes and gate output included) with an
//! unconditional fdatasync *before* the first byte goes to a sink. From then on the batch is
//! only ever forwarded from those sealed bytes: after a crash, replay finds the seal (no
//! tombstone) and re-sends exactly that; nothing is recomputed. The batch is sealed against a
//! copy of its streams' heads, and the shared heads move only once the seal is durable: if the
//! append fails (or the worker dies first) nothing has moved, so no sequence number is ever
//! skipped, and the `chain-heads` checkpoint never names a seal that is not on disk.
//!
//! Order: a worker handles one batch at a time and retries it until it is confirmed, dead-
//! lettered, or the worker is stopped, so records of a slot reach a sink in log order.
//!
//! Too large: a sink that answers 413 (an HTTP endpoint behind a proxy with a body limit
//! smaller than `forward.batch_bytes_max`, say) gets the batch again in two halves, first half
//! first, and so on down to single records; only a single record it still refuses is
//! dead-lettered. Order holds, since the halves go one after the other, and the deliveries are
//! bounded by twice the batch's records. The seal is unchanged: it holds the whole batch, and
//! a replay sends it whole again, to be split again if it must.
//!
//! Too large to seal: the gate can make an envelope larger (a summary, hashes; a `hash` PII
//! policy turns `a@b.co` into 24 bytes), so an envelope that fit a spool record as received may
//! not fit once gated. Such a record would fail every worker that tried it and stall its slot,
//! so it is dead-lettered instead, as gated (never with text the policy rewrote); it takes no
//! sequence number, so its stream stays gapless. That verdict depends on the rules, so it is
//! made durable before anything after it is sealed: the worker writes the dead letter, then the
//! record's tombstone (fdatasync'd), and only then appends the batch's seal. A crash before
//! that tombstone leaves nothing of the batch sealed, and the next run gates the record again:
//! it is dead-lettered again, or, if the rules changed so that it now fits, sealed with the
//! next sequence number in log order. Were the tombstone written with the batch's, after the
//! seal, that run would give it a sequence number after those of the records behind it, and a
//! sink would see 5, 7, 6. While the dead-letter directory has no room it waits, with its
//! batch, as a sink's rejected batch does.
//!
//! Unclassifiable: an envelope the gate panics on (a bug in a detector or a rule) would, like
//! one too large to seal, fail every worker that tried it. The panic is caught per envelope,
//! and the envelope is dead-lettered as spooled (what the gate left of it is neither the
//! original nor classified) and tombstoned before the batch's seal, taking no sequence number.
//! A panic in a sink is not caught: it comes after the seal, where a record can no longer be
//! left out without a gap in its stream; the worker fails, and its secondary retries the
//! batch from its seal.
//!
//! Tombstones: once a sink confirms a batch, its tombstone append runs in the background while
//! the worker gates and seals the next batch, so a batch costs two fdatasync waits on the
//! worker's path (seal, sink) instead of three. At most [`TOMBSTONES_IN_FLIGHT_MAX`] appends run
//! per worker; the worker waits for all of them before it returns, so an epoch ends with every
//! confirmed batch tombstoned (or with the append's error). A worker that panics leaves its
//! appends running on their own; a record whose tombstone lands only after the next epoch
//! re-dispatched it is sent once more, from its seal. Nothing depends on tombstones being
//! written in batch order: each names its own positions, and a record whose tombstone was not
//! yet durable at a crash is re-sent from its seal, identically.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::chain::{Chains, SealError, SealWriter, SharedRecord, Tombstone, TombstoneHead};
use crate::config::ForwardConfig;
use crate::envelope::Envelope;
use crate::forward::dead_letter::{DeadLetter, DeadLetterError};
use crate::forward::ledger::Ledger;
use crate::forward::retry::Backoff;
use crate::forward::sink::{Sink, SinkError};
use crate::gate::Gate;
use crate::ingest::server::stopped;
use crate::metrics::Metrics;
use crate::spool::{Position, RecordKind, Spool, SpoolError};

/// Bound on one worker's tombstone appends still running (see the module doc).
pub const TOMBSTONES_IN_FLIGHT_MAX: usize = 4;

/// Bytes a sealed entry adds to its envelope as spooled (the gate's output: text hash, summary
/// of up to `gate.summary_chars_max` characters, tags, hints; the chain's two hex hashes, stream,
/// sequence, slot and position), for sizing the seal buffer: an estimate, not a bound.
const SEAL_ENTRY_EXTRA_BYTES: usize = 512;

/// One envelope handed to a worker by the dispatcher.
#[derive(Debug)]
pub struct WorkItem {
    pub position: Position,
    pub envelope: Envelope,
    /// The forward record sealed in an earlier run or epoch, to be re-sent as is.
    pub sealed: Option<SharedRecord>,
    pub bytes: usize,
}

/// What the pipeline appends of its own: seals are fdatasync'd whatever the durability mode,
/// tombstones follow it (see the module doc), except the tombstone of a record too large to
/// seal, which must be durable before the seal of its batch is written.
#[derive(Debug, Clone, Copy)]
enum OwnRecord {
    Seal,
    Tombstone,
    UnsealableTombstone,
}

#[derive(Debug, PartialEq, Eq)]
enum Appended {
    Done,
    /// Stopped while waiting for room; nothing was appended.
    Stopped,
}

/// One worker's wait for room to append a seal or tombstone, shown in
/// `spoolgate_forward_appends_waiting` for as long as it lasts: the gauge is lowered when the
/// wait is dropped, however the append ends (appended, stopped, or failed).
struct AppendWait {
    since: Instant,
    reason: &'static str,
    gauge: prometheus::IntGauge,
}

impl AppendWait {
    /// Counts the wait under `reason`, moving it there if it was waiting for another reason
    /// (a full disk can give way to a lack of descriptors and back). True when the wait begins
    /// or changes reason, so that each is logged once.
    fn begin(waiting: &mut Option<AppendWait>, metrics: &Metrics, reason: &'static str) -> bool {
        if waiting.as_ref().is_some_and(|w| w.reason == reason) {
            return false;
        }
        let since = waiting.take().map_or_else(Instant::now, |w| w.since);
        let gauge = metrics.forward_appends_waiting.with_label_values(&[reason]);
        gauge.inc();
        *waiting = Some(AppendWait {
            since,
            reason,
            gauge,
        });
        true
    }
}

impl Drop for AppendWait {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Appends seals or tombstones, waiting while the filesystem is full. A full disk is not a
/// failed worker: its secondary would find the same disk, and a takeover per retry would only
/// churn the slots. The spool refuses a batch that hits ENOSPC whole (nothing of it stays, see
/// `spool::writer`), so the same records can be offered again; they are, with the sink retry
/// backoff, until they fit or `stop` fires. Meanwhile ingest answers 429, so the records that
/// wait are bounded by what was acknowledged before the disk filled. A poisoned spool parks
/// the worker until it is stopped (only a restart clears the poison); any other error fails
/// it.
async fn append_when_space(
    ctx: &WorkerContext,
    records: Vec<(RecordKind, Bytes)>,
    kind: OwnRecord,
    mut stop: watch::Receiver<bool>,
) -> Result<Appended, WorkerError> {
    let what = match kind {
        OwnRecord::Seal => "seal",
        OwnRecord::Tombstone | OwnRecord::UnsealableTombstone => "tombstone",
    };
    let mut backoff = ctx.retry_backoff();
    let mut waiting: Option<AppendWait> = None;
    loop {
        // A vector of reference-counted payloads: the copy for a retry costs no payload bytes.
        let attempt = match kind {
            OwnRecord::Seal | OwnRecord::UnsealableTombstone => {
                ctx.spool.append_synced(records.clone()).await
            }
            OwnRecord::Tombstone => ctx.spool.append(records.clone()).await,
        };
        match attempt {
            Ok(_) => {
                if let Some(wait) = waiting {
                    tracing::info!(
                        record = what,
                        waited_ms = wait.since.elapsed().as_millis() as u64,
                        "spool has room again; appended"
                    );
                }
                return Ok(Appended::Done);
            }
            Err(SpoolError::Full(why)) => {
                if AppendWait::begin(&mut waiting, &ctx.metrics, "full") {
                    tracing::warn!(record = what, %why, "spool full; forwarding waits for room to append");
                }
                // Delivering and tombstoning is what lets compaction free space, so the
                // reserve goes to this append; ingest is refused until its space is free again.
                if crate::compaction::reserve::spend_when_full(ctx.reserve.as_ref(), what).await {
                    continue;
                }
                let wait = backoff.next_delay(None);
                tokio::select! {
                    _ = stopped(&mut stop) => return Ok(Appended::Stopped),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(SpoolError::Busy(why)) => {
                // No descriptor for a new segment: nothing was written, and the next attempt
                // may find one. Waited out like a full disk, without spending the reserve.
                if AppendWait::begin(&mut waiting, &ctx.metrics, "busy") {
                    tracing::warn!(record = what, %why, "spool cannot open a segment; forwarding waits");
                }
                let wait = backoff.next_delay(None);
                tokio::select! {
                    _ = stopped(&mut stop) => return Ok(Appended::Stopped),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(SpoolError::Poisoned(why)) => {
                // Nothing more can be appended until a restart, by this worker or any other:
                // a takeover would only churn the slots (and page as a stuck worker). Park
                // until stopped; the batch stays as a crash here would leave it.
                tracing::error!(record = what, %why, "spool poisoned; forwarding stops until a restart");
                stopped(&mut stop).await;
                return Ok(Appended::Stopped);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The tombstone records naming `positions` and the streams' `heads`, in as few records as
/// fit `record_bytes_max`. The heads go first, in the first record, so that no position is
/// durable without the heads of its batch (a crash can leave the first records of one append
/// on disk and not the last). Stored in a frame (each byte 0xF7 taking two, spool-format.md
/// §3), a position takes at most 50 bytes (a map of two named u64: 34, and up to 16 bytes
/// 0xF7 in the numbers), a head at most 109 besides its stream name (97, 8 in its `seq` and 4
/// in the name's length prefix; the name itself is UTF-8, which has no 0xF7), and a record's
/// own map and array headers at most 35;
/// the estimates below round each up.
fn tombstone_records(
    positions: &[Position],
    heads: Vec<TombstoneHead>,
    record_bytes_max: u32,
) -> Result<Vec<(RecordKind, Bytes)>, WorkerError> {
    const POSITION_BYTES_MAX: usize = 52;
    const HEAD_BYTES_MAX_BESIDE_NAME: usize = 110;
    const HEADERS_BYTES_MAX: usize = 40;
    let room = record_bytes_max as usize;
    let mut tombstones = Vec::new();
    let mut current = Tombstone::default();
    let mut current_bytes = HEADERS_BYTES_MAX;
    let mut flush = |t: &mut Tombstone, bytes: &mut usize| {
        if !t.positions.is_empty() || !t.heads.is_empty() {
            tombstones.push(std::mem::take(t));
        }
        *bytes = HEADERS_BYTES_MAX;
    };
    // A head a start would ignore (see `TombstoneHead::chain_head`) is not written, and
    // neither is one whose stream name alone would not fit a record: heads are a second
    // source of what the seals already hold, so leaving one out costs nothing but that.
    let heads = heads.into_iter().filter(|h| {
        h.chain_head().is_some()
            && HEADERS_BYTES_MAX + h.stream.len() + HEAD_BYTES_MAX_BESIDE_NAME <= room
    });
    for head in heads {
        let bytes = head.stream.len() + HEAD_BYTES_MAX_BESIDE_NAME;
        if current_bytes + bytes > room {
            flush(&mut current, &mut current_bytes);
        }
        current.heads.push(head);
        current_bytes += bytes;
    }
    for &position in positions {
        if current_bytes + POSITION_BYTES_MAX > room {
            flush(&mut current, &mut current_bytes);
        }
        current.positions.push(position);
        current_bytes += POSITION_BYTES_MAX;
    }
    flush(&mut current, &mut current_bytes);
    tombstones
        .into_iter()
        .map(|t| {
            let payload = t
                .encode()
                .map_err(|e| WorkerError::Spool(SpoolError::Invalid(e.to_string())))?;
            // The estimates above are upper bounds: a record they admitted fits.
            let stored = crate::spool::format::stored_len(&payload);
            assert!(
                stored <= room,
                "a tombstone record of {stored} bytes stored exceeds record_bytes_max {room}"
            );
            Ok((RecordKind::TOMBSTONE, Bytes::from(payload)))
        })
        .collect()
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("sink {sink} did not answer within the worker deadline of {deadline_ms} ms")]
    Stuck { sink: String, deadline_ms: u64 },
    #[error("spool append failed: {0}")]
    Spool(#[from] SpoolError),
}

/// What a worker shares with the rest of the pipeline.
pub struct WorkerContext {
    pub spool: Spool,
    pub gate: Arc<Gate>,
    /// Every stream's head, as of its last durable seal: what the next seal links to and what
    /// compaction checkpoints. A worker advances it only once its seal append has returned.
    pub chains: Arc<Mutex<Chains>>,
    pub ledger: Arc<Ledger>,
    pub sinks: BTreeMap<String, Arc<dyn Sink>>,
    pub dead_letter: DeadLetter,
    pub config: ForwardConfig,
    pub metrics: Arc<Metrics>,
    /// Woken after every tombstone append, so compaction can look.
    pub compaction: Arc<tokio::sync::Notify>,
    /// Spent when a seal or tombstone finds the spool full: forwarding is what frees space.
    pub reserve: Option<Arc<crate::compaction::reserve::Reserve>>,
    /// Woken whenever a worker takes a batch from its inbox, so the dispatcher can feed a
    /// worker it had to leave behind (see `pipeline`).
    pub room: Arc<tokio::sync::Notify>,
}

impl WorkerContext {
    /// Completes `positions` once their tombstone is written: compaction may then delete
    /// them, so it is woken.
    fn tombstoned(&self, positions: &[Position]) {
        self.ledger.complete(positions);
        self.metrics
            .tombstones_written_total
            .inc_by(positions.len() as u64);
        self.compaction.notify_one();
    }

    /// The backoff of every retry in a worker: a sink's failures, and the waits for room in
    /// the spool and the dead-letter directory (`forward.retry_initial_ms` / `retry_max_ms`,
    /// jittered with a random seed so workers do not retry in step).
    fn retry_backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(self.config.retry_initial_ms),
            Duration::from_millis(self.config.retry_max_ms),
            fastrand::u64(..),
        )
    }
}

pub struct Worker {
    pub id: usize,
    pub ctx: Arc<WorkerContext>,
    pub inbox: mpsc::Receiver<WorkItem>,
    pub stop: watch::Receiver<bool>,
    /// Tombstone appends of confirmed batches, oldest first; at most
    /// [`TOMBSTONES_IN_FLIGHT_MAX`]. Created empty; drained before `run` returns.
    pub tombstones: std::collections::VecDeque<tokio::task::JoinHandle<Result<(), WorkerError>>>,
}

impl Worker {
    /// Runs until stopped (Ok) or until something makes this worker unfit (Err): the
    /// supervisor then hands its slots to their secondary.
    pub async fn run(mut self) -> Result<(), WorkerError> {
        let result = self.run_batches().await;
        // Wait for the tombstones of every confirmed batch, even when stopping on an error, so
        // the next epoch does not re-send what is already confirmed. The first error wins.
        let drained = self.wait_tombstones(0).await;
        result.and(drained)
    }

    /// Waits until at most `in_flight_max` tombstone appends are running.
    async fn wait_tombstones(&mut self, in_flight_max: usize) -> Result<(), WorkerError> {
        let mut first_error = None;
        while self.tombstones.len() > in_flight_max {
            let Some(handle) = self.tombstones.pop_front() else {
                break;
            };
            let outcome = match handle.await {
                Ok(outcome) => outcome,
                Err(e) => Err(WorkerError::Spool(SpoolError::Invalid(format!(
                    "tombstone task failed: {e}"
                )))),
            };
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn run_batches(&mut self) -> Result<(), WorkerError> {
        let label = self.id.to_string();
        let lag = self
            .ctx
            .metrics
            .forward_lag_records
            .with_label_values(&[&label]);
        // However this worker ends (stopped, failed, panicked), its inbox goes with its epoch
        // and the records are dispatched again to whoever owns them next: it holds none.
        struct ZeroOnDrop(prometheus::IntGauge);
        impl Drop for ZeroOnDrop {
            fn drop(&mut self) {
                self.0.set(0);
            }
        }
        let lag = ZeroOnDrop(lag);
        let lag = &lag.0;
        loop {
            let Some(batch) = self.next_batch().await else {
                return Ok(());
            };
            self.ctx.room.notify_one();
            lag.set(batch.len() as i64 + self.inbox.len() as i64);
            let done = self.process(batch).await?;
            if !done {
                return Ok(());
            }
            lag.set(self.inbox.len() as i64);
        }
    }

    /// Waits for a first item, then lingers up to `linger_ms` to fill the batch up to its
    /// record and byte bounds. `None` when stopped or when the dispatcher is gone.
    async fn next_batch(&mut self) -> Option<Vec<WorkItem>> {
        let cfg = &self.ctx.config;
        let first = tokio::select! {
            biased;
            _ = stopped(&mut self.stop) => return None,
            item = self.inbox.recv() => item?,
        };
        let mut bytes = first.bytes;
        // Room for what is already queued (at most the inbox's bound), so a busy worker's batch
        // does not grow by doubling; an idle one's stays small.
        let mut batch = Vec::with_capacity(cfg.batch_records_max.min(self.inbox.len() + 1));
        batch.push(first);
        let linger = tokio::time::sleep(Duration::from_millis(cfg.linger_ms));
        tokio::pin!(linger);
        while batch.len() < cfg.batch_records_max && bytes < cfg.batch_bytes_max {
            let item = match self.inbox.try_recv() {
                Ok(item) => item,
                Err(_) => tokio::select! {
                    _ = &mut linger => break,
                    item = self.inbox.recv() => match item { Some(i) => i, None => break },
                },
            };
            bytes += item.bytes;
            batch.push(item);
        }
        Some(batch)
    }

    /// Gates and chains the unsealed items, dead-letters and tombstones those too large to
    /// seal, and makes the seal durable. Returns the forward records in batch order, or `None`
    /// when stopped while waiting for room, in the spool or in the dead-letter directory:
    /// nothing is sealed then, and no head has moved.
    async fn seal(&self, batch: &mut [WorkItem]) -> Result<Option<Vec<SharedRecord>>, WorkerError> {
        let ctx = &self.ctx;
        let invalid =
            |e: crate::chain::ChainError| WorkerError::Spool(SpoolError::Invalid(e.to_string()));
        // Classification is the expensive part and depends only on the envelope and the rules,
        // not on any chain state.
        let mut gated = Vec::with_capacity(batch.len());
        // Records the gate panicked on (a bug in a detector or a rule): each would fail every
        // worker that tried it, as a record too large to seal would, and is dead-lettered the
        // same way (below), as it was spooled, since the gate left it half done.
        let mut unclassifiable: Vec<(usize, String)> = Vec::new();
        for (i, item) in batch.iter_mut().enumerate() {
            if item.sealed.is_some() {
                continue;
            }
            let started = Instant::now();
            let mut env = std::mem::take(&mut item.envelope);
            let classified = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ctx.gate.classify(&mut env)
            }));
            if classified.is_err() {
                // Only where: the message may quote the text (see `gate::quiet_classify_panics`).
                let at = crate::gate::take_panic_location()
                    .map_or_else(String::new, |at| format!(" at {at}"));
                unclassifiable.push((i, format!("the gate panicked on this envelope{at}")));
                continue;
            }
            ctx.metrics
                .gate_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            gated.push((i, env));
        }
        // A sealed entry is its envelope plus the gate's output and the chain fields (hashes,
        // summary): a few hundred bytes more than the envelope as spooled.
        let payload_hint: usize = batch.iter().map(|i| i.bytes + SEAL_ENTRY_EXTRA_BYTES).sum();
        let mut writer = SealWriter::new(ctx.spool.record_bytes_max(), payload_hint);
        // The batch is sealed against its own copy of the heads of the streams it touches, and
        // the shared heads move only once the seal is durable. So the shared heads are always
        // those of durable seals, which is what compaction checkpoints and what a restart
        // continues from: a seal that fails, or a worker that panics half-way, leaves nothing
        // to roll back, and a checkpoint can never name a sequence number no seal on disk
        // holds. This worker owns these streams' slots, so no other worker seals them
        // meanwhile; and no lock is held while the batch is encoded and hashed.
        let mut heads = Chains::new();
        {
            let shared = ctx.chains.lock().unwrap_or_else(|p| p.into_inner());
            for (_, env) in &gated {
                let stream = env.stream();
                if heads.head(stream).is_none() {
                    if let Some(head) = shared.head(stream) {
                        heads.restore(stream, Some(head));
                    }
                }
            }
        }
        let mut unsealable: Vec<(usize, SealError)> = Vec::new();
        let mut sealed_here = Vec::with_capacity(gated.len());
        for (i, env) in gated {
            match writer.seal(&mut heads, batch[i].position, env) {
                Ok(record) => sealed_here.push((i, SharedRecord::new(record))),
                // A record whose gated form cannot fit a spool record would fail every worker
                // that tried it and stall its slot for good. It takes no sequence number (the
                // head is unchanged), goes to the dead-letter directory below and is tombstoned
                // before the batch's seal is written.
                Err(e @ SealError::TooLarge { .. }) => unsealable.push((i, e)),
                Err(SealError::Chain(e)) => return Err(invalid(e)),
            }
        }
        let unsealable_count = unsealable.len() + unclassifiable.len();
        // The verdicts "too large to seal" and "the gate panicked" depend on the rules: each is
        // made durable (dead letter, then tombstone) before anything behind it is sealed (see
        // the module doc).
        if unsealable_count > 0 {
            let positions: Vec<Position> = unsealable
                .iter()
                .map(|(i, _)| batch[*i].position)
                .chain(unclassifiable.iter().map(|(i, _)| batch[*i].position))
                .collect();
            for (i, reason) in unclassifiable {
                if !self
                    .dead_letter_unclassifiable(batch[i].position, &reason)
                    .await?
                {
                    return Ok(None);
                }
            }
            for (i, e) in unsealable {
                let reason = e.to_string();
                if let Some(envelope) = e.into_envelope() {
                    if !self
                        .dead_letter_unsealable(batch[i].position, &reason, &envelope)
                        .await?
                    {
                        // Stopped while waiting for room: nothing of the batch is sealed yet,
                        // and it is gated again, next time.
                        return Ok(None);
                    }
                }
            }
            // These records took no sequence number: no stream's head moved.
            let tombstone =
                tombstone_records(&positions, Vec::new(), ctx.spool.record_bytes_max())?;
            let appended = append_when_space(
                ctx,
                tombstone,
                OwnRecord::UnsealableTombstone,
                self.stop.clone(),
            )
            .await?;
            if appended == Appended::Stopped {
                return Ok(None);
            }
            ctx.tombstoned(&positions);
        }
        if !writer.is_empty() {
            // A seal split over several records goes to the spool one record at a time, each
            // durable before the next is written. Written together, they would share one
            // fdatasync, and a power loss before it could keep a later record without an
            // earlier one (pages reach the disk in any order): the restart would take the
            // later entries as sealed, the earlier ones as not, and seal those afresh after
            // them, leaving a gap and a reordering in their stream's chain. One at a time, only
            // the last record written can be lost, and what is durable is always the first
            // entries of the batch, each stream's in sequence order.
            let mut sealed_here = sealed_here.into_iter();
            let mut durable = Vec::new();
            let mut durable_heads = Chains::new();
            let mut outcome = Ok(Appended::Done);
            for (payload, entries) in writer.finish_parts() {
                let record = vec![(RecordKind::SEALED, payload)];
                outcome = append_when_space(ctx, record, OwnRecord::Seal, self.stop.clone()).await;
                if !matches!(outcome, Ok(Appended::Done)) {
                    break;
                }
                durable.extend(sealed_here.by_ref().take(entries));
            }
            let whole = matches!(outcome, Ok(Appended::Done));
            if !whole {
                // Where the durable part leaves each stream (the local heads are where the
                // whole seal would have).
                for (_, record) in &durable {
                    if let Some(head) = record.chain_head() {
                        durable_heads.advance(&record.stream, head);
                    }
                }
            }
            // What is durable is sealed, whether or not the rest of the seal followed: a
            // later attempt re-sends those entries from their seal, as a restart would, and
            // seals the others after them.
            for (i, record) in durable {
                batch[i].sealed = Some(record);
            }
            ctx.ledger.record_sealed(
                batch
                    .iter()
                    .filter_map(|i| i.sealed.clone().map(|r| (i.position, r))),
            );
            {
                let mut shared = ctx.chains.lock().unwrap_or_else(|p| p.into_inner());
                for (stream, head) in if whole { &heads } else { &durable_heads }.iter() {
                    shared.advance(stream, head);
                }
                ctx.metrics.chain_streams.set(shared.len() as i64);
            }
            if outcome? == Appended::Stopped {
                return Ok(None);
            }
        }
        let records: Vec<SharedRecord> = batch.iter().filter_map(|i| i.sealed.clone()).collect();
        assert_eq!(
            records.len() + unsealable_count,
            batch.len(),
            "every item sealed or dead-lettered"
        );
        Ok(Some(records))
    }

    /// Keeps an envelope that could not be sealed in the dead-letter directory, as gated (its
    /// text masked or hashed per the PII policy), with the reason. Its tombstone follows, before
    /// the batch's seal; until then it stays pending, and a retry dead-letters it again. With no room
    /// for the file (the directory's bound, or a full filesystem) it waits with the sink retry
    /// backoff, as a sink's rejected batch does, rather than fail the worker: a secondary
    /// would find no more room. `Ok(false)` when stopped while waiting.
    async fn dead_letter_unsealable(
        &self,
        position: Position,
        reason: &str,
        envelope: &Envelope,
    ) -> Result<bool, WorkerError> {
        let ctx = &self.ctx;
        // Counted against the sink the envelope would have gone to: its records wait.
        let sink = envelope
            .routing_hints
            .get("sink")
            .filter(|n| ctx.sinks.contains_key(n.as_str()))
            .map_or("default", |n| n.as_str());
        let mut backoff = ctx.retry_backoff();
        let mut stop = self.stop.clone();
        let mut logged = false;
        loop {
            match crate::forward::run_blocking(|| {
                ctx.dead_letter.write_unsealable(position, reason, envelope)
            }) {
                Ok(path) => {
                    ctx.metrics
                        .gate_envelopes_total
                        .with_label_values(&["unsealable"])
                        .inc();
                    tracing::error!(
                        segment = position.segment,
                        offset = position.offset,
                        id = %envelope.id,
                        reason,
                        file = %path.display(),
                        "envelope cannot be sealed; dead-lettered"
                    );
                    return Ok(true);
                }
                // A failing dead-letter directory (no room, a quota, permissions, a read-only
                // filesystem) is waited out like a full one: failing the worker instead would
                // fail its secondary on the same record too, and leave the slot with no owner.
                Err(failed) => {
                    let kind = match failed {
                        DeadLetterError::Io(_) => "dead_letter_failed",
                        _ => "dead_letter_full",
                    };
                    ctx.metrics
                        .forward_errors_total
                        .with_label_values(&[sink, kind])
                        .inc();
                    if !logged {
                        logged = true;
                        tracing::error!(id = %envelope.id, reason, error = %failed, "envelope cannot be sealed and the dead-letter directory cannot take it; its batch waits and is retried with backoff");
                    }
                    tokio::select! {
                        _ = stopped(&mut stop) => return Ok(false),
                        _ = tokio::time::sleep(backoff.next_delay(None)) => {}
                    }
                }
            }
        }
    }

    /// Dead-letters the envelope record at `position` as it was spooled (raw bytes, as the
    /// dispatcher keeps a record that does not decode): the gate panicked on it, and what the
    /// gate left of it is neither the original nor classified. Waits while the dead-letter
    /// directory has no room, as [`Worker::dead_letter_unsealable`] does; `Ok(false)` when
    /// stopped meanwhile.
    async fn dead_letter_unclassifiable(
        &self,
        position: Position,
        reason: &str,
    ) -> Result<bool, WorkerError> {
        let ctx = &self.ctx;
        let mut backoff = ctx.retry_backoff();
        let mut stop = self.stop.clone();
        // Its segment is kept (the record is pending). A read that fails is retried with
        // backoff, as it may be passing; a record that reads as another (damage found since it
        // was dispatched) never will, and failing the worker for it would stall its slot for
        // good, so that letter says so and holds no bytes.
        let (record_payload, reason) = loop {
            let spool = ctx.spool.clone();
            let read = tokio::task::spawn_blocking(move || spool.reader(position).next_record())
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match read {
                Ok(Some(record)) if record.position == position => {
                    break (record.payload, reason.to_string());
                }
                Ok(_) => {
                    break (
                        bytes::Bytes::new(),
                        format!(
                            "{reason}; its spooled bytes are no longer readable at its \
                             position (damaged since it was dispatched)"
                        ),
                    )
                }
                Err(e) => {
                    // Counted as the dispatcher counts its read errors: the slot waits here.
                    ctx.metrics
                        .forward_errors_total
                        .with_label_values(&["default", "io"])
                        .inc();
                    tracing::warn!(segment = position.segment, offset = position.offset, error = %e, "cannot read back an envelope the gate panicked on; retrying");
                    tokio::select! {
                        _ = stopped(&mut stop) => return Ok(false),
                        _ = tokio::time::sleep(backoff.next_delay(None)) => {}
                    }
                }
            }
        };
        let reason = reason.as_str();
        let mut logged = false;
        loop {
            match crate::forward::run_blocking(|| {
                ctx.dead_letter.write_raw(position, reason, &record_payload)
            }) {
                Ok(path) => {
                    ctx.metrics
                        .gate_envelopes_total
                        .with_label_values(&["unclassifiable"])
                        .inc();
                    tracing::error!(
                        segment = position.segment,
                        offset = position.offset,
                        reason,
                        file = %path.display(),
                        "the gate panicked on an envelope; dead-lettered as spooled"
                    );
                    return Ok(true);
                }
                Err(failed) => {
                    // As for an unsealable envelope, so that SpoolgateDeadLetterFull fires while
                    // the slot waits; the gate gave no route, so the default sink's records wait.
                    let kind = match failed {
                        DeadLetterError::Io(_) => "dead_letter_failed",
                        _ => "dead_letter_full",
                    };
                    ctx.metrics
                        .forward_errors_total
                        .with_label_values(&["default", kind])
                        .inc();
                    if !logged {
                        logged = true;
                        tracing::error!(reason, error = %failed, "the gate panicked on an envelope and the dead-letter directory cannot take it; its batch waits and is retried with backoff");
                    }
                    tokio::select! {
                        _ = stopped(&mut stop) => return Ok(false),
                        _ = tokio::time::sleep(backoff.next_delay(None)) => {}
                    }
                }
            }
        }
    }

    /// Processes one batch to completion. `Ok(false)` when stopped before the batch was
    /// confirmed (it stays pending and sealed; it is re-sent identically later).
    async fn process(&mut self, mut batch: Vec<WorkItem>) -> Result<bool, WorkerError> {
        let Some(records) = self.seal(&mut batch).await? else {
            return Ok(false);
        };
        // A record too large to seal was tombstoned before the seal (see `seal`).
        let positions: Vec<Position> = batch
            .iter()
            .filter(|i| i.sealed.is_some())
            .map(|i| i.position)
            .collect();
        // Where the batch leaves its streams, for the tombstone (see `Tombstone`).
        let heads = TombstoneHead::of_records(records.iter().map(|r| r.as_ref()));
        // Sink names are borrowed from the configuration, not copied per record.
        let ctx = self.ctx.clone();
        let mut by_sink: BTreeMap<&str, Vec<SharedRecord>> = BTreeMap::new();
        for r in records {
            let hinted = r.envelope.routing_hints.get("sink");
            let name = hinted
                .and_then(|n| ctx.sinks.get_key_value(n.as_str()))
                .map_or("default", |(name, _)| name.as_str());
            // The rules that routed a sealed record may name a sink the configuration no
            // longer has (removed while the record waited): it goes to the default one, which
            // an operator must be able to see.
            if let Some(hinted) = hinted.filter(|h| h.as_str() != name) {
                tracing::warn!(sink = %hinted, stream = %r.stream, seq = r.seq, "a sealed record names a sink that is not configured; delivering it to the default sink");
            }
            by_sink.entry(name).or_default().push(r);
        }
        for (name, records) in &by_sink {
            if !self.deliver_in_parts(name, records).await? {
                return Ok(false);
            }
        }
        if positions.is_empty() {
            return Ok(true);
        }
        let tombstones = tombstone_records(&positions, heads, self.ctx.spool.record_bytes_max())?;
        self.wait_tombstones(TOMBSTONES_IN_FLIGHT_MAX - 1).await?;
        let ctx = self.ctx.clone();
        let stop = self.stop.clone();
        self.tombstones.push_back(tokio::spawn(async move {
            let appended = append_when_space(&ctx, tombstones, OwnRecord::Tombstone, stop).await?;
            if appended == Appended::Stopped {
                // Delivered, not tombstoned: pending still, so re-sent from its seal later, as
                // after a crash at this point.
                return Ok(());
            }
            // Only a written tombstone (durable per the mode) completes a record: compaction
            // may then delete it. Whichever of the two a power failure undoes, the record was
            // delivered; at worst it is delivered again, from its seal.
            ctx.tombstoned(&positions);
            Ok(())
        }));
        Ok(true)
    }

    /// Delivers one sink's share of a batch, halving any part the sink refuses as too large
    /// (see the module doc). `Ok(false)` when stopped while waiting to retry.
    async fn deliver_in_parts(
        &mut self,
        name: &str,
        records: &[SharedRecord],
    ) -> Result<bool, WorkerError> {
        // Parts still to deliver, the next one last; at most one entry per level of halving
        // plus one, so about log2 of the batch.
        let mut parts: Vec<std::ops::Range<usize>> = Vec::with_capacity(64);
        parts.push(0..records.len());
        while let Some(part) = parts.pop() {
            match self.deliver(name, &records[part.clone()]).await? {
                Delivery::Done => {}
                Delivery::Stopped => return Ok(false),
                Delivery::TooLarge => {
                    let middle = part.start + part.len() / 2;
                    tracing::info!(
                        sink = name,
                        records = part.len(),
                        "sink refused a batch as too large (413), or cut it off while it was sent several times running; sending it in two halves"
                    );
                    parts.push(middle..part.end);
                    parts.push(part.start..middle);
                }
            }
        }
        Ok(true)
    }

    /// Delivers one part, retrying retryable failures with backoff.
    async fn deliver(
        &mut self,
        name: &str,
        records: &[SharedRecord],
    ) -> Result<Delivery, WorkerError> {
        let ctx = self.ctx.clone();
        let sink = ctx
            .sinks
            .get(name)
            .expect("sink chosen from the configured set")
            .clone();
        let m = &ctx.metrics;
        let deadline = Duration::from_millis(ctx.config.worker_deadline_ms);
        let mut backoff = ctx.retry_backoff();
        let mut failing_since: Option<Instant> = None;
        let mut dead_letter_full_logged = false;
        // Attempts in a row that the sink cut off while the batch was being sent.
        let mut cut_off_running = 0u32;
        loop {
            let started = Instant::now();
            let outcome = tokio::time::timeout(deadline, sink.deliver(records)).await;
            let wait = match outcome {
                Err(_) => {
                    m.forward_errors_total
                        .with_label_values(&[name, "timeout"])
                        .inc();
                    return Err(WorkerError::Stuck {
                        sink: name.to_string(),
                        deadline_ms: ctx.config.worker_deadline_ms,
                    });
                }
                Ok(Ok(())) => {
                    m.forward_batch_duration_seconds
                        .with_label_values(&[name])
                        .observe(started.elapsed().as_secs_f64());
                    m.forward_records_total
                        .with_label_values(&[name])
                        .inc_by(records.len() as u64);
                    if let Some(since) = failing_since {
                        tracing::info!(
                            sink = name,
                            failing_for_ms = since.elapsed().as_millis() as u64,
                            "sink recovered"
                        );
                    }
                    return Ok(Delivery::Done);
                }
                Ok(Err(SinkError::Rejected { status, .. }))
                    if status == PAYLOAD_TOO_LARGE && records.len() > 1 =>
                {
                    m.forward_errors_total
                        .with_label_values(&[name, "too_large"])
                        .inc();
                    return Ok(Delivery::TooLarge);
                }
                Ok(Err(SinkError::Rejected { status, reason })) => {
                    m.forward_errors_total
                        .with_label_values(&[name, "rejected"])
                        .inc();
                    match crate::forward::run_blocking(|| {
                        ctx.dead_letter.write(name, status, &reason, records)
                    }) {
                        Ok(path) => {
                            m.forward_dead_lettered_records_total
                                .with_label_values(&[name])
                                .inc_by(records.len() as u64);
                            tracing::warn!(sink = name, status, %reason, file = %path.display(), records = records.len(), "sink rejected a batch; dead-lettered");
                            return Ok(Delivery::Done);
                        }
                        // The batch stays pending and goes to the sink again after a back-off:
                        // the sink may take it by then, or the operator may have made room.
                        // A dead-letter directory that cannot take it (no room, a quota,
                        // permissions) is waited out: failing the worker would fail its
                        // secondary on the same batch and leave the slot with no owner.
                        Err(failed) => {
                            let kind = match failed {
                                DeadLetterError::Io(_) => "dead_letter_failed",
                                _ => "dead_letter_full",
                            };
                            m.forward_errors_total
                                .with_label_values(&[name, kind])
                                .inc();
                            failing_since.get_or_insert_with(Instant::now);
                            if !dead_letter_full_logged {
                                dead_letter_full_logged = true;
                                tracing::error!(sink = name, status, %reason, error = %failed, records = records.len(), "sink rejected a batch that the dead-letter directory cannot take; it stays pending and is retried with backoff");
                            }
                            backoff.next_delay(None)
                        }
                    }
                }
                Ok(Err(SinkError::CutOff { reason })) => {
                    m.forward_errors_total
                        .with_label_values(&[name, "retryable"])
                        .inc();
                    cut_off_running += 1;
                    if cut_off_running >= CUT_OFF_SPLIT_AFTER && records.len() > 1 {
                        tracing::warn!(
                            sink = name,
                            %reason,
                            records = records.len(),
                            "sink closed the connection while taking this batch {CUT_OFF_SPLIT_AFTER} times running; sending it in two halves (a sink with a body limit may answer 413 and close before reading the body)"
                        );
                        return Ok(Delivery::TooLarge);
                    }
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(sink = name, %reason, "sink failing; retrying with backoff");
                    }
                    backoff.next_delay(None)
                }
                Ok(Err(SinkError::Retryable {
                    reason,
                    retry_after,
                })) => {
                    cut_off_running = 0;
                    m.forward_errors_total
                        .with_label_values(&[name, "retryable"])
                        .inc();
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        tracing::warn!(sink = name, %reason, "sink failing; retrying with backoff");
                    }
                    backoff.next_delay(retry_after)
                }
            };
            m.forward_retries_total.with_label_values(&[name]).inc();
            tokio::select! {
                _ = stopped(&mut self.stop) => return Ok(Delivery::Stopped),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Attempts in a row on which the sink closed the connection while the batch was being sent
/// after which the batch is split in halves as after a 413 ([`SinkError::CutOff`]). A sink
/// that is merely restarting costs a batch split in two; one whose body limit answers 413
/// before reading the body would otherwise get the same batch, with backoff, forever.
const CUT_OFF_SPLIT_AFTER: u32 = 3;

/// How one delivery attempt loop ended.
enum Delivery {
    /// Confirmed by the sink, or dead-lettered.
    Done,
    /// The worker was stopped while waiting to retry.
    Stopped,
    /// The sink answered 413 for a part of more than one record.
    TooLarge,
}

/// The status a sink answers when a request body is over its limit.
const PAYLOAD_TOO_LARGE: u16 = 413;

#[cfg(test)]
mod tests {
    use super::*;

    fn head(stream: &str, seq: u64) -> TombstoneHead {
        TombstoneHead {
            stream: stream.to_string(),
            seq,
            hash: "ab".repeat(32),
        }
    }

    fn stored_len(payload: &[u8]) -> usize {
        crate::spool::format::stored_len(payload)
    }

    #[test]
    fn an_append_wait_is_counted_under_its_current_reason_until_it_is_dropped() {
        let metrics = Metrics::new();
        let count = |reason: &str| {
            metrics
                .forward_appends_waiting
                .with_label_values(&[reason])
                .get()
        };
        let mut waiting = None;
        assert!(AppendWait::begin(&mut waiting, &metrics, "full"));
        let since = waiting.as_ref().map(|w: &AppendWait| w.since);
        assert!(!AppendWait::begin(&mut waiting, &metrics, "full"));
        assert_eq!((count("full"), count("busy")), (1, 0));
        // A change of reason moves the wait without restarting its clock.
        assert!(AppendWait::begin(&mut waiting, &metrics, "busy"));
        assert_eq!((count("full"), count("busy")), (0, 1));
        assert_eq!(waiting.as_ref().map(|w| w.since), since);
        drop(waiting);
        assert_eq!((count("full"), count("busy")), (0, 0));
    }

    fn decoded(records: &[(RecordKind, Bytes)]) -> Vec<Tombstone> {
        records
            .iter()
            .map(|(kind, payload)| {
                assert_eq!(*kind, RecordKind::TOMBSTONE);
                Tombstone::decode(payload).expect("decodes")
            })
            .collect()
    }

    #[test]
    fn tombstones_split_to_fit_a_record_and_carry_the_heads_in_the_first() {
        let positions: Vec<Position> = (0..200)
            .map(|i| Position {
                // Numbers made of bytes 0xF7, each stored as two (spool-format.md §3).
                segment: u64::from_le_bytes([0xF7; 8]) - 256 * i,
                offset: u64::from_le_bytes([0xF7; 8]) - 7 * 256 * i,
            })
            .collect();
        let heads = vec![head("tenant-a", 17), head(&"s".repeat(300), 4)];
        let room = 1024;
        let records = tombstone_records(&positions, heads.clone(), room).unwrap();
        assert!(records.len() > 1, "200 positions do not fit one KiB");
        assert!(records.iter().all(|(_, p)| stored_len(p) <= room as usize));
        let tombstones = decoded(&records);
        assert_eq!(tombstones[0].heads, heads);
        assert!(tombstones[1..].iter().all(|t| t.heads.is_empty()));
        let written: Vec<Position> = tombstones
            .iter()
            .flat_map(|t| t.positions.iter().copied())
            .collect();
        assert_eq!(written, positions);
    }

    #[test]
    fn heads_a_start_would_ignore_or_that_cannot_fit_a_record_are_left_out() {
        let mut bad_hash = head("b", 3);
        bad_hash.hash = "not hex".into();
        let heads = vec![
            head("a", 0),
            bad_hash,
            head(&"x".repeat(2000), 5),
            head("c", 9),
        ];
        let positions = [Position {
            segment: 1,
            offset: 64,
        }];
        let records = tombstone_records(&positions, heads, 1024).unwrap();
        let tombstones = decoded(&records);
        assert_eq!(tombstones.len(), 1);
        assert_eq!(tombstones[0].heads, vec![head("c", 9)]);
        assert_eq!(tombstones[0].positions, positions);
    }
}
