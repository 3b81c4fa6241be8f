//! Model check: random appends, syncs, crashes at arbitrary bytes and reopens against the
//! in-memory filesystem, compared with the simplest possible model — a list of acknowledged
//! records.
//!
//! - `always` mode: after any crash, the spool holds exactly the acknowledged records, in order.
//! - `never` mode (acknowledged before fdatasync): after a crash the spool holds a *prefix* of
//!   the acknowledged records that includes everything acknowledged by a synced append — never
//!   a torn record, never a gap, never a record out of order.

mod spool_common;

use std::sync::Arc;

use proptest::prelude::*;
use spool_common::*;
use spoolgate::spool::fs::{FileSystem, MemFs};
use spoolgate::spool::{Durability, RecordKind};

#[derive(Debug, Clone)]
enum Op {
    /// Append a batch of this many records (all-or-nothing).
    Append(usize),
    /// Append one record with an explicit fdatasync.
    AppendSynced,
    /// Crash (with this seed choosing what survives) and reopen.
    Crash(u64),
    /// Clean close and reopen.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..6).prop_map(Op::Append),
        1 => Just(Op::AppendSynced),
        2 => any::<u64>().prop_map(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

fn run(ops: Vec<Op>, durability: Durability) -> Result<(), TestCaseError> {
    let mem = Arc::new(MemFs::new());
    let fs: Arc<dyn FileSystem> = Arc::new(mem.clone());
    let mut opts = options(std::path::Path::new("/spool"));
    opts.durability = durability;
    opts.segment_bytes_max = 1024;
    opts.record_bytes_max = 256;
    let (mut spool, _) = open_fs(&opts, fs.clone());
    let mut acked: Vec<u64> = Vec::new();
    let mut durable_prefix = 0usize;
    let mut next = 0u64;
    for op in ops {
        match op {
            Op::Append(n) => {
                let batch: Vec<_> = (next..next + n as u64)
                    .map(|i| (RecordKind::ENVELOPE, payload(i)))
                    .collect();
                spool.append_blocking(batch, false).expect("append");
                acked.extend(next..next + n as u64);
                next += n as u64;
                if durability == Durability::Always {
                    durable_prefix = acked.len();
                }
            }
            Op::AppendSynced => {
                spool
                    .append_blocking(vec![(RecordKind::ENVELOPE, payload(next))], true)
                    .expect("append");
                acked.push(next);
                next += 1;
                durable_prefix = acked.len();
            }
            Op::Crash(seed) => {
                drop(spool);
                let mut rng = fastrand::Rng::with_seed(seed);
                mem.crash(&mut |n| rng.u64(..n.max(1)));
                let (s, _) = open_fs(&opts, fs.clone());
                spool = s;
                let got = read_all(&spool);
                prop_assert!(
                    got.len() >= durable_prefix,
                    "lost synced records: {got:?} vs {acked:?}"
                );
                prop_assert_eq!(
                    &got[..],
                    &acked[..got.len()],
                    "not a prefix of the acknowledged records"
                );
                // What survived is now the truth; later appends continue from it.
                acked.truncate(got.len());
                durable_prefix = acked.len();
            }
            Op::Reopen => {
                spool.close().expect("close");
                drop(spool);
                let (s, _) = open_fs(&opts, fs.clone());
                spool = s;
                prop_assert_eq!(read_all(&spool), acked.clone());
                durable_prefix = acked.len();
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn with_always_every_acknowledged_record_survives_every_crash(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Durability::Always)?;
    }

    #[test]
    fn with_never_a_crash_leaves_a_clean_prefix_including_every_synced_record(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Durability::Never)?;
    }
}
