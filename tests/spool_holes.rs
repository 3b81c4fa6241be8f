//! Recovery skips what the filesystem reports as holes (`SEEK_DATA`/`SEEK_HOLE`) instead of
//! reading preallocated zeros. These tests check that skipping changes nothing but the time:
//!
//! - A model check: the same segment bytes, recovered once on a [`MemFs`] that reports every
//!   all-zero 4 KiB block as a hole (more holes than any real filesystem, inside frames too)
//!   and once on one that reports none, give the same visited records, the same report, the
//!   same spool and the same files afterwards. The segments hold payloads with long runs of
//!   zeros (also in the last frame, whose tail then lies in a hole), zeroed blocks, flipped
//!   bytes, trailing garbage, torn tails and odd lengths.
//! - On the real filesystem, a segment preallocated with `fallocate` (holes to ext4, XFS and
//!   tmpfs) recovers every record in it, and the next records go after them.
//! - A filesystem that wrongly reports the end of the data as a hole loses nothing: recovery
//!   reads one longest frame past the last data rather than trusting the report, and that is
//!   where the writer would append next.

mod spool_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use spool_common::*;
use spoolgate::metrics::Metrics;
use spoolgate::spool::fs::{FileSystem, MemFs, SegmentFile, MEM_HOLE_BLOCK_BYTES};
use spoolgate::spool::{Durability, RecordKind, Spool, SpoolOptions};

const DIR: &str = "/spool";

fn small_options() -> SpoolOptions {
    let mut opts = options(Path::new(DIR));
    opts.segment_bytes_max = 64 << 10;
    opts.record_bytes_max = 16 << 10;
    opts.commit_batch_bytes_max = 64 << 10;
    opts.preallocate = true;
    opts
}

/// A payload: numbered text, optionally followed by a run of zeros and more text.
#[derive(Debug, Clone)]
struct Shape {
    zeros: usize,
    tail: usize,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        2 => (0usize..200).prop_map(|tail| Shape { zeros: 0, tail }),
        1 => (4096usize..14_000, 0usize..600).prop_map(|(zeros, tail)| Shape { zeros, tail }),
        // A payload that ends in zeros: in the last frame its end lies in a hole.
        1 => (4096usize..16_000).prop_map(|zeros| Shape { zeros, tail: 0 }),
    ]
}

fn make_payload(n: u64, s: &Shape) -> Bytes {
    let mut p = format!("record-{n:06}-").into_bytes();
    p.resize(p.len() + s.zeros, 0);
    p.extend(std::iter::repeat_n(b'a' + (n % 26) as u8, s.tail));
    p.truncate(16 << 10);
    Bytes::from(p)
}

#[derive(Debug, Clone)]
enum Damage {
    /// Zero the 4 KiB block at this index of a segment.
    ZeroBlock(usize, u64),
    /// XOR a byte at this offset.
    Flip(usize, u64, u8),
    /// Write these bytes at this offset.
    Garbage(usize, u64, Vec<u8>),
    /// Set a segment's length to this fraction (per mille) of its length, or past its end.
    Resize(usize, u64),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0u64..16).prop_map(|(s, b)| Damage::ZeroBlock(s, b)),
        (any::<usize>(), 0u64..(64 << 10), 1u8..=255).prop_map(|(s, o, x)| Damage::Flip(s, o, x)),
        (
            any::<usize>(),
            0u64..(64 << 10),
            prop::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(s, o, g)| Damage::Garbage(s, o, g)),
        (any::<usize>(), 0u64..1300).prop_map(|(s, f)| Damage::Resize(s, f)),
    ]
}

fn damage_files(files: &mut [(PathBuf, Vec<u8>)], damage: &[Damage]) {
    let segs: Vec<usize> = (0..files.len())
        .filter(|&i| files[i].0.extension().is_some_and(|e| e == "seg"))
        .collect();
    if segs.is_empty() {
        return;
    }
    let pick = |s: usize| segs[s % segs.len()];
    for d in damage {
        match d {
            Damage::ZeroBlock(s, b) => {
                let f = &mut files[pick(*s)].1;
                let start = ((b * MEM_HOLE_BLOCK_BYTES) as usize).min(f.len());
                let end = (start + MEM_HOLE_BLOCK_BYTES as usize).min(f.len());
                f[start..end].fill(0);
            }
            Damage::Flip(s, o, x) => {
                let f = &mut files[pick(*s)].1;
                if let Some(b) = f.get_mut(*o as usize) {
                    *b ^= x;
                }
            }
            Damage::Garbage(s, o, g) => {
                let f = &mut files[pick(*s)].1;
                let start = (*o as usize).min(f.len());
                let end = (start + g.len()).min(f.len());
                f[start..end].copy_from_slice(&g[..end - start]);
            }
            Damage::Resize(s, per_mille) => {
                let f = &mut files[pick(*s)].1;
                let len = f.len() as u64 * per_mille / 1000;
                f.resize(len as usize, 0);
            }
        }
    }
}

