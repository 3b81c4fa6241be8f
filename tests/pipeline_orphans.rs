//! An envelope whose own record is lost to damage after its seal was durable, and before its
//! tombstone, is an *orphan* (see `forward::ledger`): the seal holds everything it is forwarded
//! as, so the next start re-sends it from the seal, identically, in log order, and tombstones
//! it. Before, it was lost with the damage.

mod pipeline_common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use pipeline_common::{append, envelope, wait_until, RecordingSink};
use spoolgate::chain::{Chains, SealedBatch, SealedEntry, Tombstone};
use spoolgate::config::ForwardConfig;
use spoolgate::forward::ledger::{self, Ledger};
use spoolgate::metrics::Metrics;
use spoolgate::ring::Ring;
use spoolgate::spool::{Position, RecordKind, Spool};

fn quick_retries() -> ForwardConfig {
    ForwardConfig {
        linger_ms: 1,
        retry_initial_ms: 1,
        retry_max_ms: 10,
        ..ForwardConfig::default()
    }
}

async fn append_record(spool: &Spool, kind: RecordKind, payload: Vec<u8>) -> Position {
    spool
        .append(vec![(kind, Bytes::from(payload))])
        .await
        .unwrap()[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_envelope_whose_record_was_damaged_is_re_sent_from_its_seal_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (metrics, ring) = {
        let metrics = Arc::new(Metrics::new());
        let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
        (metrics, ring)
    };
    // What a previous run left: three envelopes of stream t, sealed as 1, 2 and 3; the first
    // delivered and tombstoned, the other two sealed but not yet confirmed.
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
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

    // The disk damages the frame of "lost" (its marker), and the process restarts.
    let segment = dir
        .path()
        .join("spool")
        .join(format!("{:020}.seg", entries[1].position.segment));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.write_at(&[0xff; 4], entries[1].position.offset)
        .unwrap();
    drop(file);

    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let spool = pipeline_common::open_spool(dir.path(), &ring, &metrics);
    let check = Ledger::default();
    let summary = ledger::scan(&spool, &check, 0, |_, _| {}, |_, _| {}).unwrap();
    assert_eq!(summary.orphans, 1, "{summary:?}");
    assert_eq!(summary.pending, 2, "{summary:?}");
    // The heads as the daemon's scan restores them from the seal.
    let mut heads = Chains::new();
    heads.observe(&entries[2].record);
    let sink = Arc::new(RecordingSink::default());
    let pipeline = pipeline_common::start_sharing(
        &spool,
        ring,
        &metrics,
        sink.clone(),
        quick_retries(),
        dir.path(),
        Arc::new(std::sync::Mutex::new(heads)),
        Arc::new(Ledger::default()),
        None,
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
