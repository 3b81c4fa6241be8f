//! Model check: random appends, syncs, crashes at arbitrary bytes and reopens against the
//! in-memory filesystem, compared with the simplest possible model — a list of acknowledged
//! records.
//!
//! - `always` mode: after any crash, the spool holds exactly the acknowledged records, in order.
//! - `never` mode (acknowledged before fdatasync): after a crash the spool holds a *prefix* of
//!   the acknowledged records that includes everything acknowledged by a synced append — never
//!   a torn record, never a gap, never a record out of order.
//! - Compaction removes whole segments below the active one; the model forgets the records in
//!   them, and no crash may bring one back or lose a record of a later segment. One run uses
//!   preallocation, so segments prepared in the background take part too.

mod spool_common;

use std::sync::Arc;

use proptest::prelude::*;
use spool_common::*;
use spoolgate::spool::fs::{FileSystem, MemFs};
use spoolgate::spool::{Durability, Position, RecordKind};

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
    /// Compact every segment below the active one.
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..6).prop_map(Op::Append),
        1 => Just(Op::AppendSynced),
        2 => any::<u64>().prop_map(Op::Crash),
        1 => Just(Op::Reopen),
        1 => Just(Op::Compact),
    ]
}

fn numbers(acked: &[(u64, Position)]) -> Vec<u64> {
    acked.iter().map(|a| a.0).collect()
}

fn run(ops: Vec<Op>, durability: Durability, preallocate: bool) -> Result<(), TestCaseError> {
    let mem = Arc::new(MemFs::new());
    let fs: Arc<dyn FileSystem> = Arc::new(mem.clone());
    let mut opts = options(std::path::Path::new("/spool"));
    opts.durability = durability;
    opts.segment_bytes_max = 1024;
    opts.record_bytes_max = 256;
    opts.preallocate = preallocate;
    let (mut spool, _) = open_fs(&opts, fs.clone());
    let mut acked: Vec<(u64, Position)> = Vec::new();
    let mut durable_prefix = 0usize;
    let mut next = 0u64;
    for op in ops {
        match op {
            Op::Append(n) => {
                let batch: Vec<_> = (next..next + n as u64)
                    .map(|i| (RecordKind::ENVELOPE, payload(i)))
                    .collect();
                let positions = spool.append_blocking(batch, false).expect("append");
                acked.extend((next..next + n as u64).zip(positions));
                next += n as u64;
                if durability == Durability::Always {
                    durable_prefix = acked.len();
                }
            }
            Op::AppendSynced => {
                let positions = spool
                    .append_blocking(vec![(RecordKind::ENVELOPE, payload(next))], true)
                    .expect("append");
                acked.push((next, positions[0]));
                next += 1;
                durable_prefix = acked.len();
            }
            Op::Crash(seed) => {
                // The crash comes while the spool is open: dropping it first would run the
                // writer's final fdatasync, and nothing unsynced would be left to tear.
                let mut rng = fastrand::Rng::with_seed(seed);
                mem.crash(&mut |n| rng.u64(..n.max(1)));
                drop(spool);
                let (s, report) = open_fs(&opts, fs.clone());
                spool = s;
                // No crash makes a segment look removed: a rotation frame names a segment
                // only once its creation is durable.
                prop_assert!(
                    report.missing_segments.is_empty(),
                    "segments reported missing after a crash: {:?}",
                    report.missing_segments
                );
                // A crash tears only what was being written: never damage to report, even
                // where a clean close before it left a marker (row 14).
                prop_assert!(
                    report.damaged.is_empty(),
                    "damage reported after a crash: {:?}",
                    report.damaged
                );
                let got = read_all(&spool);
                prop_assert!(
                    got.len() >= durable_prefix,
                    "lost synced records: {got:?} vs {acked:?}"
                );
                prop_assert!(
                    got.len() <= acked.len(),
                    "records nobody appended: {got:?} vs {acked:?}"
                );
                prop_assert_eq!(
                    &got[..],
                    &numbers(&acked)[..got.len()],
                    "not a prefix of the acknowledged records"
                );
                // What survived is now the truth; later appends continue from it.
                acked.truncate(got.len());
                durable_prefix = acked.len();
            }
            Op::Reopen => {
                spool.close().expect("close");
                drop(spool);
                let (s, report) = open_fs(&opts, fs.clone());
                spool = s;
                prop_assert!(report.missing_segments.is_empty());
                // The clean close's marker matches where the data ends: nothing is damage.
                prop_assert!(report.damaged.is_empty(), "{:?}", report.damaged);
                prop_assert_eq!(report.torn_tail_bytes, 0);
                prop_assert_eq!(read_all(&spool), numbers(&acked));
                durable_prefix = acked.len();
            }
            Op::Compact => {
                let below = spool.durable_end().segment;
                spool.remove_segments_below(below).expect("compact");
                let gone = acked.iter().take_while(|a| a.1.segment < below).count();
                acked.drain(..gone);
                durable_prefix = durable_prefix.saturating_sub(gone);
                prop_assert_eq!(read_all(&spool), numbers(&acked));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn with_always_every_acknowledged_record_survives_every_crash(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Durability::Always, false)?;
    }

    #[test]
    fn with_always_and_preallocated_segments_every_acknowledged_record_survives_every_crash(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Durability::Always, true)?;
    }

    #[test]
    fn with_never_a_crash_leaves_a_clean_prefix_including_every_synced_record(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Durability::Never, false)?;
    }
}
