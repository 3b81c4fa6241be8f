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

/// Panics on a batch holding a record of `victim`'s stream, the first time only or every
/// time (`always`); records everything else.
struct PanickySink {
    victim: String,
    always: bool,
    panicked: AtomicBool,
    delivered: Mutex<Vec<ForwardRecord>>,
}

impl PanickySink {
    fn new(victim: &str, always: bool) -> PanickySink {
        PanickySink {
            victim: victim.into(),
            always,
            panicked: AtomicBool::new(false),
            delivered: Mutex::new(Vec::new()),
        }
    }

    /// The ids of every record delivered.
    fn delivered_ids(&self) -> std::collections::HashSet<String> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.envelope.id.clone())
            .collect()
    }
}

impl Sink for PanickySink {
    fn name(&self) -> &str {
        "default"
    }

    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a> {
        Box::pin(async move {
            if batch.iter().any(|r| r.stream == self.victim)
                && (!self.panicked.swap(true, Ordering::SeqCst) || self.always)
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
    let sink = Arc::new(PanickySink::new("tenant-3", false));
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

    wait_until("every record delivered", || {
        sink.delivered_ids().len() == total
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_fails_its_primary_and_its_secondary_holds_back_only_the_slots_left_without_an_owner(
) {
    use spoolgate::forward::pipeline::{Pipeline, RestartBackoff};
    use spoolgate::slots::{slot_of, Ownership};

    // Three workers, slots round robin. The victim's record fails its slot's primary and then
    // its secondary; restarts are an hour away, so for the rest of the test the slots whose
    // primary and secondary are those two have no owner, and the other slots must flow.
    let ownership = Ownership::round_robin(3);
    let victim = "tenant-victim".to_string();
    let down = [
        ownership.primary(slot_of(&victim)),
        ownership.secondary(slot_of(&victim)),
    ];
    let ownerless = |tenant: &str| {
        let slot = slot_of(tenant);
        down.contains(&ownership.primary(slot)) && down.contains(&ownership.secondary(slot))
    };
    let tenants = (0..).map(|i| format!("tenant-{i}"));
    let live: Vec<String> = tenants.clone().filter(|t| !ownerless(t)).take(6).collect();
    let held: Vec<String> = tenants.filter(|t| ownerless(t)).take(2).collect();

    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let sink = Arc::new(PanickySink::new(&victim, true));
    let mut parts = pipeline_common::parts(
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
        Arc::new(Mutex::new(spoolgate::chain::Chains::new())),
        Arc::new(spoolgate::forward::ledger::Ledger::default()),
        None,
    );
    let hour = std::time::Duration::from_secs(3600);
    parts.restart_backoff = RestartBackoff {
        initial: hour,
        max: hour,
    };
    let pipeline = Pipeline::start(parts);

    // The victim's record first, so that every later record is behind it in the log; it
    // fails the primary, then the secondary, and its slot is left without an owner.
    append(&spool, &victim, "victim-0".into(), "boom".into()).await;
    wait_until("the primary and the secondary failed", || {
        metrics.worker_takeovers_total.get() >= 2
    })
    .await;
    let mut live_ids = std::collections::HashSet::new();
    for n in 0..60 {
        let tenant = if n % 4 == 3 {
            &held[n % 2]
        } else {
            &live[n % 6]
        };
        let id = format!("{tenant}-{n}");
        if !held.contains(tenant) {
            live_ids.insert(id.clone());
        }
        append(&spool, tenant, id, format!("record {n}")).await;
    }

    wait_until("every record of a slot with an owner delivered", || {
        live_ids.is_subset(&sink.delivered_ids())
    })
    .await;
    assert_eq!(
        metrics.worker_takeovers_total.get(),
        2,
        "no worker failed again, and none was restarted"
    );
    // Nothing of the slots without an owner went out: they wait, pending, for a restart.
    let delivered = sink.delivered_ids();
    assert!(
        delivered.iter().all(|id| live_ids.contains(id)),
        "{delivered:?}"
    );
    pipeline.shutdown().await;
}
