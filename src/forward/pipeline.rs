//! The pipeline: a dispatcher that reads the spool in log order and hands each pending envelope
//! to the worker owning its slot, and a supervisor that runs the dispatcher and the workers in
//! *epochs*.
//!
//! Reading: the dispatcher takes records from the memory ring while the ring holds the record at
//! its cursor, and reads them back from the segments otherwise (at start-up, after a ring
//! overflow, after a rewind). Its memory is bounded by one read chunk
//! ([`READ_CHUNK_RECORDS_MAX`]) and the workers' bounded inboxes
//! (`forward.worker_queue_records_max` each), plus one reader window per worker left behind
//! (below); the ring overflows into the segments rather than blocking ingest.
//!
//! Full inboxes: when the inbox of the worker owning a record stays full for
//! [`LEAVE_BEHIND_AFTER`] (its sink is down or very slow and being retried), the dispatcher does
//! not wait for it longer while other workers can take records: it *leaves that worker behind*
//! at that record's position and goes on, skipping the
//! worker's later records. Once the worker has taken a batch and its inbox is at least half
//! empty, the dispatcher re-reads the segments from where it left the worker, hands it only its
//! own pending records, in log order, and rejoins it to the main pass when that reading reaches
//! the main cursor. Per-slot order holds because a slot's records reach its worker either all
//! from the main pass or, from the first one left behind on, all from the re-read. So a stuck
//! sink holds back only the slots of the worker it is stuck in; the others keep flowing. Only
//! when no other worker is taking records does the dispatcher wait, as before.
//!
//! Epochs: within an epoch the slot ownership table is fixed, so each slot has exactly one
//! worker and per-slot order holds. When a worker fails (a panic, a sink stuck past
//! `forward.worker_deadline_ms`, an append error), the epoch ends: the dispatcher and every
//! worker stop after their in-flight batch, the failed worker is marked down (its slots pass to
//! their secondary), and a new epoch starts with the dispatcher rewound to the first record in
//! the spool. The rewind re-dispatches every envelope still pending — the failed worker's
//! included, from their last tombstone — and a sealed one is re-sent from its seal, so the
//! secondary forwards exactly what the primary would have. After a back-off the supervisor
//! restarts the failed worker the same way (another epoch, ownership restored). A slot whose
//! primary and secondary are both down has no owner in the epoch: its records are passed over,
//! pending, while the other slots flow, and the restart that ends the epoch brings them back in
//! log order. Start-up replay is simply the first epoch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::chain::Chains;
use crate::config::ForwardConfig;
use crate::envelope::Envelope;
use crate::forward::dead_letter::{DeadLetter, DeadLetterError};
use crate::forward::ledger::{Ledger, PendingInfo};
use crate::forward::retry::Backoff;
use crate::forward::sink::Sink;
use crate::forward::worker::{WorkItem, Worker, WorkerContext, WorkerError};
use crate::gate::Gate;
use crate::ingest::server::stopped;
use crate::metrics::Metrics;
use crate::ring::{Ring, RingRead};
use crate::slots::Ownership;
use crate::spool::{Position, Reader, Record, RecordKind, Spool, SpoolError};

/// Records read from the segments per blocking read.
pub const READ_CHUNK_RECORDS_MAX: usize = 256;
/// First and longest wait before restarting a failed worker.
pub const RESTART_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long a failed worker stays down before it is restarted. The daemon uses the default
/// ([`RESTART_BACKOFF_INITIAL`], [`RESTART_BACKOFF_MAX`]); tests that must see what happens
/// while workers are down set it longer than they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RestartBackoff {
    fn default() -> RestartBackoff {
        RestartBackoff {
            initial: RESTART_BACKOFF_INITIAL,
            max: RESTART_BACKOFF_MAX,
        }
    }
}

impl RestartBackoff {
    /// The delay before a failed worker is restarted: twice the last one, up to `max`, unless
    /// the worker had run without failing for longer than that since its last restart
    /// (`ran_for`), in which case its failures start over from `initial`: one failure a day
    /// must not find the backoff of last week's outage.
    fn delay(&self, last: Option<Duration>, ran_for: Option<Duration>) -> Duration {
        match (last, ran_for) {
            (Some(last), Some(ran)) if ran <= self.max => (last * 2).min(self.max),
            _ => self.initial,
        }
    }
}
/// How long the dispatcher waits for room in a full inbox before it leaves that worker
/// behind (while other workers can take records). Longer than a healthy sink's batch round
/// trip (a file sink's fdatasync, a local HTTP sink's answer), far shorter than a retry
/// back-off.
pub const LEAVE_BEHIND_AFTER: Duration = Duration::from_millis(100);
/// How often an idle dispatcher re-checks the spool's durable end, in case a ring wake-up was
/// missed (it never is in practice; this bounds the cost if it were).
const IDLE_RECHECK: Duration = Duration::from_millis(200);

