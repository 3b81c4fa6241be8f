//! Every metric spoolgate exports, in one place.
//!
//! Names follow the Prometheus conventions: a `spoolgate_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` only on counters, and gauges named for what they measure
//! (`spoolgate_spool_pending_records`, not `..._total`). Labels have small fixed value sets
//! (route, status code, reason, sink, kind, worker); nothing is labelled by tenant, stream or id,
//! so cardinality stays bounded however many tenants send data.
//!
//! README.md's metrics table is the operators' reference; a test here keeps it equal to the
//! definitions below, help texts included.
//!
//! A `Metrics` value owns its own `Registry`, so tests can build as many as they like without
//! colliding. The daemon creates one and passes it down as `Arc<Metrics>`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 50 µs to 10 s, for fsync, request, gate and forward durations.
const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Group-commit batch sizes, in records: up to `spool.commit_batch_records_max` (4096 by
/// default) for a group of requests, but one request is committed whole, however many
/// envelopes it holds (`ingest.batch_items_max`, 10,000 by default), hence the buckets above.
const BATCH_RECORDS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 16384.0,
    65536.0,
];

/// What [`Metrics::render`] runs before encoding (see `Metrics::refresh_before_render`).
type Refresh = Box<dyn Fn(&Metrics) + Send + Sync>;

pub struct Metrics {
    pub registry: Registry,
    /// Every metric defined below, in definition order (the process collector's excluded).
    pub catalogue: Vec<MetricDoc>,

    // Spool.
    pub spool_pending_records: IntGauge,
    pub spool_pending_bytes: IntGauge,
    pub spool_segments_active: IntGauge,
    pub spool_oldest_pending_age_seconds: prometheus::Gauge,
    pub spool_disk_bytes: IntGauge,
    pub spool_filesystem_free_bytes: IntGauge,
    pub spool_appends_total: IntCounter,
    pub spool_append_bytes_total: IntCounter,
    pub spool_fsync_duration_seconds: Histogram,
    pub spool_commit_batch_records: Histogram,
    pub spool_poisoned: IntGauge,
    pub spool_full_errors_total: IntCounter,
    pub forward_workers_left_behind_total: IntCounter,

    // Ingest.
    pub ingest_requests_total: IntCounterVec,
    pub ingest_envelopes_accepted_total: IntCounter,
    pub ingest_rejected_total: IntCounterVec,
    pub ingest_inflight_bytes: IntGauge,
    pub ingest_request_duration_seconds: HistogramVec,
    pub ingest_dedup_hits_total: IntCounter,
    pub ingest_dedup_entries: IntGauge,
    pub ingest_connections_open: IntGauge,
    pub ingest_connections_evicted_total: IntCounter,
    pub ingest_connections_timed_out_total: IntCounter,

    // Ring and gate.
    pub ring_depth_records: IntGauge,
    pub ring_capacity_records: IntGauge,
    pub ring_overflows_total: IntCounter,
    pub forward_records_read_from_segments_total: IntCounter,
    pub gate_envelopes_total: IntCounterVec,
    pub gate_pii_found_total: IntCounterVec,
    pub gate_rules_reloads_total: IntCounterVec,
    pub gate_duration_seconds: Histogram,

    // Chain and forwarding.
    pub forward_records_total: IntCounterVec,
    pub forward_batch_duration_seconds: HistogramVec,
    pub forward_errors_total: IntCounterVec,
    pub forward_retries_total: IntCounterVec,
    pub forward_dead_lettered_records_total: IntCounterVec,
    pub dead_letter_bytes: IntGauge,
    pub forward_lag_records: IntGaugeVec,
    pub worker_takeovers_total: IntCounter,
    pub forward_appends_waiting: IntGaugeVec,
    pub chain_streams: IntGauge,

    // Tombstones and compaction.
    pub tombstones_written_total: IntCounter,
    pub compaction_segments_deleted_total: IntCounter,
    pub compaction_bytes_reclaimed_total: IntCounter,
    pub compaction_errors_total: IntCounter,
    pub spool_reserve_bytes: IntGauge,
    pub spool_reserve_spent_total: IntCounter,

    // Recovery (values describe the last start of this process).
    pub replay_recovered_total: IntCounter,
    pub recovery_corrupt_records_dropped_total: IntCounter,
    pub recovery_corrupt_bytes_dropped_total: IntCounter,
    pub spool_read_damaged_ranges_total: IntCounter,
    pub forward_dispatcher_failures_total: IntCounter,
    pub spool_read_damaged_bytes_total: IntCounter,
    pub recovery_torn_tail_bytes_truncated_total: IntCounter,
    pub recovery_duration_seconds: prometheus::Gauge,
    pub recovery_dedup_files_skipped_total: IntCounter,
    pub recovery_segments_missing_total: IntCounter,
    pub recovery_envelopes_resent_from_seals_total: IntCounter,

