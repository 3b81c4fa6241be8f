//! An envelope record whose CRC holds but whose payload does not decode, in process: it cannot
//! be forwarded, so it is dead-lettered as raw bytes and tombstoned, and the records of its
//! stream around it are delivered in order, gapless. When the dead-letter write fails, the
//! record stays pending (compaction keeps its segment) and forwarding waits for it; when its
//! tombstone finds the spool full, it spends the disk reserve, as a worker's would. An
//! envelope too large to seal once gated gets no sequence number either, and its tombstone is
//! durable before anything behind it is sealed. An envelope whose slot is not its stream's is
//! dead-lettered like an undecodable one, not sequenced by a worker that does not own its stream.
//! An envelope the gate panics on is dead-lettered as spooled and tombstoned, without failing
//! its worker. An envelope that no longer decodes but was sealed is re-sent from its seal.

mod pipeline_common;

use std::sync::Arc;

use bytes::Bytes;
use pipeline_common::{append, envelope_record, quick_retries, wait_until, RecordingSink};
use spoolgate::chain::{Chains, SealedBatch, SealedEntry, Tombstone};
use spoolgate::config::ForwardConfig;
use spoolgate::envelope::Envelope;
use spoolgate::forward::ledger::Ledger;
use spoolgate::metrics::Metrics;
use spoolgate::ring::Ring;
use spoolgate::slots::slot_of;
use spoolgate::spool::{Position, RecordKind, Spool};

/// What `sink` received: each record's envelope id and sequence number, in order.
fn delivered(sink: &RecordingSink) -> Vec<(String, u64)> {
    sink.delivered
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.envelope.id.clone(), r.seq))
        .collect()
}

/// The dead letters under `scratch` (the pipeline's `dl` directory), parsed.
fn dead_letters(scratch: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_dir(scratch.join("dl"))
        .unwrap()
        .map(|e| {
            serde_json::from_str(&std::fs::read_to_string(e.unwrap().path()).unwrap()).unwrap()
        })
        .collect()
}