/// What recovery produced, everything that could differ between the two filesystems.
#[derive(Debug, PartialEq)]
struct Outcome {
    visited: Vec<SeenRecord>,
    read: Vec<SeenRecord>,
    segments: usize,
    records: u64,
    torn_tail_bytes: u64,
    damaged: Vec<(u64, u64, u64, u64)>,
    durable_end: spoolgate::spool::Position,
    files: Vec<(PathBuf, Vec<u8>)>,
}

fn files_of(mem: &Arc<MemFs>) -> Vec<(PathBuf, Vec<u8>)> {
    let fs: &dyn FileSystem = mem;
    let mut names = fs.list(Path::new(DIR)).expect("list");
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let p = Path::new(DIR).join(n);
            let b = mem.bytes(&p).expect("listed file");
            (p, b)
        })
        .collect()
}

fn recover_on(mem: MemFs, files: &[(PathBuf, Vec<u8>)]) -> Outcome {
    let mem = Arc::new(mem);
    for (path, bytes) in files {
        mem.set_bytes(path, bytes.clone());
    }
    let mut visited = Vec::new();
    let (spool, report) = Spool::open_visiting(
        small_options(),
        Arc::new(mem.clone()),
        Arc::new(Metrics::new()),
        None,
        &mut |r| visited.push((r.position, r.kind.0, r.payload.to_vec(), r.next)),
    )
    .expect("open spool");
    let read = read_records(&spool);
    let durable_end = spool.durable_end();
    spool.close().expect("close");
    Outcome {
        visited,
        read,
        segments: report.segments,
        records: report.records,
        torn_tail_bytes: report.torn_tail_bytes,
        damaged: report
            .damaged
            .iter()
            .map(|d| (d.segment, d.offset, d.len_bytes, d.records_lost))
            .collect(),
        durable_end,
        files: files_of(&mem)
            .into_iter()
            .map(|(path, mut bytes)| {
                // A segment recovery created carries its creation time (and so a header CRC)
                // that differs from run to run; everything else in it must match. It may have
                // the name of a file it replaced (row 7 frees the newest id), so it is told by
                // a header that is not the input's.
                let created = !files
                    .iter()
                    .any(|(p, b)| *p == path && b.get(..64) == bytes.get(..64));
                if created && bytes.len() >= 64 {
                    bytes[24..32].fill(0);
                    bytes[60..64].fill(0);
                }
                (path, bytes)
            })
            .collect(),
    }
}

/// Writes `shapes` as records in batches of `batch`, optionally crashing at the end, and
/// returns the files the spool left.
fn build(shapes: &[Shape], batch: usize, crash: Option<u64>) -> Vec<(PathBuf, Vec<u8>)> {
    let mem = Arc::new(MemFs::without_holes());
    let mut opts = small_options();
    if crash.is_some() {
        // Unsynced appends, so that the crash can tear them.
        opts.durability = Durability::Never;
    }
    let (spool, _) = open_fs(&opts, Arc::new(mem.clone()));
    let payloads: Vec<Bytes> = shapes
        .iter()
        .enumerate()
        .map(|(n, s)| make_payload(n as u64, s))
        .collect();
    for chunk in payloads.chunks(batch) {
        let records = chunk
            .iter()
            .map(|p| (RecordKind::ENVELOPE, p.clone()))
            .collect();
        spool.append_blocking(records, false).expect("append");
    }
    drop(spool);
    if let Some(seed) = crash {
        let mut rng = fastrand::Rng::with_seed(seed);
        mem.crash(&mut |n| rng.u64(..n.max(1)));
    }
    files_of(&mem)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn skipping_holes_recovers_exactly_what_reading_every_byte_does(
        shapes in prop::collection::vec(shape(), 0..24),
        batch in 1usize..5,
        crash in prop::option::of(any::<u64>()),
        damage in prop::collection::vec(damage(), 0..4),
    ) {
        let mut files = build(&shapes, batch, crash);
        damage_files(&mut files, &damage);
        let with_holes = recover_on(MemFs::new(), &files);
        let without_holes = recover_on(MemFs::without_holes(), &files);
        prop_assert_eq!(with_holes, without_holes);
    }
}