    // Process.
    pub build_info: IntGaugeVec,
    pub start_time_seconds: prometheus::Gauge,
    /// Set by the `/metrics` handler from the same check `/readyz` makes, at each scrape.
    pub ready: IntGauge,

    /// Set once by the daemon, run by every [`Metrics::render`]: brings the gauges that are
    /// computed from state (pending work) up to the moment of the scrape, so that a scrape
    /// never reads a figure older than the scrape itself.
    before_render: std::sync::OnceLock<Refresh>,
}

/// One exported metric as README.md's table lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricDoc {
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    pub labels: Vec<String>,
    pub help: String,
}

/// The registry being filled by [`Metrics::new`], with a record of what went into it: a vector
/// metric without children is left out of `Registry::gather`, so only the record lists every
/// metric (the test that keeps README.md's table true reads it).
struct Catalogue {
    registry: Registry,
    docs: std::cell::RefCell<Vec<MetricDoc>>,
}

impl Catalogue {
    fn add(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
        kind: &'static str,
        name: &str,
        help: &str,
        labels: &[&str],
    ) {
        self.registry
            .register(collector)
            .expect("metric registered once");
        self.docs.borrow_mut().push(MetricDoc {
            name: name.to_string(),
            kind,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            help: help.to_string(),
        });
    }
}

fn counter(registry: &Catalogue, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric definition is valid");
    registry.add(Box::new(c.clone()), "counter", name, help, &[]);
    c
}

fn counter_vec(registry: &Catalogue, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    registry.add(Box::new(c.clone()), "counter", name, help, labels);
    c
}

fn gauge(registry: &Catalogue, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric definition is valid");
    registry.add(Box::new(g.clone()), "gauge", name, help, &[]);
    g
}

fn float_gauge(registry: &Catalogue, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(name, help).expect("metric definition is valid");
    registry.add(Box::new(g.clone()), "gauge", name, help, &[]);
    g
}

fn gauge_vec(registry: &Catalogue, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    registry.add(Box::new(g.clone()), "gauge", name, help, labels);
    g
}

fn histogram(registry: &Catalogue, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("metric definition is valid");
    registry.add(Box::new(h.clone()), "histogram", name, help, &[]);
    h
}

