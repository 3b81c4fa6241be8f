//! Helpers shared by the spool tests: small spools, appending numbered payloads, reading back.
#![allow(dead_code)]

pub mod recording;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use spoolgate::metrics::Metrics;
use spoolgate::spool::fs::FileSystem;
use spoolgate::spool::{Durability, Position, RecordKind, RecoveryReport, Spool, SpoolOptions};

pub fn options(dir: &Path) -> SpoolOptions {
    SpoolOptions {
        dir: dir.to_path_buf(),
        segment_bytes_max: 4096,
        record_bytes_max: 1024,
        durability: Durability::Always,
        commit_batch_records_max: 64,
        commit_batch_bytes_max: 4096,
        queue_depth_max: 64,
        preallocate: false,
        preallocate_zeros: false,
        zero_ahead_bytes: 1024,
        cached_behind_bytes: spoolgate::spool::CACHED_BEHIND_BYTES_DEFAULT,
        cached_unread_bytes_max: spoolgate::spool::CACHED_UNREAD_BYTES_MAX_DEFAULT,
    }
}

/// Opens the spool on the real filesystem. Like `open_fs`, it checks that recovery handed
/// its visitor exactly the records a reader then returns.
pub fn open(opts: &SpoolOptions) -> (Spool, RecoveryReport, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (s, r) = open_checked(opts, Arc::new(spoolgate::spool::fs::StdFs), metrics.clone());
    (s, r, metrics)
}

pub fn open_fs(opts: &SpoolOptions, fs: Arc<dyn FileSystem>) -> (Spool, RecoveryReport) {
    open_checked(opts, fs, Arc::new(Metrics::new()))
}

/// Held shared while a test of this process forks a child, and exclusively while a spool
/// opens. A spool's lock is an flock, which a child forked while the lock was held shares
/// through its copy of the descriptor until it execs: a spool reopened right after its close,
/// while a test running in parallel forked, read as locked by another process. `spawn`
/// returns once the child has exec'd, so an open that holds this exclusively never meets such
/// a copy.
static FORKING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Spawns `command` (see [`FORKING`]).
pub fn spawn(command: &mut std::process::Command) -> std::process::Child {
    let _forking = FORKING.read().unwrap_or_else(|p| p.into_inner());
    command.spawn().expect("spawn")
}

/// Runs `command` to its end, as `Command::output` does (no stdin, stdout and stderr
/// captured), spawned with [`spawn`].
pub fn output(command: &mut std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let child = spawn(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    child.wait_with_output().expect("wait for the child")
}

/// A record as a test compares it: position, kind, payload, next position.
pub type SeenRecord = (Position, u8, Vec<u8>, Position);

/// Every record a reader returns from the first position, in order.
pub fn read_records(spool: &Spool) -> Vec<SeenRecord> {
    let mut r = spool.reader(spool.first_position());
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().expect("read") {
        out.push((rec.position, rec.kind.0, rec.payload.to_vec(), rec.next));
    }
    out
}

/// Opens with `Spool::open_visiting` and asserts that the records recovery visited are the
/// records a reader returns afterwards (the daemon's start-up scan relies on it). Every test
/// that opens a spool through these helpers, after crashes, torn tails and corruption of every
/// kind, checks it.
pub fn open_checked(
    opts: &SpoolOptions,
    fs: Arc<dyn FileSystem>,
    metrics: Arc<Metrics>,
) -> (Spool, RecoveryReport) {
    // No child is being forked while the spool opens (see [`FORKING`]).
    let _no_fork = FORKING.write().unwrap_or_else(|p| p.into_inner());
    let mut visited: Vec<SeenRecord> = Vec::new();
    let (spool, report) = Spool::open_visiting(opts.clone(), fs, metrics, None, &mut |r| {
        visited.push((r.position, r.kind.0, r.payload.to_vec(), r.next))
    })
    .expect("open spool");
    assert_eq!(
        visited,
        read_records(&spool),
        "recovery visited other records than a reader returns"
    );
    (spool, report)
}

/// A payload that names its number and has a length that varies with it.
pub fn payload(n: u64) -> Bytes {
    let mut p = format!("record-{n:06}-").into_bytes();
    p.extend(std::iter::repeat_n(
        b'a' + (n % 26) as u8,
        (n % 97) as usize,
    ));
    Bytes::from(p)
}

pub fn number_of(payload: &[u8]) -> u64 {
    std::str::from_utf8(&payload[7..13])
        .unwrap()
        .parse()
        .unwrap()
}

pub fn append(spool: &Spool, n: u64) -> Position {
    spool
        .append_blocking(vec![(RecordKind::ENVELOPE, payload(n))], false)
        .expect("append")[0]
}

/// Every record's number, in log order.
pub fn read_all(spool: &Spool) -> Vec<u64> {
    let mut r = spool.reader(spool.first_position());
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().expect("read") {
        out.push(number_of(&rec.payload));
    }
    out
}
