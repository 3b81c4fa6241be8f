//! A real process crash: a child process appends from several threads and reports each
//! acknowledgement on stdout; the parent kills it with SIGKILL mid-stream, reopens the spool,
//! and finds every acknowledged record.
//!
//! The child is this same test binary, re-executed with `SPOOL_CRASH_CHILD=<dir>` so it runs
//! only `child_appends_until_killed` in child mode.

mod spool_common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use spool_common::*;
use spoolgate::spool::RecordKind;

const CHILD_ENV: &str = "SPOOL_CRASH_CHILD";
const ACKS_BEFORE_KILL: usize = 3000;

/// Not a test: the child's entry point, run only by the test below (`--ignored --exact`).
#[test]
#[ignore = "the crash test's child process; run by it"]
fn child_appends_until_killed() {
    let dir = std::env::var(CHILD_ENV).expect("run as the crash test's child");
    let mut opts = options(std::path::Path::new(&dir));
    opts.segment_bytes_max = 64 * 1024;
    opts.preallocate = true;
    let (spool, _, _) = open(&opts);
    let out = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let spool = &spool;
            let out = &out;
            scope.spawn(move || {
                for i in 0.. {
                    let n = t * 1_000_000 + i;
                    let batch = vec![
                        (RecordKind::ENVELOPE, payload(n % 1_000_000)),
                        (RecordKind::ENVELOPE, bytes::Bytes::from(format!("tag {n}"))),
                    ];
                    let pos = spool.append_blocking(batch, false).expect("append");
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ack {} {} {n}", pos[0].segment, pos[0].offset).unwrap();
                    o.flush().unwrap();
                }
            });
        }
    });
}

#[test]
fn every_record_acknowledged_before_a_kill_9_is_there_after_reopen() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = spool_common::spawn(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_appends_until_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let stdout = child.stdout.take().unwrap();
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let Some(rest) = line.strip_prefix("ack ") else {
            continue;
        };
        let parts: Vec<&str> = rest.split(' ').collect();
        acked.push(parts[2].parse::<u64>().unwrap());
        if acked.len() == ACKS_BEFORE_KILL {
            child.kill().unwrap();
            break;
        }
    }
    child.wait().unwrap();
    assert_eq!(
        acked.len(),
        ACKS_BEFORE_KILL,
        "the child stopped acknowledging early"
    );

    let mut opts = options(dir.path());
    opts.segment_bytes_max = 64 * 1024;
    opts.preallocate = true;
    let (spool, report, _) = open(&opts);
    let mut found = std::collections::HashSet::new();
    let mut r = spool.reader(spool.first_position());
    while let Some(rec) = r.next_record().unwrap() {
        if let Some(tag) = rec.payload.strip_prefix(b"tag ") {
            let n: u64 = std::str::from_utf8(tag).unwrap().parse().unwrap();
            assert!(found.insert(n), "record {n} appears twice");
        }
    }
    for n in &acked {
        assert!(
            found.contains(n),
            "acknowledged record {n} is missing after kill -9"
        );
    }
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    // A rotation frame names a segment only once it exists, so no kill makes one look removed.
    assert!(
        report.missing_segments.is_empty(),
        "{:?}",
        report.missing_segments
    );
}
