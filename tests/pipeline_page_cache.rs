//! The page cache and a worker left behind, in process: while a sink holds one worker's records,
//! the dispatcher goes on with the other worker and the writer moves many segments further,
//! but the segments the held worker must re-read keep their cached pages; once it has caught
//! up, they are released like the rest. The releases are watched through a recording
//! filesystem, with 8 KiB segments and two segments cached behind the active one.

mod pipeline_common;
mod spool_common;

use std::sync::{Arc, Mutex};

use pipeline_common::{append, wait_until};
use spool_common::recording::{Log, RecordingFs};
use spoolgate::chain::SharedRecord;
use spoolgate::config::ForwardConfig;
use spoolgate::forward::sink::{DeliverFuture, Sink};
use spoolgate::metrics::Metrics;
use spoolgate::ring::Ring;
use spoolgate::slots::{slot_of, Ownership};
use spoolgate::spool::{Position, Spool};

const SEGMENT_BYTES: u64 = 8 * 1024;
const WORKERS: usize = 2;

/// Holds every batch with a record of `held_stream` until `open` is set; takes the rest.
struct HoldingSink {
    held_stream: String,
    open: tokio::sync::watch::Sender<bool>,
    delivered: Mutex<Vec<String>>,
}

impl Sink for HoldingSink {
    fn name(&self) -> &str {
        "default"
    }

    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a> {
        Box::pin(async move {
            if batch.iter().any(|r| r.stream == self.held_stream) {
                let mut open = self.open.subscribe();
                while !*open.borrow_and_update() {
                    if open.changed().await.is_err() {
                        break;
                    }
                }
            }
            self.delivered
                .lock()
                .unwrap()
                .extend(batch.iter().map(|r| r.envelope.id.clone()));
            Ok(())
        })
    }
}

/// A tenant whose slot worker `worker` owns.
fn tenant_of_worker(worker: usize, prefix: &str) -> String {
    let ownership = Ownership::round_robin(WORKERS);
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|t| ownership.primary(slot_of(t)) == worker)
        .expect("some tenant maps to every worker")
}

async fn append_numbered(spool: &Spool, tenant: &str, n: usize) -> Position {
    append(
        spool,
        tenant,
        format!("{tenant}-{n}"),
        format!("record {n} of {tenant}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_a_held_worker_must_re_read_keep_their_pages_until_it_has_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let metrics = Arc::new(Metrics::new());
    // A ring far smaller than the backlog: the main pass reads the segments too.
    let ring = Arc::new(Ring::new(8, 1 << 20, metrics.clone()));
    let mut opts = spool_common::options(&spool_dir);
    opts.segment_bytes_max = SEGMENT_BYTES;
    opts.record_bytes_max = 2048;
    opts.zero_ahead_bytes = 0;
    opts.cached_behind_bytes = 2 * SEGMENT_BYTES;
    opts.cached_unread_bytes_max = 64 * SEGMENT_BYTES;
    let log = Arc::new(Mutex::new(Log::default()));
    let observer: Arc<dyn spoolgate::spool::CommitObserver> = ring.clone();
    let (spool, _) = Spool::open_with_fs(
        opts,
        Arc::new(RecordingFs { log: log.clone() }),
        metrics.clone(),
        Some(observer),
    )
    .unwrap();
    let held = tenant_of_worker(0, "held");
    let flowing = tenant_of_worker(1, "flowing");
    let (open, _) = tokio::sync::watch::channel(false);
    let sink = Arc::new(HoldingSink {
        held_stream: held.clone(),
        open,
        delivered: Mutex::new(Vec::new()),
    });
    let pipeline = pipeline_common::start(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        ForwardConfig {
            workers: WORKERS,
            batch_records_max: 1,
            worker_queue_records_max: 2,
            linger_ms: 0,
            ..ForwardConfig::default()
        },
        dir.path(),
    );
    let delivered = |sink: &HoldingSink| sink.delivered.lock().unwrap().len();

    // Warm-up: a few segments of the flowing stream, delivered; the writer releases the old ones.
    let mut flowing_n = 0;
    while spool.durable_end().segment < 5 {
        append_numbered(&spool, &flowing, flowing_n).await;
        flowing_n += 1;
    }
    wait_until("the warm-up delivered", || delivered(&sink) == flowing_n).await;

    // The held stream's records: one in the sink, two in the inbox, and the next left behind.
    let held_positions = {
        let mut p = Vec::new();
        for n in 0..6 {
            p.push(append_numbered(&spool, &held, n).await);
        }
        p
    };
    // The worker is left behind at one of these records; seals and tombstones between them may
    // put them in two segments, and the last one's must be kept in any case.
    let first_held_segment = held_positions[0].segment;
    let held_segment = held_positions[held_positions.len() - 1].segment;
    wait_until("the held worker left behind", || {
        metrics.forward_workers_left_behind_total.get() >= 1
    })
    .await;

    // The flowing stream goes on for many segments past the held one.
    let before = flowing_n;
    while spool.durable_end().segment < held_segment + 10 {
        append_numbered(&spool, &flowing, flowing_n).await;
        flowing_n += 1;
    }
    wait_until("the flowing records delivered", || {
        delivered(&sink) == flowing_n
    })
    .await;
    assert!(flowing_n - before > 100);
    wait_until("the old segments released", || {
        log.lock()
            .unwrap()
            .released_segments(&spool_dir)
            .contains(&(first_held_segment - 1))
    })
    .await;
    // The releases run on a helper thread, and the log may not show them all yet; the
    // writer's own bound, decided before the appends above returned, does.
    let released_below = spool.cache_released_below();
    assert!(
        released_below <= held_segment,
        "released below {released_below}, but the held worker still has to re-read segment {held_segment}"
    );

    // Released: the held worker catches up from the segments; then they go like the rest.
    sink.open.send_replace(true);
    wait_until("every record delivered", || {
        delivered(&sink) == flowing_n + held_positions.len()
    })
    .await;
    let end = spool.durable_end().segment;
    while spool.durable_end().segment < end + 3 {
        append_numbered(&spool, &flowing, flowing_n).await;
        flowing_n += 1;
    }
    wait_until("the held segment released", || {
        log.lock()
            .unwrap()
            .released_segments(&spool_dir)
            .contains(&held_segment)
    })
    .await;
    pipeline.shutdown().await;
}
