//! The `chain-heads` checkpoint against seals in flight, in process: compaction writes the
//! checkpoint before it deletes segments (the seals in them go too), and start-up continues
//! every stream from the checkpoint. A head in the checkpoint whose seal never became durable
//! would make a restart skip sequence numbers, so the checkpoint may only name durable seals.

mod pipeline_common;

use std::io;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};

use pipeline_common::{append, wait_until, RecordingSink};
use spoolgate::chain::Chains;
use spoolgate::compaction::Compactor;
use spoolgate::config::{Config, ForwardConfig};
use spoolgate::forward::ledger::Ledger;
use spoolgate::ingest::IngestState;
use spoolgate::metrics::Metrics;
use spoolgate::ring::Ring;
use spoolgate::spool::format::FRAME_MARKER;
use spoolgate::spool::fs::{FileSystem, SegmentFile, StdFs};
use spoolgate::spool::RecordKind;

/// Once armed, holds the first fdatasync that follows a write starting with a SEALED frame
/// until released: the seal is then written but not durable, as it is for a moment in every
/// batch, and as it stays if the process is killed then.
#[derive(Default)]
struct Hold {
    state: Mutex<HoldState>,
    changed: Condvar,
}

#[derive(Default)]
struct HoldState {
    armed: bool,
    seal_written: bool,
    holding: bool,
    released: bool,
}

impl Hold {
    fn arm(&self) {
        self.state.lock().unwrap().armed = true;
    }
    fn holding(&self) -> bool {
        self.state.lock().unwrap().holding
    }
    fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.changed.notify_all();
    }
}

struct ReleaseOnDrop(Arc<Hold>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

struct HoldFs {
    hold: Arc<Hold>,
}

struct HoldFile {
    inner: Arc<dyn SegmentFile>,
    hold: Arc<Hold>,
}

impl SegmentFile for HoldFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let starts_a_seal = buf.len() > 8 && buf[..4] == FRAME_MARKER && buf[8] == 2;
        let mut state = self.hold.state.lock().unwrap();
        if state.armed && !state.released && starts_a_seal {
            state.seal_written = true;
        }
        drop(state);
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.hold.state.lock().unwrap();
        if state.seal_written && !state.released {
            state.holding = true;
            while !state.released {
                state = self.hold.changed.wait(state).unwrap();
            }
        }
        drop(state);
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

impl FileSystem for HoldFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(HoldFile {
            inner: StdFs.open(path)?,
            hold: self.hold.clone(),
        }))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(HoldFile {
            inner: StdFs.create(path)?,
            hold: self.hold.clone(),
        }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFs.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn Send + Sync>> {
        StdFs.lock(path)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_taken_while_a_seal_is_not_yet_durable_names_the_head_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let ring = Arc::new(Ring::new(1024, 1 << 20, metrics.clone()));
    let hold = Arc::new(Hold::default());
    let spool = pipeline_common::open_spool_fs(
        dir.path(),
        &ring,
        &metrics,
        Arc::new(HoldFs { hold: hold.clone() }),
    );
    let sink = Arc::new(RecordingSink::default());
    let chains = Arc::new(Mutex::new(Chains::new()));
    let ledger = Arc::new(Ledger::default());
    let pipeline = pipeline_common::start_sharing(
        &spool,
        ring.clone(),
        &metrics,
        sink.clone(),
        ForwardConfig {
            linger_ms: 1,
            ..ForwardConfig::default()
        },
        dir.path(),
        chains.clone(),
        ledger.clone(),
        None,
    );

    // Segment 1 (1 MiB) filled with records of one stream, every one delivered and
    // tombstoned: compaction may delete it once the log has moved on to segment 2.
    let text = "Forty thousand bytes of text. ".repeat(1_400);
    let mut durable = 0u64;
    while spool.segments().len() < 2 {
        append(&spool, "t", format!("r{durable}"), text.clone()).await;
        durable += 1;
    }
    wait_until("every record delivered and tombstoned", || {
        sink.delivered.lock().unwrap().len() as u64 == durable && ledger.pending_stats().0 == 0
    })
    .await;

    // One more record of the stream: its seal is written, and held before its fdatasync.
    // Released however the test ends, or a failed assertion would leave the spool's writer
    // thread waiting and the test hanging instead of failing.
    let _release = ReleaseOnDrop(hold.clone());
    hold.arm();
    append(&spool, "t", "last".into(), "The last one.".into()).await;
    wait_until("the seal's fdatasync held", || hold.holding()).await;

    let heads_path = dir.path().join("chain-heads");
    let compactor = Compactor {
        spool: spool.clone(),
        ledger: ledger.clone(),
        chains: chains.clone(),
        ring: ring.clone(),
        heads_path: heads_path.clone(),
        dedup_dir: dir.path().to_path_buf(),
        dedup_checkpoints: Arc::default(),
        ingest: Arc::new(IngestState::new(Config::default(), metrics.clone())),
        dedup_checkpointed_below: AtomicU64::new(1),
        metrics: metrics.clone(),
        wake: Arc::default(),
        reserve: Arc::new(spoolgate::compaction::reserve::Reserve::new(
            dir.path(),
            0,
            0,
            0,
            metrics.spool_reserve_bytes.clone(),
            metrics.spool_reserve_spent_total.clone(),
        )),
    };
    let freed = compactor.pass(false).await.unwrap();
    assert!(freed > 0, "segment 1 was deleted, after the checkpoint");
    let checkpoint = Chains::load(&heads_path).unwrap();
    assert_eq!(
        checkpoint.head("t").map(|h| h.seq),
        Some(durable),
        "the checkpoint names the last durable seal, not the one in flight"
    );

    hold.release();
    wait_until("the last record delivered", || {
        sink.delivered.lock().unwrap().len() as u64 == durable + 1
    })
    .await;
    let last = sink.delivered.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.envelope.id.as_str(), last.seq), ("last", durable + 1));
    // Every seal the spool still holds for the stream continues from the checkpoint.
    let mut reader = spool.reader(spool.first_position());
    let mut sealed_seqs = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        if r.kind == RecordKind::SEALED {
            let batch = spoolgate::chain::SealedBatch::decode(&r.payload).unwrap();
            sealed_seqs.extend(batch.entries.iter().map(|e| e.record.seq));
        }
    }
    assert!(
        sealed_seqs.contains(&(durable + 1)),
        "the held seal became durable once released: {sealed_seqs:?}"
    );
    pipeline.shutdown().await;
}