/// Everything the pipeline needs, assembled by the daemon.
pub struct PipelineParts {
    pub spool: Spool,
    pub ring: Arc<Ring>,
    pub gate: Arc<Gate>,
    /// Heads of durable seals (see `WorkerContext::chains`).
    pub chains: Arc<Mutex<Chains>>,
    pub ledger: Arc<Ledger>,
    pub sinks: BTreeMap<String, Arc<dyn Sink>>,
    pub dead_letter: DeadLetter,
    pub config: ForwardConfig,
    pub metrics: Arc<Metrics>,
    pub compaction: Arc<tokio::sync::Notify>,
    /// The disk reserve, spent when a seal or tombstone finds the spool full (`None` in tests
    /// that run without one).
    pub reserve: Option<Arc<crate::compaction::reserve::Reserve>>,
    pub restart_backoff: RestartBackoff,
}

pub struct Pipeline {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Pipeline {
    pub fn start(parts: PipelineParts) -> Pipeline {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(parts, stop_rx));
        Pipeline { stop, task }
    }

    /// Stops dispatching; workers finish the batch in hand (or abandon a retry wait: that
    /// batch is sealed and re-sent identically at the next start) and exit.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[derive(Debug, PartialEq)]
enum EpochEnd {
    Stop,
    /// A worker ended; `true` when it returned without an error (its inbox closed).
    WorkerFailed(usize, String, bool),
    Restart(usize),
    /// The dispatcher ended; `true` when it returned without an error (a worker's inbox
    /// closed under it).
    DispatcherFailed(String, bool),
}

impl EpochEnd {
    /// What really ended the epoch, once every task of it has been joined. A worker that fails
    /// closes its inbox, and a dispatcher that fails closes every inbox: the task that then
    /// returns cleanly is a bystander, and the select may have seen it first. Blaming it would
    /// move an innocent worker's slots, or leave a stuck worker in place with its slots given
    /// straight back to it.
    fn refined(self, dispatcher_error: Option<String>, failed: &[(usize, String)]) -> EpochEnd {
        match self {
            EpochEnd::WorkerFailed(_, _, true) if dispatcher_error.is_some() => {
                EpochEnd::DispatcherFailed(dispatcher_error.unwrap_or_default(), false)
            }
            EpochEnd::WorkerFailed(_, _, true) | EpochEnd::DispatcherFailed(_, true)
                if !failed.is_empty() =>
            {
                EpochEnd::WorkerFailed(failed[0].0, failed[0].1.clone(), false)
            }
            other => other,
        }
    }
}

async fn supervise(parts: PipelineParts, mut stop: watch::Receiver<bool>) {
    let workers = parts.config.workers;
    let room = Arc::new(tokio::sync::Notify::new());
    // A batch, and so its seal, stays within a quarter of a segment: its seal records (appended
    // one after another, each durable first) then never crowd a segment out.
    let mut forward_config = parts.config.clone();
    let segment_quarter = (parts.spool.segment_bytes_max() / 4) as usize;
    forward_config.batch_bytes_max = forward_config.batch_bytes_max.min(segment_quarter.max(1));
    let ctx = Arc::new(WorkerContext {
        spool: parts.spool.clone(),
        gate: parts.gate.clone(),
        chains: parts.chains.clone(),
        ledger: parts.ledger.clone(),
        sinks: parts.sinks.clone(),
        dead_letter: parts.dead_letter.clone(),
        config: forward_config,
        metrics: parts.metrics.clone(),
        compaction: parts.compaction.clone(),
        room: room.clone(),
        reserve: parts.reserve.clone(),
    });
    let mut ownership = Ownership::round_robin(workers);
    let mut restart_at: Vec<Option<tokio::time::Instant>> = vec![None; workers];
    // The last restart delay of each worker and when it was restarted, for `restart_delay`.
    let mut restart_backoff: Vec<Option<Duration>> = vec![None; workers];
    let mut restarted_at: Vec<Option<tokio::time::Instant>> = vec![None; workers];
    // The dispatcher's last restart delay, for the same doubling as a worker's: a read error
    // that stays (a failing device) must not restart the epoch, and re-read the spool from
    // its first record, five times a second for as long as it lasts.
    let mut dispatcher_backoff: Option<Duration> = None;
    loop {
        let epoch_started = tokio::time::Instant::now();
        if parts.spool.poison_reason().is_some() {
            tracing::error!("spool is poisoned; forwarding stops until restart");
            stopped(&mut stop).await;
            return;
        }
        let (epoch_tx, epoch_rx) = watch::channel(false);
        let mut senders: Vec<Option<mpsc::Sender<WorkItem>>> = vec![None; workers];
        let mut handles: tokio::task::JoinSet<Result<(), WorkerError>> =
            tokio::task::JoinSet::new();
        let mut worker_of: std::collections::HashMap<tokio::task::Id, usize> =
            std::collections::HashMap::new();
        for (w, sender) in senders.iter_mut().enumerate() {
            if !ownership.is_alive(w) {
                continue;
            }
            let (tx, rx) = mpsc::channel(parts.config.worker_queue_records_max);
            *sender = Some(tx);
            let worker = Worker {
                id: w,
                ctx: ctx.clone(),
                inbox: rx,
                stop: epoch_rx.clone(),
                tombstones: Default::default(),
            };
            let handle = handles.spawn(worker.run());
            worker_of.insert(handle.id(), w);
        }
        let dispatcher = Dispatcher {
            spool: parts.spool.clone(),
            ring: parts.ring.clone(),
            ledger: parts.ledger.clone(),
            dead_letter: parts.dead_letter.clone(),
            metrics: parts.metrics.clone(),
            envelopes_ok: parts
                .metrics
                .gate_envelopes_total
                .with_label_values(&["ok"]),
            ownership: ownership.clone(),
            detached: (0..senders.len()).map(|_| None).collect(),
            senders,
            room: room.clone(),
            cursor: parts.spool.first_position(),
            reader: None,
            retry_initial: Duration::from_millis(parts.config.retry_initial_ms),
            retry_max: Duration::from_millis(parts.config.retry_max_ms),
            reserve: parts.reserve.clone(),
            stop: epoch_rx.clone(),
        };
        // Every epoch reads from the first record: the segments from there on keep their
        // cached pages until this reading is past them (see Page cache in `spool`).
        parts.spool.note_read_segment(dispatcher.cursor.segment);
        let mut dispatcher = tokio::spawn(dispatcher.run());

        let next_restart = restart_at
            .iter()
            .enumerate()
            .filter_map(|(w, t)| t.map(|t| (w, t)))
            .min_by_key(|(_, t)| *t);
        let end = {
            let worker_exit = async {
                match handles.join_next_with_id().await {
                    Some(result) => result,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stopped(&mut stop) => EpochEnd::Stop,
                result = worker_exit => match result {
                    Ok((id, Ok(()))) => EpochEnd::WorkerFailed(worker_of[&id], "exited unexpectedly".into(), true),
                    Ok((id, Err(e))) => EpochEnd::WorkerFailed(worker_of[&id], e.to_string(), false),
                    Err(join) => EpochEnd::WorkerFailed(worker_of[&join.id()], format!("panicked: {join}"), false),
                },
                _ = async {
                    match next_restart {
                        Some((_, at)) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => EpochEnd::Restart(next_restart.map(|(w, _)| w).unwrap_or(0)),
                result = &mut dispatcher => match result {
                    Ok(Ok(())) => EpochEnd::DispatcherFailed("stopped".into(), true),
                    Ok(Err(e)) => EpochEnd::DispatcherFailed(e.to_string(), false),
                    Err(join) => EpochEnd::DispatcherFailed(format!("panicked: {join}"), false),
                },
            }
        };

        // End the epoch: nothing new is dispatched, every worker finishes its batch in hand.
        let _ = epoch_tx.send(true);
        let dispatcher_error = if matches!(end, EpochEnd::DispatcherFailed(..)) {
            // The select took its result.
            None
        } else {
            match dispatcher.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(join) => Some(format!("panicked: {join}")),
            }
        };
        let mut failed: Vec<(usize, String)> = Vec::new();
        while let Some(result) = handles.join_next_with_id().await {
            match result {
                Ok((_, Ok(()))) => {}
                Ok((id, Err(e))) => failed.push((worker_of[&id], e.to_string())),
                Err(join) => failed.push((worker_of[&join.id()], format!("panicked: {join}"))),
            }
        }
        match end.refined(dispatcher_error, &failed) {
            EpochEnd::Stop => return,
            EpochEnd::WorkerFailed(w, why, _) => {
                parts.metrics.worker_takeovers_total.inc();
                let moved = ownership.mark_down(w);
                let ran_for = restarted_at[w].map(|t| t.elapsed());
                let delay = parts.restart_backoff.delay(restart_backoff[w], ran_for);
                restart_backoff[w] = Some(delay);
                restart_at[w] = Some(tokio::time::Instant::now() + delay);
                tracing::warn!(worker = w, reason = %why, slots_moved = moved.len(), restart_in_ms = delay.as_millis() as u64, "worker failed; secondaries take over its slots");
            }
            EpochEnd::Restart(w) => {
                restart_at[w] = None;
                restarted_at[w] = Some(tokio::time::Instant::now());
                ownership.mark_up(w);
                tracing::info!(worker = w, "worker restarted; it owns its slots again");
            }
            EpochEnd::DispatcherFailed(why, _) => {
                parts.metrics.forward_dispatcher_failures_total.inc();
                let delay = parts
                    .restart_backoff
                    .delay(dispatcher_backoff, Some(epoch_started.elapsed()));
                dispatcher_backoff = Some(delay);
                tracing::error!(reason = %why, restart_in_ms = delay.as_millis() as u64, "dispatcher stopped; forwarding starts over from the oldest pending record after the delay");
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DispatchError {
    #[error("reading the spool failed: {0}")]
    Spool(#[from] SpoolError),
    #[error("blocking read task failed: {0}")]
    Task(String),
}

struct Dispatcher {
    spool: Spool,
    ring: Arc<Ring>,
    ledger: Arc<Ledger>,
    dead_letter: DeadLetter,
    metrics: Arc<Metrics>,
    /// `gate_envelopes_total{outcome="ok"}`, looked up once rather than per envelope.
    envelopes_ok: prometheus::IntCounter,
    ownership: Ownership,
    senders: Vec<Option<mpsc::Sender<WorkItem>>>,
    /// Per worker: `Some` while the worker is left behind (its inbox was full), with where to
    /// resume its records. `None` when created and again once its re-read reaches `cursor`.
    detached: Vec<Option<Detached>>,
    /// Woken by workers as they take batches (`WorkerContext::room`).
    room: Arc<tokio::sync::Notify>,
    cursor: Position,
    reader: Option<Reader>,
    /// The sinks' retry backoff, which the dispatcher's own waits (an undecodable record
    /// waiting for dead-letter room or for space for its tombstone) use too.
    retry_initial: Duration,
    retry_max: Duration,
    /// The disk reserve, spent when the tombstone of an undecodable record finds the spool
    /// full, as a worker's tombstone would.
    reserve: Option<Arc<crate::compaction::reserve::Reserve>>,
    stop: watch::Receiver<bool>,
}

/// Reads up to [`READ_CHUNK_RECORDS_MAX`] records on a blocking thread, stopping early at the
/// durable end or once the reader reaches `until`. Returns the reader for the next chunk.
async fn read_chunk(
    mut reader: Reader,
    until: Option<Position>,
) -> Result<(Reader, Result<Vec<Record>, SpoolError>), DispatchError> {
    tokio::task::spawn_blocking(move || {
        let mut out: Vec<Record> = Vec::new();
        while out.len() < READ_CHUNK_RECORDS_MAX && until.is_none_or(|u| reader.position() < u) {
            match reader.next_record() {
                Ok(Some(r)) => out.push(r),
                Ok(None) => break,
                Err(e) => return (reader, Err(e)),
            }
        }
        (reader, Ok(out))
    })
    .await
    .map_err(|e| DispatchError::Task(e.to_string()))
}

/// `chunk`, read from `from`, with the pending orphans (see `ledger`) between `from` and its
/// end put in log order among its records, each as an envelope record with no payload that
/// ends 8 bytes after its position (its lost frame took at least 24, so the next record read
/// starts after that). The dispatcher sends them from their seals. An orphan always lies
/// before its own seal record, which is read, so every orphan falls in some chunk's range.
fn with_orphans(ledger: &Ledger, from: Position, chunk: Vec<Record>) -> Vec<Record> {
    let Some(end) = chunk.last().map(|r| r.next) else {
        return chunk;
    };
    let orphans = ledger.orphans_between(from, end);
    if orphans.is_empty() {
        return chunk;
    }
    let mut merged = Vec::with_capacity(chunk.len() + orphans.len());
    let mut orphans = orphans.into_iter().peekable();
    for record in chunk {
        while let Some(p) = orphans.next_if(|p| *p < record.position) {
            merged.push(orphan_record(p));
        }
        merged.push(record);
    }
    merged.extend(orphans.map(orphan_record));
    merged
}

fn orphan_record(position: Position) -> Record {
    Record {
        position,
        kind: RecordKind::ENVELOPE,
        payload: bytes::Bytes::new(),
        next: Position {
            segment: position.segment,
            offset: position.offset + crate::spool::format::FRAME_ALIGN,
        },
    }
}

/// The first segment some reading still has to read: the main cursor's, or an earlier one
/// where a worker left behind resumes.
fn lowest_unread_segment(cursor: Position, detached: &[Option<Detached>]) -> u64 {
    detached
        .iter()
        .flatten()
        .map(|d| d.from.segment)
        .fold(cursor.segment, u64::min)
}

/// A worker the main pass left behind: its records from `from` on are re-read for it.
struct Detached {
    from: Position,
    /// Positioned at `from` when present; dropped when a full inbox stops a re-read mid-chunk.
    reader: Option<Reader>,
}

impl Dispatcher {
    async fn run(mut self) -> Result<(), DispatchError> {
        loop {
            if *self.stop.borrow() {
                return Ok(());
            }
            if !self.catch_up_all().await? {
                return Ok(());
            }
            match self.ring.take_at(self.cursor) {
                RingRead::Record(record) => {
                    if !self.dispatch(record).await? {
                        return Ok(());
                    }
                }
                RingRead::Gap => {
                    if !self.read_segments().await? {
                        return Ok(());
                    }
                }
                RingRead::Empty => {
                    if self.cursor < self.spool.durable_end() && self.read_segments().await? {
                        continue;
                    }
                    let behind = self.detached.iter().any(Option::is_some);
                    tokio::select! {
                        _ = stopped(&mut self.stop) => return Ok(()),
                        _ = self.ring.wait() => {}
                        _ = self.room.notified(), if behind => {}
                        _ = tokio::time::sleep(IDLE_RECHECK) => {}
                    }
                }
            }
        }
    }

    /// Reads one chunk from the segments at the cursor and dispatches it. `Ok(false)` if
    /// nothing was there or the epoch ended.
    async fn read_segments(&mut self) -> Result<bool, DispatchError> {
        let reader = match self.reader.take() {
            Some(r) if r.position() == self.cursor => r,
            _ => self.spool.reader(self.cursor),
        };
        let from = reader.position();
        let (reader, chunk) = read_chunk(reader, None).await?;
        self.reader = Some(reader);
        let chunk = chunk?;
        self.metrics
            .forward_records_read_from_segments_total
            .inc_by(chunk.len() as u64);
        if chunk.is_empty() {
            return Ok(false);
        }
        let chunk = with_orphans(&self.ledger, from, chunk);
        for record in chunk {
            if !self.dispatch(record).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Handles the record at the cursor and advances it. `false` when the epoch ended; an error
    /// when re-reading for a worker left behind failed (which ends it too).
    async fn dispatch(&mut self, record: Record) -> Result<bool, DispatchError> {
        debug_assert!(
            record.position >= self.cursor,
            "records arrive in log order"
        );
        let new_segment = record.next.segment != self.cursor.segment;
        self.cursor = record.next;
        if new_segment {
            self.note_reading();
        }
        if record.kind != RecordKind::ENVELOPE {
            self.ledger.counted_up_to(record.next);
            return Ok(true);
        }
        let live = record.position >= self.ledger.counted_position();
        // A record met for the first time has no seal; one met again (replay, a rewind) is
        // read with its seal under one lock (see `Ledger::pending_seal`).
        let seal = if live {
            None
        } else {
            match self.ledger.pending_seal(record.position) {
                None => return Ok(true),
                Some(seal) => seal,
            }
        };
        let envelope = match (Envelope::decode(&record.payload), &seal) {
            (Ok(env), _) => env,
            // The seal holds the gated envelope, everything the record is forwarded as: it is
            // re-sent from there like any sealed record. Dead-lettering it would leave a gap
            // at its sequence number, and the sink may already have it.
            (Err(e), Some(sealed)) => {
                // An orphan (no payload: its record was lost, see `ledger`) was reported by
                // the start-up scan already.
                if !record.payload.is_empty() {
                    tracing::warn!(
                        segment = record.position.segment,
                        offset = record.position.offset,
                        error = %e,
                        "envelope record does not decode; re-sending it from its seal"
                    );
                }
                sealed.envelope.clone()
            }
            (Err(e), None) => return Ok(self.undecodable(&record, live, &e.to_string()).await),
        };
        // A record already sealed (by an earlier build, or a spool written by anything else) is
        // re-sent from its seal as it is, like any other: dead-lettering it now would leave a
        // gap at its sequence number.
        if seal.is_none() {
            if let Some(why) = slot_mismatch(&envelope) {
                return Ok(self.undecodable(&record, live, &why).await);
            }
        }
        if live {
            let now = crate::ingest::now_ms();
            self.ledger.add_live(
                record.position,
                PendingInfo {
                    // Acknowledged just now: the client's ts_ms may be anything (a backfill).
                    since_ms: now,
                    bytes: record.payload.len() as u32,
                },
                record.next,
            );
        }
        self.envelopes_ok.inc();
        let item = self.work_item(&record, envelope, seal);
        let Some(owner) = self
            .ownership
            .owner(item.envelope.slot % crate::slots::SLOTS)
        else {
            // Every worker that could own this slot is down. Its records wait, pending, for
            // the next epoch (a restart ends this one), which rewinds and sends them in log
            // order; the ownership table is fixed for the epoch, so every later record of the
            // slot is passed over too and order holds. The other slots go on meanwhile:
            // waiting here stopped them all, for as long as the restart backoff (up to 30 s
            // per failure of a record that fails every worker).
            return Ok(true);
        };
        let Some(sender) = self.senders[owner].clone() else {
            return Ok(true);
        };
        if self.detached[owner].is_some() {
            // The worker's re-read will reach this record.
            return Ok(true);
        }
        let item = match sender.try_send(item) {
            Ok(()) => return Ok(true),
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(false),
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        let others_taking = (0..self.senders.len())
            .any(|w| w != owner && self.senders[w].is_some() && self.detached[w].is_none());
        if others_taking {
            // A worker with a healthy sink takes its next batch within a sink round trip;
            // leaving it behind for that would cost a re-read for nothing.
            tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => return Ok(false),
                permit = sender.reserve() => return Ok(match permit {
                    Ok(permit) => {
                        permit.send(item);
                        true
                    }
                    Err(_) => false,
                }),
                _ = tokio::time::sleep(LEAVE_BEHIND_AFTER) => {}
            }
            self.metrics.forward_workers_left_behind_total.inc();
            self.detached[owner] = Some(Detached {
                from: record.position,
                reader: None,
            });
            self.note_reading();
            return Ok(true);
        }
        // No other worker is taking records: wait for this one, feeding the ones left behind
        // as they make room.
        loop {
            let behind = self.detached.iter().any(Option::is_some);
            tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => return Ok(false),
                permit = sender.reserve() => match permit {
                    Ok(permit) => {
                        permit.send(item);
                        return Ok(true);
                    }
                    Err(_) => return Ok(false),
                },
                _ = self.room.notified(), if behind => {}
            }
            // A failed re-read ends the epoch as the dispatcher's own read errors do (see
            // `run`): returning as if stopped let the supervisor blame a worker whose inbox
            // had merely closed, moving its slots and delaying its restart.
            if !self.catch_up_all().await? {
                return Ok(false);
            }
        }
    }

    /// Tells the spool which segments are still to be read, so the writer keeps their cached
    /// pages (see Page cache in `spool`): those from the main cursor's on, and from the
    /// position of any worker left behind, whose re-read reads them again.
    fn note_reading(&self) {
        self.spool
            .note_read_segment(lowest_unread_segment(self.cursor, &self.detached));
    }

    /// Feeds every worker left behind whose inbox is at least half empty. `Ok(false)` when
    /// the epoch ended.
    async fn catch_up_all(&mut self) -> Result<bool, DispatchError> {
        for w in 0..self.detached.len() {
            if self.detached[w].is_none() {
                continue;
            }
            let Some(sender) = self.senders[w].clone() else {
                continue;
            };
            if sender.capacity() * 2 < sender.max_capacity() {
                continue;
            }
            let going_on = self.catch_up(w, &sender).await?;
            self.note_reading();
            if !going_on {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Re-reads the segments for worker `w` from where it was left behind, sending it its own
    /// pending envelopes until its inbox is full again or the re-read reaches the main cursor
    /// (then `w` rejoins the main pass). `Ok(false)` when the epoch ended.
    async fn catch_up(
        &mut self,
        w: usize,
        sender: &mpsc::Sender<WorkItem>,
    ) -> Result<bool, DispatchError> {
        loop {
            let Some(detached) = self.detached[w].as_mut() else {
                return Ok(true);
            };
            if detached.from >= self.cursor {
                self.detached[w] = None;
                return Ok(true);
            }
            let reader = match detached.reader.take() {
                Some(r) if r.position() == detached.from => r,
                _ => self.spool.reader(detached.from),
            };
            let from = reader.position();
            let (reader, chunk) = read_chunk(reader, Some(self.cursor)).await?;
            let chunk = chunk?;
            self.metrics
                .forward_records_read_from_segments_total
                .inc_by(chunk.len() as u64);
            if chunk.is_empty() {
                // Nothing between `from` and the durable end: the main pass has seen it all.
                self.detached[w] = None;
                return Ok(true);
            }
            let chunk = with_orphans(&self.ledger, from, chunk);
            let mut resume = reader.position();
            let mut full = false;
            for record in chunk {
                if record.position >= self.cursor {
                    resume = record.position;
                    break;
                }
                let Some(item) = self.item_for(w, &record) else {
                    continue;
                };
                match sender.try_send(item) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(false),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        resume = record.position;
                        full = true;
                        break;
                    }
                }
            }
            let keep = (reader.position() == resume).then_some(reader);
            self.detached[w] = Some(Detached {
                from: resume,
                reader: keep,
            });
            if full {
                return Ok(true);
            }
        }
    }

    /// The work item for `record` if it is a pending envelope of a slot worker `w` owns (a
    /// re-read for a worker left behind; the main pass already counted and checked it).
    fn item_for(&self, w: usize, record: &Record) -> Option<WorkItem> {
        if record.kind != RecordKind::ENVELOPE {
            return None;
        }
        let seal = self.ledger.pending_seal(record.position)?;
        // As in `dispatch`: a sealed record is sent from its seal whether or not its own
        // record decodes (an orphan has none).
        let envelope = match (Envelope::decode(&record.payload), &seal) {
            (Ok(envelope), _) => envelope,
            (Err(_), Some(sealed)) => sealed.envelope.clone(),
            (Err(_), None) => return None,
        };
        if (seal.is_none() && slot_mismatch(&envelope).is_some())
            || self.ownership.owner(envelope.slot % crate::slots::SLOTS) != Some(w)
        {
            return None;
        }
        Some(self.work_item(record, envelope, seal))
    }

    fn work_item(
        &self,
        record: &Record,
        envelope: Envelope,
        sealed: Option<crate::chain::SharedRecord>,
    ) -> WorkItem {
        WorkItem {
            position: record.position,
            sealed,
            bytes: record.payload.len(),
            envelope,
        }
    }

    /// An envelope record whose CRC held but whose msgpack does not decode cannot be forwarded:
    /// it goes to the dead-letter directory as raw bytes and is tombstoned. It is pending in the
    /// ledger until then, so compaction keeps its segment whatever happens on the way: while
    /// the dead-letter directory has no room (or fails) and while the spool has no space for
    /// the tombstone, the dispatcher waits with the sinks' backoff, since nothing else may
    /// take the record's place in log order. `false` when the epoch ended meanwhile; the record
    /// is then still pending and the next epoch comes back to it. A record dead-lettered whose
    /// tombstone never got written is dead-lettered again after a restart.
    async fn undecodable(&mut self, record: &Record, live: bool, why: &str) -> bool {
        if live {
            self.ledger.add_live(
                record.position,
                PendingInfo {
                    since_ms: crate::ingest::now_ms(),
                    bytes: record.payload.len() as u32,
                },
                record.next,
            );
        }
        tracing::error!(
            segment = record.position.segment,
            offset = record.position.offset,
            error = why,
            "envelope record cannot be forwarded (it does not decode, or its slot is not its stream's); dead-lettering its raw bytes"
        );
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max, fastrand::u64(..));
        let mut waiting = false;
        loop {
            match crate::forward::run_blocking(|| {
                self.dead_letter
                    .write_raw(record.position, why, &record.payload)
            }) {
                Ok(_) => break,
                Err(e) => {
                    let kind = match e {
                        DeadLetterError::Full { .. } | DeadLetterError::NoSpace(_) => {
                            "dead_letter_full"
                        }
                        // As the workers count it, so that SpoolgateDeadLetterFull fires: this
                        // wait holds up all forwarding, not one slot.
                        DeadLetterError::Io(_) => "dead_letter_failed",
                    };
                    self.metrics
                        .forward_errors_total
                        .with_label_values(&["default", kind])
                        .inc();
                    if !waiting {
                        waiting = true;
                        tracing::error!(error = %e, "dead-letter write of an undecodable record failed; forwarding waits for it and retries with backoff");
                    }
                }
            }
            if !self.wait(backoff.next_delay(None)).await {
                return false;
            }
        }
        if waiting {
            tracing::info!("the undecodable record is dead-lettered; forwarding goes on");
        }
        self.metrics
            .gate_envelopes_total
            .with_label_values(&["undecodable"])
            .inc();
        let payload = match (crate::chain::Tombstone {
            positions: vec![record.position],
            heads: Vec::new(),
        })
        .encode()
        {
            Ok(p) => bytes::Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a tombstone; the record stays pending until a restart");
                return true;
            }
        };
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max, fastrand::u64(..));
        loop {
            match self
                .spool
                .append(vec![(RecordKind::TOMBSTONE, payload.clone())])
                .await
            {
                Ok(_) => {
                    self.ledger.complete(&[record.position]);
                    self.metrics.tombstones_written_total.inc();
                    return true;
                }
                Err(SpoolError::Full(_)) => {
                    let who = "tombstone of an undecodable record";
                    if crate::compaction::reserve::spend_when_full(self.reserve.as_ref(), who).await
                    {
                        continue;
                    }
                    if !self.wait(backoff.next_delay(None)).await {
                        return false;
                    }
                }
                Err(SpoolError::Busy(_)) => {
                    if !self.wait(backoff.next_delay(None)).await {
                        return false;
                    }
                }
                // A poisoned or closed spool: forwarding is about to stop; the record stays
                // pending and a restart dead-letters it again.
                Err(e) => {
                    tracing::error!(error = %e, "tombstone of a dead-lettered undecodable record failed; it stays pending");
                    return true;
                }
            }
        }
    }

    /// Sleeps for `delay`; false if the epoch ended first.
    async fn wait(&mut self, delay: Duration) -> bool {
        tokio::select! {
            _ = stopped(&mut self.stop) => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Why an envelope may not be forwarded although it decodes: a slot other than its stream's.
/// Records are routed by their slot and chained by their stream, so such a record would be
/// sequenced by a worker that does not own its stream, beside the one that does, and fork the
/// chain. Ingest never writes one; a spool written by anything else might.
fn slot_mismatch(envelope: &Envelope) -> Option<String> {
    let stream_slot = crate::slots::slot_of(envelope.stream());
    (envelope.slot != stream_slot).then(|| {
        format!(
            "slot {} is not its stream's slot {stream_slot}: it cannot be sequenced",
            envelope.slot
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(segment: u64, offset: u64) -> Position {
        Position { segment, offset }
    }

    fn record(position: Position, next: Position) -> Record {
        Record {
            position,
            kind: RecordKind::ENVELOPE,
            payload: bytes::Bytes::from_static(b"x"),
            next,
        }
    }

    #[test]
    fn orphans_go_among_the_records_of_the_chunk_whose_range_holds_them_in_log_order() {
        let ledger = Ledger::default();
        let seal = std::sync::Arc::new(
            crate::chain::Chains::new()
                .seal(Envelope {
                    source: "s".into(),
                    slot: crate::slots::slot_of("s"),
                    ..Default::default()
                })
                .unwrap(),
        );
        let info = PendingInfo {
            since_ms: 0,
            bytes: 0,
        };
        // One before the chunk, one between its records, one after its last record but
        // before where it ends, one in the next chunk's range.
        for p in [at(1, 64), at(1, 200), at(2, 64), at(2, 400)] {
            ledger.add_orphan(p, info, seal.clone());
        }
        let chunk = vec![
            record(at(1, 104), at(1, 160)),
            record(at(1, 320), at(1, 400)),
            record(at(2, 72), at(2, 128)),
        ];
        let merged = with_orphans(&ledger, at(1, 104), chunk);
        let got: Vec<(Position, bool)> = merged
            .iter()
            .map(|r| (r.position, r.payload.is_empty()))
            .collect();
        assert_eq!(
            got,
            vec![
                (at(1, 104), false),
                (at(1, 200), true),
                (at(1, 320), false),
                (at(2, 64), true),
                (at(2, 72), false),
            ]
        );
        // Each orphan ends before the record after it starts.
        assert_eq!(merged[1].next, at(1, 208));
        // The next chunk, from where this one ended, holds the last one.
        let next = with_orphans(&ledger, at(2, 128), vec![record(at(2, 456), at(2, 512))]);
        assert_eq!(next[0].position, at(2, 400));
        assert!(next[0].payload.is_empty());
        // Tombstoned, an orphan is no longer merged.
        ledger.complete(&[at(2, 400)]);
        let again = with_orphans(&ledger, at(2, 128), vec![record(at(2, 456), at(2, 512))]);
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn a_worker_restart_backs_off_while_it_keeps_failing_and_starts_over_once_it_ran_a_while() {
        let backoff = RestartBackoff::default();
        let initial = RESTART_BACKOFF_INITIAL;
        // The first failure, and one after a worker that never failed since the start.
        assert_eq!(backoff.delay(None, None), initial);
        // Failing again soon after each restart doubles the delay, up to the bound.
        let mut delay = initial;
        for _ in 0..20 {
            delay = backoff.delay(Some(delay), Some(Duration::from_millis(10)));
        }
        assert_eq!(delay, RESTART_BACKOFF_MAX);
        // After running longer than the bound without failing, it starts over.
        let ran = RESTART_BACKOFF_MAX + Duration::from_secs(1);
        assert_eq!(backoff.delay(Some(RESTART_BACKOFF_MAX), Some(ran)), initial);
    }

    #[test]
    fn an_epoch_is_blamed_on_the_task_that_failed_not_on_the_bystander_the_select_saw_first() {
        let stuck = vec![(0, "stuck past the deadline".to_string())];
        // The dispatcher returned cleanly because worker 0's inbox closed: worker 0 failed.
        assert_eq!(
            EpochEnd::DispatcherFailed("stopped".into(), true).refined(None, &stuck),
            EpochEnd::WorkerFailed(0, "stuck past the deadline".into(), false)
        );
        // Worker 1 returned cleanly because the dispatcher failed and closed every inbox.
        assert_eq!(
            EpochEnd::WorkerFailed(1, "exited unexpectedly".into(), true)
                .refined(Some("reading the spool failed".into()), &[]),
            EpochEnd::DispatcherFailed("reading the spool failed".into(), false)
        );
        // Worker 1 returned cleanly because worker 0 failed.
        assert_eq!(
            EpochEnd::WorkerFailed(1, "exited unexpectedly".into(), true).refined(None, &stuck),
            EpochEnd::WorkerFailed(0, "stuck past the deadline".into(), false)
        );
        // A failure the select saw itself stays as it is.
        assert_eq!(
            EpochEnd::WorkerFailed(2, "panicked".into(), false).refined(None, &stuck),
            EpochEnd::WorkerFailed(2, "panicked".into(), false)
        );
        assert_eq!(EpochEnd::Stop.refined(None, &stuck), EpochEnd::Stop);
    }

    #[test]
    fn a_worker_left_behind_holds_the_segments_its_re_read_has_yet_to_read() {
        let at = |segment| Position {
            segment,
            offset: crate::spool::format::HEADER_LEN,
        };
        let behind_at = |segment| {
            Some(Detached {
                from: at(segment),
                reader: None,
            })
        };
        assert_eq!(lowest_unread_segment(at(9), &[None, None]), 9);
        assert_eq!(
            lowest_unread_segment(at(9), &[None, behind_at(4), behind_at(7)]),
            4
        );
        assert_eq!(lowest_unread_segment(at(9), &[behind_at(9), None]), 9);
    }
}
