//! Spool append throughput with durability `always`, next to a raw baseline run in the same
//! process on the same filesystem.
//!
//! For every record size (256 B, 1 KiB, 4 KiB) and appender count (1, 16, 64):
//!
//! * **spool**: `appenders` threads each append one envelope-sized record at a time through the
//!   group-committing writer with the daemon's default spool settings (64 MiB preallocated
//!   segments, rotation included), and time every append from call to acknowledgement.
//! * **raw**: one thread writes the same framed bytes in the same group sizes the spool's writer
//!   formed (mean records per commit, read from its metrics) with `pwrite` + `fdatasync` into a
//!   pre-zeroed file, which is the least any durable log on this disk can pay.
//!
//! The two alternate `SPOOLGATE_BENCH_ROUNDS` times (default 3) so a slow phase of the shared
//! disk hits both, and the report gives the median of each figure and of the ratio. Output is a
//! Markdown table on stdout (and `--json FILE` writes the raw rounds).
//!
//! Run: `cargo bench --bench spool_append` (or `scripts/bench-spool.sh`). Set
//! `SPOOLGATE_BENCH_DIR` to measure another filesystem; the default is `target/bench-scratch`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use spoolgate::metrics::Metrics;
use spoolgate::spool::format::frame_len;
use spoolgate::spool::{Durability, RecordKind, Spool, SpoolOptions};

/// The daemon's allocator (see Cargo.toml), so the figures match what `spoolgate serve` does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORD_SIZES_BYTES: [usize; 3] = [256, 1024, 4096];
const APPENDERS: [usize; 3] = [1, 16, 64];
/// How long each spool run appends. Long enough for a 64 MiB rotation at the fast sizes.
const RUN_DURATION: Duration = Duration::from_millis(2500);
/// Bound on the raw baseline's file: it wraps around inside this pre-zeroed region.
const RAW_FILE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, Clone, Default)]
struct Round {
    spool_records_per_s: f64,
    spool_mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    records_per_commit: f64,
    raw_mb_per_s: f64,
}