#[test]
fn a_record_ending_in_a_zero_run_is_recovered_whole_when_its_tail_is_a_hole() {
    let shapes = vec![
        Shape { zeros: 0, tail: 10 },
        Shape {
            zeros: 15_000,
            tail: 0,
        },
    ];
    let files = build(&shapes, 1, None);
    let outcome = recover_on(MemFs::new(), &files);
    assert_eq!(outcome.records, 2);
    assert!(outcome.damaged.is_empty(), "{:?}", outcome.damaged);
    assert_eq!(
        outcome.read[1].2,
        make_payload(1, &shapes[1]).to_vec(),
        "the zero run, read from a hole, is part of the payload"
    );
}

#[test]
fn a_fallocated_segment_on_the_real_filesystem_recovers_every_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options(dir.path());
    opts.segment_bytes_max = 8 << 20;
    opts.preallocate = true;
    opts.preallocate_zeros = false;
    let (spool, _, _) = open(&opts);
    let positions: Vec<_> = (0..50).map(|n| append(&spool, n)).collect();
    let end = spool.durable_end();
    spool.close().expect("close");

    let seg = dir.path().join(format!("{:020}.seg", positions[0].segment));
    let file_bytes = std::fs::metadata(&seg).expect("stat").len();
    assert_eq!(
        file_bytes, opts.segment_bytes_max,
        "the segment is preallocated"
    );

    let (spool, report, _) = open(&opts);
    assert_eq!(report.records, 50);
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert_eq!(read_all(&spool), (0..50).collect::<Vec<_>>());
    assert_eq!(spool.durable_end(), end);
    let next = append(&spool, 50);
    assert_eq!(
        next, end,
        "the next record goes right after the recovered ones"
    );
    spool.close().expect("close");
    let (spool, report, _) = open(&opts);
    assert_eq!(report.records, 51);
    assert_eq!(read_all(&spool), (0..51).collect::<Vec<_>>());
}

/// A filesystem that wrongly reports the last 4 KiB block holding data, and everything after
/// it, as a hole: what a buggy `SEEK_HOLE` would do to the end of a segment.
struct LyingFs(Arc<MemFs>);

struct LyingFile(Arc<dyn SegmentFile>);

impl LyingFile {
    /// Where the lie starts: the block of the file's last non-zero byte.
    fn hole_from(&self) -> std::io::Result<u64> {
        let len = self.0.len()?;
        let mut bytes = vec![0u8; len as usize];
        let n = self.0.read_at(&mut bytes, 0)?;
        let last = bytes[..n].iter().rposition(|&b| b != 0).unwrap_or(0) as u64;
        Ok(last - last % MEM_HOLE_BLOCK_BYTES)
    }
}

impl SegmentFile for LyingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn seek_data(&self, from: u64) -> std::io::Result<Option<u64>> {
        Ok((from < self.hole_from()?).then_some(from))
    }
    fn seek_hole(&self, from: u64) -> std::io::Result<u64> {
        Ok(self.hole_from()?.max(from))
    }
}

impl FileSystem for LyingFs {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.0.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.0.list(dir)
    }
    fn open(&self, path: &Path) -> std::io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(LyingFile(self.0.open(path)?)))
    }
    fn create(&self, path: &Path) -> std::io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(LyingFile(self.0.create(path)?)))
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.0.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.0.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> std::io::Result<Box<dyn Send + Sync>> {
        self.0.lock(path)
    }
}

#[test]
fn records_a_filesystem_wrongly_reports_as_a_hole_at_the_end_are_still_recovered() {
    let shapes: Vec<Shape> = (0..12)
        .map(|n| Shape {
            zeros: 0,
            tail: 100 * n,
        })
        .collect();
    let files = build(&shapes, 1, None);
    let mem = Arc::new(MemFs::new());
    for (path, bytes) in &files {
        mem.set_bytes(path, bytes.clone());
    }
    let lying = LyingFs(mem.clone());
    let seg = &files[0].0;
    let hole_from = lying.open(seg).expect("open").seek_hole(0).expect("seek");
    let end = files[0].1.iter().rposition(|&b| b != 0).expect("data") as u64;
    assert!(
        hole_from < end,
        "the lie hides data: hole from {hole_from}, data to {end}"
    );

    let (spool, report) = open_fs(&small_options(), Arc::new(lying));
    assert_eq!(report.records, 12);
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    let numbers: Vec<u64> = read_records(&spool)
        .iter()
        .map(|r| number_of(&r.2))
        .collect();
    assert_eq!(numbers, (0..12).collect::<Vec<_>>());
}
