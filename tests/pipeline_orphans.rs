//! An envelope whose own record is lost to damage after its seal was durable, and before its
//! tombstone, is an *orphan* (see `forward::ledger`): the seal holds everything it is forwarded
//! as, so the next start re-sends it from the seal, identically, in log order, and tombstones
//! it. Before, it was lost with the damage.

mod pipeline_common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use pipeline_common::{append, envelope, quick_retries, wait_until, RecordingSink};
use spoolgate::chain::{Chains, SealedBatch, SealedEntry, Tombstone};
use spoolgate::forward::ledger::{self, Ledger};
use spoolgate::metrics::Metrics;
use spoolgate::ring::Ring;
use spoolgate::spool::{Position, RecordKind, Spool};

async fn append_record(spool: &Spool, kind: RecordKind, payload: Vec<u8>) -> Position {
    spool
        .append(vec![(kind, Bytes::from(payload))])
        .await
        .unwrap()[0]
}

/// What a previous run left in `dir`: three envelopes of stream t, sealed as 1, 2 and 3; the
/// first delivered and tombstoned, the other two sealed but not yet confirmed; then the disk
/// damaged the frame of the second ("lost"). Returns the three sealed entries.
async fn left_with_a_damaged_sealed_record(dir: &std::path::Path) -> Vec<SealedEntry> {
    let (metrics, ring) = {
        let metrics = Arc::new(Metrics::new());
        let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
        (metrics, ring)
    };
    let spool = pipeline_common::open_spool(dir, &ring, &metrics);
    let mut chains = Chains::new();
    let mut entries = Vec::new();
    for id in ["first", "lost", "kept"] {
        let position = append(&spool, "t", id.into(), format!("Text of {id}.")).await;
        let record = chains
            .seal(envelope("t", id.into(), format!("Text of {id}.")))
            .unwrap();
        entries.push(SealedEntry { position, record });
    }
    let sealed = SealedBatch {
        entries: entries.clone(),
    };
    append_record(&spool, RecordKind::SEALED, sealed.encode().unwrap()).await;
    let tombstone = Tombstone {
        positions: vec![entries[0].position],
        heads: Vec::new(),
    };
    append_record(&spool, RecordKind::TOMBSTONE, tombstone.encode().unwrap()).await;
    tokio::task::block_in_place(|| spool.close()).unwrap();
    drop(spool);

    let segment = dir
        .join("spool")
        .join(format!("{:020}.seg", entries[1].position.segment));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.write_at(&[0xff; 4], entries[1].position.offset)
        .unwrap();
    drop(file);
    entries
}