/// Appends envelope `before` of stream `t`, an undecodable envelope record, then envelope
/// `after`; returns the positions of `before` and of the undecodable record.
async fn append_between_two_good_records(spool: &Spool) -> (Position, Position) {
    let before = append(spool, "t", "before".into(), "First.".into()).await;
    // 0xc1 is the one byte msgpack never uses: framed with a good CRC, it decodes to nothing.
    let bad = spool
        .append(vec![(
            RecordKind::ENVELOPE,
            Bytes::from_static(&[0xc1, 0x2a]),
        )])
        .await
        .unwrap()[0];
    append(spool, "t", "after".into(), "Last.".into()).await;
    (before, bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_envelope_record_is_dead_lettered_as_hex_and_tombstoned_and_its_stream_goes_on(
) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let sink = Arc::new(RecordingSink::default());
    let pipeline = pipeline_common::start(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        ForwardConfig {
            linger_ms: 1,
            ..ForwardConfig::default()
        },
        dir.path(),
    );

    let (_, bad) = append_between_two_good_records(&spool).await;

    wait_until("both good records delivered", || {
        sink.delivered.lock().unwrap().len() == 2
    })
    .await;
    wait_until("the bad record counted", || {
        metrics
            .gate_envelopes_total
            .with_label_values(&["undecodable"])
            .get()
            == 1
    })
    .await;
    let tombstoned = |position| {
        let mut reader = spool.reader(spool.first_position());
        while let Some(r) = reader.next_record().unwrap() {
            if r.kind == RecordKind::TOMBSTONE
                && Tombstone::decode(&r.payload)
                    .unwrap()
                    .positions
                    .contains(&position)
            {
                return true;
            }
        }
        false
    };
    wait_until("the bad record tombstoned", || tombstoned(bad)).await;
    assert_eq!(
        delivered(&sink),
        vec![("before".to_string(), 1), ("after".to_string(), 2)]
    );
    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["payload_hex"], "c12a");
    assert_eq!(letters[0]["position"]["offset"], bad.offset);
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_whose_dead_letter_write_fails_stays_pending_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let sink = Arc::new(RecordingSink::default());
    let ledger = Arc::new(Ledger::default());
    // A file where the dead-letter directory should be: every dead-letter write fails.
    let dl = dir.path().join("dl");
    std::fs::write(&dl, b"in the way").unwrap();
    let pipeline = pipeline_common::start_sharing(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        quick_retries(),
        dir.path(),
        Default::default(),
        ledger.clone(),
        None,
    );

    let (_, bad) = append_between_two_good_records(&spool).await;

    // Counted as the workers count a failing dead-letter directory, so the alert matches.
    let failed_writes = || {
        metrics
            .forward_errors_total
            .with_label_values(&["default", "dead_letter_failed"])
            .get()
    };
    wait_until("the dead-letter write retried", || failed_writes() >= 3).await;
    // Still pending, so compaction keeps its segment; nothing after it in the log has gone
    // out ahead of it, and it is not counted as dead-lettered.
    assert!(ledger.is_pending(bad));
    let segments: Vec<u64> = spool.segments().iter().map(|s| s.id).collect();
    assert_eq!(ledger.compactable_below(&segments, u64::MAX), None);
    let ids = || -> Vec<String> {
        sink.delivered
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.envelope.id.clone())
            .collect()
    };
    // The record before it was handed to its worker before the dispatcher stopped at the bad
    // one, but its delivery (a seal's fdatasync first) may finish after these retries.
    wait_until("the record before it delivered", || !ids().is_empty()).await;
    assert_eq!(ids(), vec!["before".to_string()]);
    let undecodable = || {
        metrics
            .gate_envelopes_total
            .with_label_values(&["undecodable"])
            .get()
    };
    assert_eq!(undecodable(), 0);

    std::fs::remove_file(&dl).unwrap();
    wait_until("the record after it delivered", || ids().len() == 2).await;
    assert_eq!(ids(), vec!["before".to_string(), "after".to_string()]);
    assert_eq!(undecodable(), 1);
    wait_until("the bad record completed", || !ledger.is_pending(bad)).await;
    assert_eq!(std::fs::read_dir(&dl).unwrap().count(), 1);
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_whose_tombstone_finds_the_spool_full_spends_the_disk_reserve() {
    use spoolgate::compaction::reserve::Reserve;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let (spool, ring, metrics, faults) = pipeline_common::open_faulty_spool(dir.path());
    let sink = Arc::new(RecordingSink::default());
    let ledger = Arc::new(Ledger::default());
    let reserve = Arc::new(Reserve::new(
        dir.path(),
        4096,
        0,
        0,
        metrics.spool_reserve_bytes.clone(),
        metrics.spool_reserve_spent_total.clone(),
    ));
    assert!(reserve.keep(u64::MAX).unwrap());
    // The dead-letter directory is in the way until the spool is full, so that the record's
    // tombstone is what meets the full spool, not an envelope of a worker before it.
    let dl = dir.path().join("dl");
    std::fs::write(&dl, b"in the way").unwrap();
    let pipeline = pipeline_common::start_sharing(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        quick_retries(),
        dir.path(),
        Default::default(),
        ledger.clone(),
        Some(reserve.clone()),
    );

    let (before, bad) = append_between_two_good_records(&spool).await;
    wait_until("the record before it delivered and tombstoned", || {
        sink.delivered.lock().unwrap().len() == 1 && !ledger.is_pending(before)
    })
    .await;
    faults.enospc_writes.store(true, Ordering::SeqCst);
    std::fs::remove_file(&dl).unwrap();

    wait_until("the reserve spent for the tombstone", || {
        metrics.spool_reserve_spent_total.get() == 1
    })
    .await;
    assert_eq!(std::fs::metadata(reserve.path()).unwrap().len(), 0);
    assert!(reserve.refuses_ingest(0));

    // The fault stands for a disk the reserve did not free enough of: the tombstone waits
    // until there is room, then the stream goes on.
    faults.enospc_writes.store(false, Ordering::SeqCst);
    wait_until("the bad record completed", || !ledger.is_pending(bad)).await;
    wait_until("the record after it delivered", || {
        sink.delivered.lock().unwrap().len() == 2
    })
    .await;
    pipeline.shutdown().await;
}