fn scratch_dir() -> PathBuf {
    let base = std::env::var_os("SPOOLGATE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-scratch"));
    std::fs::create_dir_all(&base).expect("create bench dir");
    base
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Appends from `appenders` threads for `RUN_DURATION`; returns figures and the mean group size.
fn spool_run(base: &Path, size: usize, appenders: usize) -> Round {
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let opts = SpoolOptions {
        dir: dir.path().to_path_buf(),
        segment_bytes_max: 64 * 1024 * 1024,
        record_bytes_max: 1024 * 1024 + 64 * 1024,
        durability: Durability::Always,
        commit_batch_records_max: 4096,
        commit_batch_bytes_max: 8 * 1024 * 1024,
        queue_depth_max: 8192,
        preallocate: true,
        preallocate_zeros: false,
        zero_ahead_bytes: spoolgate::spool::ZERO_AHEAD_BYTES_DEFAULT,
        cached_behind_bytes: spoolgate::spool::CACHED_BEHIND_BYTES_DEFAULT,
        cached_unread_bytes_max: spoolgate::spool::CACHED_UNREAD_BYTES_MAX_DEFAULT,
    };
    let metrics = Arc::new(Metrics::new());
    let (spool, _) = Spool::open(opts, metrics.clone(), None).expect("open spool");
    let spool = Arc::new(spool);
    let payload = Bytes::from(vec![b'x'; size]);
    // Appenders are tokio tasks on a multi-threaded runtime, as the daemon's request handlers
    // are; 64 OS threads on a 2-core machine would measure the scheduler instead.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let start = Instant::now();
    let deadline = start + RUN_DURATION;
    let mut latencies: Vec<Duration> = runtime.block_on(async {
        let tasks: Vec<_> = (0..appenders)
            .map(|_| {
                let spool = spool.clone();
                let payload = payload.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(1 << 16);
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        spool
                            .append(vec![(RecordKind::ENVELOPE, payload.clone())])
                            .await
                            .expect("append");
                        latencies.push(t.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("appender task"));
        }
        all
    });
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let records = latencies.len() as f64;
    let commits = metrics.spool_commit_batch_records.get_sample_count() as f64;
    let committed = metrics.spool_commit_batch_records.get_sample_sum();
    drop(spool);
    Round {
        spool_records_per_s: records / elapsed,
        spool_mb_per_s: records * frame_len(size) as f64 / elapsed / 1e6,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        records_per_commit: if commits > 0.0 {
            committed / commits
        } else {
            1.0
        },
        raw_mb_per_s: 0.0,
    }
}

/// Raw `pwrite` + `fdatasync` of `group_bytes` at a time into a pre-zeroed file, for as many
/// bytes as the spool wrote (bounded by the run duration).
fn raw_run(base: &Path, group_bytes: usize, total_bytes: u64) -> f64 {
    let path = base.join("raw-baseline");
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .expect("open raw file");
    if file.metadata().expect("stat").len() < RAW_FILE_BYTES {
        let zeros = vec![0u8; 8 * 1024 * 1024];
        let mut at = 0;
        while at < RAW_FILE_BYTES {
            file.write_all_at(&zeros, at).expect("zero raw file");
            at += zeros.len() as u64;
        }
        file.sync_all().expect("sync raw file");
    }
    let group = vec![b'r'; group_bytes.max(1)];
    let mut at = 0u64;
    let mut written = 0u64;
    let start = Instant::now();
    while written < total_bytes && start.elapsed() < RUN_DURATION {
        if at + group.len() as u64 > RAW_FILE_BYTES {
            at = 0;
        }
        file.write_all_at(&group, at).expect("raw write");
        file.sync_data().expect("raw fdatasync");
        at += group.len() as u64;
        written += group.len() as u64;
    }
    written as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    // `cargo bench` passes `--bench`. `cargo test --all-targets` runs this binary without it:
    // it then only checks that the bench still builds, because a measurement belongs here and
    // not in the test suite.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("spool_append: run with `cargo bench --bench spool_append` to measure");
        return;
    }
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let rounds: usize = std::env::var("SPOOLGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let base = scratch_dir();
    let mut all = Vec::new();
    println!("| record | appenders | spool rec/s | spool MB/s | p50 µs | p99 µs | rec/commit | raw MB/s | spool/raw |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for size in RECORD_SIZES_BYTES {
        for appenders in APPENDERS {
            let mut results = Vec::new();
            for _ in 0..rounds {
                let mut r = spool_run(&base, size, appenders);
                let group_bytes = (r.records_per_commit * frame_len(size) as f64).round() as usize;
                let spool_bytes = (r.spool_mb_per_s * 1e6 * RUN_DURATION.as_secs_f64()) as u64;
                r.raw_mb_per_s = raw_run(&base, group_bytes, spool_bytes.max(1));
                results.push(r);
            }
            let ratio = median(
                results
                    .iter()
                    .map(|r| r.spool_mb_per_s / r.raw_mb_per_s)
                    .collect(),
            );
            let m = |f: fn(&Round) -> f64| median(results.iter().map(f).collect());
            println!(
                "| {size} B | {appenders} | {:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} |",
                m(|r| r.spool_records_per_s),
                m(|r| r.spool_mb_per_s),
                m(|r| r.p50_us),
                m(|r| r.p99_us),
                m(|r| r.records_per_commit),
                m(|r| r.raw_mb_per_s),
                ratio
            );
            all.push(serde_json::json!({
                "record_bytes": size,
                "appenders": appenders,
                "ratio_median": ratio,
                "rounds": results.iter().map(|r| serde_json::json!({
                    "spool_records_per_s": r.spool_records_per_s,
                    "spool_mb_per_s": r.spool_mb_per_s,
                    "p50_us": r.p50_us,
                    "p99_us": r.p99_us,
                    "records_per_commit": r.records_per_commit,
                    "raw_mb_per_s": r.raw_mb_per_s,
                })).collect::<Vec<_>>(),
            }));
        }
    }
    let _ = std::fs::remove_file(base.join("raw-baseline"));
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_vec_pretty(&all).expect("json")).expect("write json");
    }
}