/// Starts the pipeline on the reopened `spool` as the daemon's restart would: the start-up scan
/// (in `start_sharing`), and the stream's head restored from its last seal (`last_sealed`).
fn restart(
    dir: &std::path::Path,
    spool: &Spool,
    ring: Arc<Ring>,
    metrics: &Arc<Metrics>,
    last_sealed: &SealedEntry,
    sink: Arc<dyn spoolgate::forward::sink::Sink>,
) -> spoolgate::forward::pipeline::Pipeline {
    let mut heads = Chains::new();
    heads.observe(&last_sealed.record);
    pipeline_common::start_sharing(
        spool,
        ring,
        metrics,
        sink,
        quick_retries(),
        dir,
        Arc::new(std::sync::Mutex::new(heads)),
        Arc::new(Ledger::default()),
        None,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_envelope_whose_record_was_damaged_is_re_sent_from_its_seal_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let entries = left_with_a_damaged_sealed_record(dir.path()).await;
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let check = Ledger::default();
    let summary = ledger::scan(&spool, &check, 0, |_, _| {}, |_, _| {}).unwrap();
    assert_eq!(summary.orphans, 1, "{summary:?}");
    assert_eq!(summary.pending, 2, "{summary:?}");
    let sink = Arc::new(RecordingSink::default());
    let pipeline = restart(
        dir.path(),
        &spool,
        ring,
        &metrics,
        &entries[2],
        sink.clone(),
    );
    append(&spool, "t", "after".into(), "Text of after.".into()).await;
    wait_until("three records delivered", || {
        sink.delivered.lock().unwrap().len() == 3
    })
    .await;
    let got = sink.delivered.lock().unwrap().clone();
    assert_eq!(
        got[0], entries[1].record,
        "re-sent from its seal, byte for byte"
    );
    assert_eq!(got[1], entries[2].record);
    assert_eq!((got[2].envelope.id.as_str(), got[2].seq), ("after", 4));
    pipeline.shutdown().await;

    // Its tombstone is written: a later start finds nothing to re-send.
    let again = Ledger::default();
    let summary = ledger::scan(&spool, &again, 0, |_, _| {}, |_, _| {}).unwrap();
    assert_eq!((summary.orphans, summary.pending), (0, 0), "{summary:?}");
}

/// Panics the first time it is given the record of envelope `victim`; keeps everything else.
struct PanicOnce {
    victim: &'static str,
    panicked: std::sync::atomic::AtomicBool,
    delivered: std::sync::Mutex<Vec<spoolgate::chain::ForwardRecord>>,
}

impl spoolgate::forward::sink::Sink for PanicOnce {
    fn name(&self) -> &str {
        "default"
    }

    fn deliver<'a>(
        &'a self,
        batch: &'a [spoolgate::chain::SharedRecord],
    ) -> spoolgate::forward::sink::DeliverFuture<'a> {
        Box::pin(async move {
            if batch.iter().any(|r| r.envelope.id == self.victim)
                && !self
                    .panicked
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                panic!("simulated sink bug on {}", self.victim);
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
async fn a_worker_failing_on_an_orphan_ends_the_epoch_and_the_rewind_sends_it_again_identically() {
    let dir = tempfile::tempdir().unwrap();
    let entries = left_with_a_damaged_sealed_record(dir.path()).await;
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let sink = Arc::new(PanicOnce {
        victim: "lost",
        panicked: Default::default(),
        delivered: Default::default(),
    });
    let pipeline = restart(
        dir.path(),
        &spool,
        ring,
        &metrics,
        &entries[2],
        sink.clone(),
    );
    wait_until("both pending records delivered", || {
        let got = sink.delivered.lock().unwrap();
        got.iter().any(|r| r.envelope.id == "lost") && got.iter().any(|r| r.envelope.id == "kept")
    })
    .await;
    assert!(sink.panicked.load(std::sync::atomic::Ordering::SeqCst));
    let got = sink.delivered.lock().unwrap().clone();
    let lost: Vec<_> = got.iter().filter(|r| r.envelope.id == "lost").collect();
    assert_eq!(
        *lost[0], entries[1].record,
        "re-sent from its seal after the rewind"
    );
    // Order within the stream: "lost" (2) before "kept" (3), every time each was delivered.
    let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
    let first_kept = seqs.iter().position(|&s| s == 3).unwrap();
    assert!(seqs[..first_kept].contains(&2), "{seqs:?}");
    pipeline.shutdown().await;
    let again = Ledger::default();
    let summary = ledger::scan(&spool, &again, 0, |_, _| {}, |_, _| {}).unwrap();
    assert_eq!((summary.orphans, summary.pending), (0, 0), "{summary:?}");
}

/// What a previous run left in `dir`: envelope "lost" of stream t in segment 1, with fillers of
/// another stream up to segment 2, where its seal (seq 1) is, never tombstoned; then the disk
/// damaged every frame of segment 1, so the start-up scan reads no record of it.
async fn left_with_an_unreadable_oldest_segment(dir: &std::path::Path) -> SealedEntry {
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir, &ring, &metrics);
    let position = append(&spool, "t", "lost".into(), "Text of lost.".into()).await;
    assert_eq!(position.segment, 1);
    let mut filler = 0;
    while append(&spool, "f", format!("fill{filler}"), "x".repeat(60_000))
        .await
        .segment
        == 1
    {
        filler += 1;
    }
    let record = Chains::new()
        .seal(envelope("t", "lost".into(), "Text of lost.".into()))
        .unwrap();
    let entry = SealedEntry { position, record };
    let sealed = SealedBatch {
        entries: vec![entry.clone()],
    };
    let at = append_record(&spool, RecordKind::SEALED, sealed.encode().unwrap()).await;
    assert_eq!(at.segment, 2);
    tokio::task::block_in_place(|| spool.close()).unwrap();
    drop(spool);

    let segment = dir.join("spool").join(format!("{:020}.seg", 1));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    let len = file.metadata().unwrap().len();
    // Everything after the segment header: no frame of it can be read.
    file.write_at(&vec![0xff; (len - 64) as usize], 64).unwrap();
    drop(file);
    entry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_envelope_of_an_oldest_segment_with_no_readable_frame_is_re_sent_and_its_segment_kept(
) {
    let dir = tempfile::tempdir().unwrap();
    let entry = left_with_an_unreadable_oldest_segment(dir.path()).await;
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let ids: Vec<u64> = spool.segments().iter().map(|s| s.id).collect();
    assert_eq!(ids[0], 1, "the damaged segment is still there: {ids:?}");
    // The scan took the first segment it read a record of (2) for the oldest, and so the seal
    // for one naming an envelope compaction had deleted: no orphan, and segment 1 free to go.
    let check = Ledger::default();
    let summary = ledger::scan(&spool, &check, 0, |_, _| {}, |_, _| {}).unwrap();
    assert_eq!(summary.orphans, 1, "{summary:?}");
    assert_eq!(
        check.compactable_below(&ids, *ids.last().unwrap()),
        None,
        "segment 1 holds a pending orphan"
    );
    // The same scan through `spoolgate inspect`'s reading of the directory.
    let pending = ledger::pending_in_spool(&dir.path().join("spool")).unwrap();
    assert_eq!(pending.get(&1).map(|p| p.orphans), Some(1), "{pending:?}");

    let sink = Arc::new(RecordingSink::default());
    let pipeline = restart(dir.path(), &spool, ring, &metrics, &entry, sink.clone());
    wait_until("the orphan delivered", || {
        sink.delivered
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.envelope.id == "lost")
    })
    .await;
    let got = sink.delivered.lock().unwrap().clone();
    let lost: Vec<_> = got.iter().filter(|r| r.envelope.id == "lost").collect();
    assert_eq!(
        *lost[0], entry.record,
        "re-sent from its seal, byte for byte"
    );
    pipeline.shutdown().await;
}