/// Appends `before`, `middle` and `after` of stream `t` in one request, then starts a
/// pipeline on the spool with a recording sink and waits until the two good records are
/// delivered. Returns the three positions, the sink and the running pipeline.
async fn forward_around(
    spool: &Spool,
    ring: Arc<Ring>,
    metrics: &Arc<Metrics>,
    scratch: &std::path::Path,
    middle: (RecordKind, Bytes),
) -> (
    Vec<Position>,
    Arc<RecordingSink>,
    spoolgate::forward::pipeline::Pipeline,
) {
    let positions = spool
        .append(vec![
            envelope_record("t", "before", "First.".into()),
            middle,
            envelope_record("t", "after", "Last.".into()),
        ])
        .await
        .unwrap();
    let sink = Arc::new(RecordingSink::default());
    let pipeline =
        pipeline_common::start(spool, ring, metrics, sink.clone(), quick_retries(), scratch);
    wait_until("both good records delivered", || {
        sink.delivered.lock().unwrap().len() == 2
    })
    .await;
    (positions, sink, pipeline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_to_seal_is_tombstoned_before_anything_behind_it_is_sealed() {
    // Whether a record fits a seal depends on the rules and the PII policy, which may change
    // across a restart. So the verdict must be durable before the records behind it take
    // sequence numbers: otherwise a crash between their seal and its tombstone lets the next
    // run seal it after them, and a sink sees 1, 3, 2.
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let record_bytes_max = spool.record_bytes_max() as usize;
    // An envelope that fills a spool record as received: once gated (hashes, summary) it
    // cannot fit one.
    let mut text = "Big words here. ".repeat(record_bytes_max / 16);
    while envelope_record("t", "big", text.clone()).1.len() > record_bytes_max - 8 {
        text.pop();
    }
    let (positions, sink, pipeline) = forward_around(
        &spool,
        ring,
        &metrics,
        dir.path(),
        envelope_record("t", "big", text),
    )
    .await;
    let (big, after) = (positions[1], positions[2]);
    pipeline.shutdown().await;

    assert_eq!(
        delivered(&sink),
        vec![("before".to_string(), 1), ("after".to_string(), 2)]
    );
    // Log order of the big record's tombstone and of the seal of the record behind it.
    let (mut big_tombstoned_at, mut after_sealed_at) = (None, None);
    let mut reader = spool.reader(spool.first_position());
    while let Some(r) = reader.next_record().unwrap() {
        if r.kind == RecordKind::TOMBSTONE
            && big_tombstoned_at.is_none()
            && Tombstone::decode(&r.payload)
                .unwrap()
                .positions
                .contains(&big)
        {
            big_tombstoned_at = Some(r.position);
        }
        if r.kind == RecordKind::SEALED
            && SealedBatch::decode(&r.payload)
                .unwrap()
                .entries
                .iter()
                .any(|e| e.position == after)
        {
            after_sealed_at = Some(r.position);
        }
    }
    let (Some(tombstoned), Some(sealed)) = (big_tombstoned_at, after_sealed_at) else {
        panic!("tombstone {big_tombstoned_at:?}, seal {after_sealed_at:?}");
    };
    assert!(
        tombstoned < sealed,
        "the big record's tombstone at {tombstoned:?} must precede the seal at {sealed:?}"
    );
    assert_eq!(
        metrics
            .gate_envelopes_total
            .with_label_values(&["unsealable"])
            .get(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_whose_slot_is_not_its_streams_is_dead_lettered_not_sequenced() {
    // Routed by its slot but chained by its stream, it would be sequenced by a worker that
    // does not own the stream, beside the one that does. Ingest never writes one.
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let foreign = Envelope {
        slot: (slot_of("t") + 1) % 1024,
        ..pipeline_common::envelope("t", "foreign".into(), "Routed elsewhere.".into())
    };
    let (positions, sink, pipeline) = forward_around(
        &spool,
        ring,
        &metrics,
        dir.path(),
        (RecordKind::ENVELOPE, Bytes::from(foreign.encode().unwrap())),
    )
    .await;
    wait_until("the foreign record dead-lettered", || {
        metrics
            .gate_envelopes_total
            .with_label_values(&["undecodable"])
            .get()
            == 1
    })
    .await;
    pipeline.shutdown().await;
    assert_eq!(
        delivered(&sink),
        vec![("before".to_string(), 1), ("after".to_string(), 2)]
    );
    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["position"]["offset"], positions[1].offset);
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("is not its stream's slot"), "{letters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_the_gate_panics_on_is_dead_lettered_as_spooled_and_its_worker_goes_on() {
    use spoolgate::config::GateConfig;
    use spoolgate::forward::pipeline::Pipeline;
    use spoolgate::gate::Gate;

    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let sink = Arc::new(RecordingSink::default());
    let mut parts = pipeline_common::parts(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        quick_retries(),
        dir.path(),
        Arc::new(std::sync::Mutex::new(spoolgate::chain::Chains::new())),
        Arc::new(Ledger::default()),
        None,
    );
    spoolgate::gate::quiet_classify_panics();
    parts.gate = Arc::new(
        Gate::new(&GateConfig::default(), metrics.clone())
            .unwrap()
            .panicking_on(|e| e.id == "poison"),
    );
    let pipeline = Pipeline::start(parts);

    append(&spool, "t", "before".into(), "First.".into()).await;
    let poison = append(&spool, "t", "poison".into(), "Boom.".into()).await;
    append(&spool, "t", "after".into(), "Last.".into()).await;

    wait_until("both good records delivered", || {
        sink.delivered.lock().unwrap().len() == 2
    })
    .await;
    // The poison record took no sequence number: the stream stays gapless.
    assert_eq!(
        delivered(&sink),
        vec![("before".to_string(), 1), ("after".to_string(), 2)]
    );
    assert_eq!(
        metrics
            .gate_envelopes_total
            .with_label_values(&["unclassifiable"])
            .get(),
        1
    );
    assert_eq!(metrics.worker_takeovers_total.get(), 0, "no worker failed");
    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["position"]["offset"], poison.offset);
    // Where it panicked, never the panic's message, which may quote the text.
    let reason = letters[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the gate panicked on this envelope at src/gate/mod.rs:"),
        "{reason}"
    );
    assert!(!reason.contains("injected"), "{reason}");
    // As spooled: the raw envelope record, which decodes to the envelope appended.
    let raw = hex::decode(letters[0]["payload_hex"].as_str().unwrap()).unwrap();
    let envelope: Envelope = rmp_serde::from_slice(&raw).unwrap();
    assert_eq!(envelope.id, "poison");
    pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_envelope_record_that_does_not_decode_is_re_sent_from_its_seal_not_dead_lettered()
{
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    // A record sealed by an earlier run (its seal holds the gated envelope) whose envelope
    // record, CRC intact, no longer decodes: a stricter decoder in a later build, say.
    let bad = spool
        .append(vec![(
            RecordKind::ENVELOPE,
            Bytes::from_static(&[0xc1, 0x2a]),
        )])
        .await
        .unwrap()[0];
    let sealed = Chains::new()
        .seal(pipeline_common::envelope(
            "t",
            "sealed".into(),
            "Sealed.".into(),
        ))
        .unwrap();
    let batch = SealedBatch {
        entries: vec![SealedEntry {
            position: bad,
            record: sealed.clone(),
        }],
    };
    spool
        .append(vec![(
            RecordKind::SEALED,
            Bytes::from(batch.encode().unwrap()),
        )])
        .await
        .unwrap();
    let sink = Arc::new(RecordingSink::default());
    // The stream's head, as the daemon's start-up scan restores it from the seal.
    let mut chains = Chains::new();
    chains.observe(&sealed);
    let pipeline = pipeline_common::start_sharing(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        quick_retries(),
        dir.path(),
        Arc::new(std::sync::Mutex::new(chains)),
        Arc::new(Ledger::default()),
        None,
    );
    append(&spool, "t", "after".into(), "Last.".into()).await;

    wait_until("both records delivered", || {
        sink.delivered.lock().unwrap().len() == 2
    })
    .await;
    let got = sink.delivered.lock().unwrap().clone();
    assert_eq!(got[0], sealed, "re-sent as sealed, byte for byte");
    assert_eq!(
        delivered(&sink),
        vec![("sealed".to_string(), 1), ("after".to_string(), 2)]
    );
    assert!(
        !dir.path().join("dl").exists() || dead_letters(dir.path()).is_empty(),
        "nothing dead-lettered"
    );
    pipeline.shutdown().await;
}