fn histogram_vec(
    registry: &Catalogue,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("metric definition is valid");
    registry.add(Box::new(h.clone()), "histogram", name, help, labels);
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Catalogue {
            registry: Registry::new(),
            docs: std::cell::RefCell::new(Vec::new()),
        };
        let d = DURATION_BUCKETS_SECONDS;
        let m = Metrics {
            spool_pending_records: gauge(&r, "spoolgate_spool_pending_records", "Envelopes acknowledged and not yet tombstoned."),
            spool_pending_bytes: gauge(&r, "spoolgate_spool_pending_bytes", "Payload bytes of envelopes acknowledged and not yet tombstoned."),
            spool_segments_active: gauge(&r, "spoolgate_spool_segments", "Segment files currently in the spool directory."),
            spool_oldest_pending_age_seconds: float_gauge(&r, "spoolgate_spool_oldest_pending_age_seconds", "Age of the oldest acknowledged, not yet tombstoned envelope (0 when none)."),
            spool_disk_bytes: gauge(&r, "spoolgate_spool_disk_bytes", "Bytes the spool's segment files occupy (their allocated length), the next segment prepared ahead of rotation included."),
            spool_filesystem_free_bytes: gauge(&r, "spoolgate_spool_filesystem_free_bytes", "Free bytes available to spoolgate on the data directory's filesystem."),
            spool_appends_total: counter(&r, "spoolgate_spool_appends_total", "Records appended to the spool and made durable."),
            spool_append_bytes_total: counter(&r, "spoolgate_spool_append_bytes_total", "Framed bytes appended to the spool."),
            spool_fsync_duration_seconds: histogram(&r, "spoolgate_spool_fsync_duration_seconds", "Duration of each spool fdatasync.", d),
            spool_commit_batch_records: histogram(&r, "spoolgate_spool_commit_batch_records", "Records per group commit (one write, one fdatasync).", BATCH_RECORDS_BUCKETS),
            spool_poisoned: gauge(&r, "spoolgate_spool_poisoned", "1 when a write or fsync failed and the spool refuses appends until restart."),
            spool_full_errors_total: counter(&r, "spoolgate_spool_full_errors_total", "Commit batches refused because the filesystem was full (ENOSPC)."),
            forward_workers_left_behind_total: counter(&r, "spoolgate_forward_workers_left_behind_total", "Times the dispatcher went on without a worker whose inbox was full; that worker's records are re-read from the spool for it once it has room."),

            ingest_requests_total: counter_vec(&r, "spoolgate_ingest_requests_total", "HTTP requests by route and status code.", &["route", "code"]),
            ingest_envelopes_accepted_total: counter(&r, "spoolgate_ingest_envelopes_accepted_total", "Envelopes acknowledged with 202 (dedup hits excluded)."),
            ingest_rejected_total: counter_vec(&r, "spoolgate_ingest_rejected_total", "Requests refused for a limit or state, by reason: 429 (disk, quota, priority, reserve, enospc, inflight_bytes), 503 (poisoned, not_ready, busy: no file descriptor for a new segment, unavailable: the spool is closing), 422 (streams).", &["reason"]),
            ingest_inflight_bytes: gauge(&r, "spoolgate_ingest_inflight_bytes", "Request-body bytes taken by requests being handled, bounded by ingest.inflight_bytes_max."),
            ingest_request_duration_seconds: histogram_vec(&r, "spoolgate_ingest_request_duration_seconds", "Ingest request duration, from headers read to response.", &["route"], d),
            ingest_dedup_hits_total: counter(&r, "spoolgate_ingest_dedup_hits_total", "Envelopes answered from the dedup index instead of being written again."),
            ingest_dedup_entries: gauge(&r, "spoolgate_ingest_dedup_entries", "Client ids in the dedup index (about 310 bytes of memory each), bounded by ingest.dedup_entries_max."),
            ingest_connections_open: gauge(&r, "spoolgate_ingest_connections_open", "Open ingest connections."),
            ingest_connections_evicted_total: counter(&r, "spoolgate_ingest_connections_evicted_total", "Idle ingest connections closed to make room for a new one at ingest.connections_max."),
            ingest_connections_timed_out_total: counter(&r, "spoolgate_ingest_connections_timed_out_total", "Ingest connections closed because nothing moved in either direction for ingest.idle_timeout_ms while no request was being handled (idle keep-alive connections, clients that never read their response)."),

            ring_depth_records: gauge(&r, "spoolgate_ring_depth_records", "Records waiting in the memory ring."),
            ring_capacity_records: gauge(&r, "spoolgate_ring_capacity_records", "Capacity of the memory ring in records."),
            ring_overflows_total: counter(&r, "spoolgate_ring_overflows_total", "Records not pushed to the full ring; the consumer read them back from the segments."),
            forward_records_read_from_segments_total: counter(&r, "spoolgate_forward_records_read_from_segments_total", "Records the dispatcher read from the segments rather than the ring: start-up replay, after a ring overflow, after a rewind, and re-reads for a worker left behind."),
            gate_envelopes_total: counter_vec(&r, "spoolgate_gate_envelopes_total", "Envelopes read by the consumer, by outcome (ok: decoded and passed to the gate; undecodable: dead-lettered as raw bytes, since it does not decode or its slot is not its stream's, and it has no seal to be re-sent from; unsealable: passed to the gate, then too large to seal and dead-lettered, so counted as ok too; unclassifiable: the gate panicked on it, dead-lettered as spooled, counted as ok too).", &["outcome"]),
            gate_pii_found_total: counter_vec(&r, "spoolgate_gate_pii_found_total", "PII matches found by the gate, by kind.", &["kind"]),
            gate_rules_reloads_total: counter_vec(&r, "spoolgate_gate_rules_reloads_total", "Rules file reloads by result (ok, error).", &["result"]),
            gate_duration_seconds: histogram(&r, "spoolgate_gate_duration_seconds", "Time to classify one envelope.", d),

            forward_records_total: counter_vec(&r, "spoolgate_forward_records_total", "Records delivered and confirmed by a sink.", &["sink"]),
            forward_batch_duration_seconds: histogram_vec(&r, "spoolgate_forward_batch_duration_seconds", "Time for a sink to confirm one batch.", &["sink"], d),
            forward_errors_total: counter_vec(&r, "spoolgate_forward_errors_total", "Failed delivery attempts by sink and kind (retryable, rejected, too_large, timeout, dead_letter_full, dead_letter_failed, io: a record the gate panicked on that cannot be read back for its dead letter). A sink that panics shows as spoolgate_worker_takeovers_total.", &["sink", "kind"]),
            forward_retries_total: counter_vec(&r, "spoolgate_forward_retries_total", "Delivery retries by sink.", &["sink"]),
            forward_dead_lettered_records_total: counter_vec(&r, "spoolgate_forward_dead_lettered_records_total", "Records written to the dead-letter directory after a permanent sink rejection.", &["sink"]),
            dead_letter_bytes: gauge(&r, "spoolgate_dead_letter_bytes", "Bytes in the dead-letter directory, as measured at start and kept current by spoolgate's writes (files an operator removes count until a write measures again); bounded by forward.dead_letter_bytes_max."),
            forward_lag_records: gauge_vec(&r, "spoolgate_forward_lag_records", "Records dispatched to a consumer worker and not yet confirmed by its sink, by worker.", &["worker"]),
            worker_takeovers_total: counter(&r, "spoolgate_worker_takeovers_total", "Times a secondary worker took over a failed worker's slots."),
            forward_appends_waiting: gauge_vec(&r, "spoolgate_forward_appends_waiting", "Consumer workers waiting to append a seal or tombstone, by reason: full (the filesystem or the spool quota has no room), busy (no file descriptor for a new segment). Their slots' forwarding is held up meanwhile.", &["reason"]),
            chain_streams: gauge(&r, "spoolgate_chain_streams", "Streams with a hash chain head."),

            tombstones_written_total: counter(&r, "spoolgate_tombstones_written_total", "Records marked complete by a tombstone."),
            compaction_segments_deleted_total: counter(&r, "spoolgate_compaction_segments_deleted_total", "Segments deleted because every record in them was complete."),
            compaction_bytes_reclaimed_total: counter(&r, "spoolgate_compaction_bytes_reclaimed_total", "Bytes freed by deleting segments."),
            compaction_errors_total: counter(&r, "spoolgate_compaction_errors_total", "Compaction passes that failed (a checkpoint or a deletion could not be written); the segments are kept and the pass is retried."),
            spool_reserve_bytes: gauge(&r, "spoolgate_spool_reserve_bytes", "Bytes held in <data_dir>/reserve for forwarding and compaction to spend on a full filesystem; 0 while spent, not yet made, or off (spool.reserve_bytes = 0)."),
            spool_reserve_spent_total: counter(&r, "spoolgate_spool_reserve_spent_total", "Times the disk reserve was emptied for room: by a seal or tombstone append or a compaction pass that found the filesystem full, or by a start with no room for its address file."),

            replay_recovered_total: counter(&r, "spoolgate_replay_recovered_total", "Acknowledged, untombstoned envelopes the last start found in the spool, all of which are fed to the consumers again (none while forward.enabled is false)."),
            recovery_corrupt_records_dropped_total: counter(&r, "spoolgate_recovery_corrupt_records_dropped_total", "Records dropped as corrupt by recovery at the last start (damaged frames counted once each)."),
            recovery_corrupt_bytes_dropped_total: counter(&r, "spoolgate_recovery_corrupt_bytes_dropped_total", "Bytes skipped as corrupt by recovery at the last start."),
            forward_dispatcher_failures_total: counter(&r, "spoolgate_forward_dispatcher_failures_total", "Times the dispatcher, which reads the spool in log order for the workers, failed (a read error from the device, for one): forwarding starts over from the oldest pending record after a backoff that doubles from 200 ms to 30 s while it keeps failing; the log names the error. Alert SpoolgateForwardingStalledOnReadErrors."),
            spool_read_damaged_ranges_total: counter(&r, "spoolgate_spool_read_damaged_ranges_total", "Times a reader met a range of a segment that was damaged after recovery (damage that appeared while running) and skipped it, with the records in it; each is also a WARN log line. A range is counted again each time a reader meets it (forwarding that restarts from an older record reads it again), so this counts meetings, not distinct ranges; a restart's recovery counts each range once."),
            spool_read_damaged_bytes_total: counter(&r, "spoolgate_spool_read_damaged_bytes_total", "Bytes skipped at the meetings counted in spoolgate_spool_read_damaged_ranges_total."),
            recovery_torn_tail_bytes_truncated_total: counter(&r, "spoolgate_recovery_torn_tail_bytes_truncated_total", "Bytes after the last valid frame of the newest segment, taken for a write torn by a crash and cut at the last start (damage to the last frames looks the same, unless it lies before the durable end a clean stop or a start recorded, where it counts as corruption: see README, Corruption)."),
            recovery_envelopes_resent_from_seals_total: counter(&r, "spoolgate_recovery_envelopes_resent_from_seals_total", "Envelopes whose own record a start did not find (a damaged frame, or a segment removed by something other than compaction) but whose seal it found, not tombstoned: forwarded again from the seal, identically (same sequence number, hashes and gate output), where the record was in log order. Beyond 65,536 at one start the rest are lost with the damage and logged as an ERROR."),
            recovery_segments_missing_total: counter(&r, "spoolgate_recovery_segments_missing_total", "Segments missing at the last start, between two present ones or after the newest (named by its rotation frame): removed by something other than compaction, with the acknowledged envelopes they held. (Missing segments from the one compaction last kept, named in the chain-heads checkpoint as first_kept, stop the start instead.)"),
            recovery_dedup_files_skipped_total: counter(&r, "spoolgate_recovery_dedup_files_skipped_total", "Dedup checkpoints that could not be read at the last start (their ids are not deduplicated)."),
            recovery_duration_seconds: float_gauge(&r, "spoolgate_recovery_duration_seconds", "How long recovery took at the last start, the scan of the records it kept included."),

            build_info: gauge_vec(&r, "spoolgate_build_info", "Build information; the value is always 1.", &["version"]),
            start_time_seconds: float_gauge(&r, "spoolgate_start_time_seconds", "Unix time the process started."),
            ready: gauge(&r, "spoolgate_ready", "1 when /readyz answers 200 (recovered, not poisoned, not shutting down, below the hard watermarks, disk reserve not spent), else 0; as of the scrape."),
            before_render: std::sync::OnceLock::new(),
            catalogue: r.docs.take(),
            registry: r.registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Registers the process collector (CPU, resident memory, open fds). Separate from `new`
    /// because only one per process makes sense and unit tests build many `Metrics`.
    pub fn register_process_collector(&self) {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        // A second registration in one registry fails harmlessly; nothing to do then.
        let _ = self.registry.register(Box::new(pc));
    }

    /// Sets what [`Metrics::render`] runs first; a second call is ignored (one daemon, one
    /// source of the computed gauges).
    pub fn refresh_before_render(&self, refresh: impl Fn(&Metrics) + Send + Sync + 'static) {
        let _ = self.before_render.set(Box::new(refresh));
    }

    /// Text exposition format for `GET /metrics`.
    pub fn render(&self) -> Vec<u8> {
        if let Some(refresh) = self.before_render.get() {
            refresh(self);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail on I/O; a failure would mean an invalid metric family.
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README.md's metrics table, row by row: name, type, labels and meaning.
    fn readme_rows() -> Vec<MetricDoc> {
        include_str!("../README.md")
            .lines()
            .filter(|line| line.starts_with("| `spoolgate_"))
            .map(|line| {
                let cells: Vec<&str> = line
                    .trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim())
                    .collect();
                assert_eq!(
                    cells.len(),
                    4,
                    "README metrics row with other than 4 cells: {line}"
                );
                let kind = match cells[1] {
                    "counter" => "counter",
                    "gauge" => "gauge",
                    "histogram" => "histogram",
                    other => panic!("README metrics row with type {other:?}: {line}"),
                };
                MetricDoc {
                    name: cells[0].trim_matches('`').to_string(),
                    kind,
                    // An empty cell or a dash: no labels.
                    labels: cells[2]
                        .trim_matches('`')
                        .split(',')
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty() && l != "—")
                        .collect(),
                    // The table sets names in code type; the help text has no backticks.
                    help: cells[3].replace('`', ""),
                }
            })
            .collect()
    }

    #[test]
    fn the_readme_table_lists_every_metric_with_its_type_labels_and_help() {
        let defined = Metrics::new().catalogue;
        let documented = readme_rows();
        let undocumented: Vec<&MetricDoc> =
            defined.iter().filter(|d| !documented.contains(d)).collect();
        let undefined: Vec<&MetricDoc> =
            documented.iter().filter(|d| !defined.contains(d)).collect();
        assert!(
            undocumented.is_empty() && undefined.is_empty(),
            "src/metrics.rs defines, and README.md's table does not list as such:\n{undocumented:#?}\n\
             README.md's table lists, and src/metrics.rs does not define:\n{undefined:#?}"
        );
        assert_eq!(defined.len(), documented.len(), "a metric listed twice");
    }
}
