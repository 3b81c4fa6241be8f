//! A real ENOSPC: the data directory on a small tmpfs that another process fills.

mod common;

use common::{envelope, Daemon, Tmpfs, SMALL_SEGMENTS};
use serde_json::json;

fn small_spool_args() -> Vec<&'static str> {
    [
        &SMALL_SEGMENTS[..],
        // Only the real ENOSPC may refuse here, not the free-space watermarks.
        &[
            "--set",
            "spool.disk_free_soft_bytes=0",
            "--set",
            "spool.disk_free_hard_bytes=0",
        ],
    ]
    .concat()
}

/// Posts envelopes `full-0`, `full-1`, … with `text` until the first 429 and returns it, adding
/// the ids answered 202 to `acked`; `None` if 4,096 were all taken. Any other status fails.
fn post_until_refused(d: &Daemon, text: &str, acked: &mut Vec<String>) -> Option<common::Response> {
    for n in 0..4096 {
        let id = format!("full-{n}");
        let r = d.post_json(&json!({"source": "s", "id": id, "text": text}));
        match r.status {
            202 => acked.push(id),
            429 => return Some(r),
            other => panic!("status {other} while the disk fills: {}", r.text()),
        }
    }
    None
}

/// Recovery and the writer log a warning for every damaged range or torn tail they meet.
fn assert_no_segment_damaged(log: &str) {
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && (l.contains("damaged") || l.contains("torn"))),
        "no segment may be damaged:\n{log}"
    );
}

/// A daemon with small segments, the config file `cfg` and the flags `extra`, its data
/// directory on a fresh 8 MiB tmpfs.
fn daemon_on_tmpfs(cfg: &std::path::Path, extra: &[&str]) -> (Tmpfs, std::path::PathBuf, Daemon) {
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    let args = [
        &small_spool_args()[..],
        &["--config", cfg.to_str().unwrap()],
        extra,
    ]
    .concat();
    let d = Daemon::start_in(&data, &args, &[]);
    (fs, data, d)
}

/// An HTTP sink that answers 503 until released and 200 after, so that a test can hold a
/// batch back until the disk is full.
struct HeldSink {
    hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sink: common::TestSink,
}

impl HeldSink {
    /// The sink, and a config file in `dir` that makes it the default sink with a short retry
    /// backoff, so delivery resumes soon after a release or once space returns.
    fn start(dir: &std::path::Path) -> (HeldSink, std::path::PathBuf) {
        let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let held = hold.clone();
        let sink = common::TestSink::start(move |_| {
            match held.load(std::sync::atomic::Ordering::SeqCst) {
                true => (503, "hold".into()),
                false => (200, "ok".into()),
            }
        });
        let cfg = sink.config_file(
            dir,
            "[forward]\nretry_initial_ms = 10\nretry_max_ms = 100\n",
        );
        (HeldSink { hold, sink }, cfg)
    }

    fn release(&self) {
        self.hold.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_full_disk_answers_429_never_500_and_ingest_resumes_when_space_returns() {
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    let mut d = Daemon::start_in(&data, &small_spool_args(), &[]);
    fs.fill("filler");

    let text = "x".repeat(4000);
    let mut acked = Vec::new();
    let refused = post_until_refused(&d, &text, &mut acked)
        .expect("a full disk must eventually refuse with 429");
    assert_eq!(refused.json()["reason"], "enospc", "{}", refused.text());
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        d.get("/readyz").status,
        200,
        "a full disk must not poison the spool"
    );
    // More refusals: counted, but the log keeps the first line of the run only.
    for n in 0..20 {
        let r = d.post_json(&json!({"source": "s", "id": format!("more-{n}"), "text": text}));
        assert_eq!(r.status, 429, "{}", r.text());
    }
    assert!(d.metric("spoolgate_ingest_rejected_total{reason=\"enospc\"}") >= 21.0);
    assert_eq!(
        d.log().matches("append refused: filesystem full").count(),
        1,
        "{}",
        d.log()
    );

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    let r = d.post_json(&json!({"source": "s", "id": "after", "text": text}));
    assert_eq!(r.status, 202, "{}", r.text());
    acked.push("after".into());
    assert!(d
        .log()
        .contains("appends succeed again after the filesystem was full"));

    // Everything acknowledged survives a crash: after restart each id is a dedup hit.
    d.kill9();
    d.restart();
    for id in &acked {
        let r = d.post_json(&json!({"source": "s", "id": id, "text": text}));
        assert_eq!(r.status, 202);
        assert_eq!(r.json()["envelopes"][0]["duplicate"], true, "{id} lost");
    }
    assert_no_segment_damaged(&d.log());
}

/// The pipeline shares the full disk with ingest: seals, tombstones and the file sink's output
/// all need space. While the disk is full nothing may be lost, half-written or poisoned; once
/// space returns, every acknowledged envelope is delivered without a restart.
#[test]
fn a_disk_filled_while_forwarding_holds_delivery_back_until_space_returns_and_loses_nothing() {
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    let args = [
        &small_spool_args()[..],
        // Short backoff, so delivery resumes soon after the filler is removed.
        &[
            "--set",
            "forward.retry_initial_ms=10",
            "--set",
            "forward.retry_max_ms=100",
        ],
    ]
    .concat();
    let d = Daemon::start_in(&data, &args, &[]);
    let text = "y".repeat(4000);
    let mut acked = Vec::new();
    for n in 0..8 {
        let id = format!("before-{n}");
        let r = d.post_json(&json!({"source": "s", "id": id, "text": text}));
        assert_eq!(r.status, 202, "{}", r.text());
        acked.push(id);
    }
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);

    fs.fill("filler");
    let refused = post_until_refused(&d, &text, &mut acked);
    assert!(
        refused.is_some(),
        "a full disk must eventually refuse with 429"
    );
    // The file sink cannot write its output either: its failures are retried, not fatal.
    d.wait_metric(
        "spoolgate_forward_errors_total{kind=\"retryable\",sink=\"default\"}",
        |v| v > 0.0,
    );
    assert_eq!(d.get("/readyz").status, 200, "a full disk must not poison");
    assert_eq!(d.metric("spoolgate_spool_poisoned"), 0.0);

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    assert_eq!(d.get("/readyz").status, 200);
    let delivered = common::ids(&common::file_sink_records(&data));
    for id in &acked {
        assert!(
            delivered.contains(id),
            "{id} acknowledged but not delivered"
        );
    }
    let verify = std::process::Command::new(common::bin())
        .arg("verify")
        .arg(data.join("out"))
        .output()
        .expect("run verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let log = d.log();
    assert_no_segment_damaged(&log);
    // Each retry cuts the partial line the failed write left; that is expected, not news, so
    // it must not log a warning per retry.
    assert!(
        !log.contains("cut a partial last line"),
        "a full disk must not log a warning per retry:\n{log}"
    );
}

/// With an HTTP sink only the spool needs the disk: a batch cannot be sealed, nor a delivered
/// one tombstoned, while it is full. Forwarding waits for space (no poison, no lost or skipped
/// sequence number) and resumes by itself.
#[test]
fn a_disk_too_full_for_seals_and_tombstones_holds_forwarding_back_without_poisoning() {
    // The sink holds the first batch (503) until the disk is full, so the envelopes taken
    // meanwhile are still to be sealed, and that batch still to be tombstoned, when it is.
    let scratch = tempfile::tempdir().unwrap();
    let (sink, cfg) = HeldSink::start(scratch.path());
    let (fs, _, d) = daemon_on_tmpfs(&cfg, &[]);
    let text = "z".repeat(4000);
    let mut acked = Vec::new();
    for n in 0..8 {
        let id = format!("before-{n}");
        let r = d.post_json(&json!({"source": "s", "id": id, "text": text}));
        assert_eq!(r.status, 202, "{}", r.text());
        acked.push(id);
    }
    d.wait_metric(
        "spoolgate_forward_errors_total{kind=\"retryable\",sink=\"default\"}",
        |v| v > 0.0,
    );

    fs.fill("filler");
    post_until_refused(&d, &text, &mut acked).expect("a full disk must refuse with 429");
    let refused = d.metric("spoolgate_spool_full_errors_total");
    sink.release();
    // The held batch's tombstone, and the next batch's seal, find no room either.
    d.wait_metric("spoolgate_spool_full_errors_total", |v| v > refused);
    assert_eq!(d.get("/readyz").status, 200, "a full disk must not poison");
    assert_eq!(d.metric("spoolgate_spool_poisoned"), 0.0);

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    assert_eq!(d.get("/readyz").status, 200);
    let records = sink.sink.delivered();
    let delivered = common::ids(&records);
    for id in &acked {
        assert!(
            delivered.contains(id),
            "{id} acknowledged but not delivered"
        );
    }
    // One stream, so its sequence numbers must run 1..=n with every duplicate identical.
    let mut by_seq = std::collections::BTreeMap::new();
    for r in &records {
        let seq = r["seq"].as_u64().unwrap();
        if let Some(earlier) = by_seq.insert(seq, r.clone()) {
            assert_eq!(earlier, *r, "seq {seq} forwarded twice, differently");
        }
    }
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    assert_eq!(seqs, (1..=acked.len() as u64).collect::<Vec<_>>());
    // Waiting for room is not a failed worker: no takeovers, no restarts.
    assert_eq!(d.metric("spoolgate_worker_takeovers_total"), 0.0);
    assert_no_segment_damaged(&d.log());
}

/// A batch the sink rejects for good goes to the dead-letter directory; with no room there it
/// stays pending and is retried, leaving no half-written file behind, and is dead-lettered
/// whole once space returns.
#[test]
fn a_rejected_batch_waits_for_room_in_the_dead_letter_directory_and_leaves_no_partial_file() {
    let sink = common::TestSink::start(|_| (400, "no such schema".into()));
    let scratch = tempfile::tempdir().unwrap();
    let cfg = sink.config_file(
        scratch.path(),
        "[forward]\nretry_initial_ms = 10\nretry_max_ms = 100\n",
    );
    let (fs, data, d) = daemon_on_tmpfs(&cfg, &[]);
    fs.fill("filler");
    // The active segment's blocks are reserved, so the envelope and its seal still fit.
    let r = d.post_json(&json!({"source": "s", "id": "rejected", "text": "y".repeat(20_000)}));
    assert_eq!(r.status, 202, "{}", r.text());
    d.wait_metric(
        "spoolgate_forward_errors_total{kind=\"dead_letter_full\",sink=\"default\"}",
        |v| v >= 2.0,
    );
    let dead_letters = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(data.join("dead-letter"))
            .map(|rd| rd.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    assert_eq!(dead_letters(), Vec::<std::path::PathBuf>::new());
    assert_eq!(d.metric("spoolgate_spool_pending_records"), 1.0);
    assert_eq!(d.metric("spoolgate_worker_takeovers_total"), 0.0);

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    assert_eq!(
        d.metric("spoolgate_forward_dead_lettered_records_total{sink=\"default\"}"),
        1.0
    );
    let files = dead_letters();
    assert_eq!(files.len(), 1, "{files:?}");
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(kept["status"], 400);
    assert_eq!(kept["records"][0]["envelope"]["id"], "rejected");
}

/// A restart on a disk that is still full: recovery needs no new space, so the daemon comes
/// up, keeps everything acknowledged, answers 429 rather than failing, and carries on once
/// space returns.
#[test]
fn a_restart_on_a_full_disk_recovers_everything_and_resumes_when_space_returns() {
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    let mut d = Daemon::start_in(&data, &small_spool_args(), &[]);
    fs.fill("filler");
    let text = "x".repeat(4000);
    let mut acked = Vec::new();
    post_until_refused(&d, &text, &mut acked).expect("a full disk must refuse with 429");
    d.kill9();
    d.restart();
    assert_eq!(d.get("/readyz").status, 200, "{}", d.get("/readyz").text());
    let r = d.post_json(&json!({"source": "s", "id": "while-full", "text": text}));
    assert!(
        r.status == 202 || r.status == 429,
        "{} {}",
        r.status,
        r.text()
    );
    if r.status == 202 {
        acked.push("while-full".into());
    }

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    let delivered = common::ids(&common::file_sink_records(&data));
    for id in &acked {
        assert!(
            delivered.contains(id),
            "{id} acknowledged but not delivered"
        );
    }
    let r = d.post_json(&json!({"source": "s", "id": "after", "text": text}));
    assert_eq!(r.status, 202, "{}", r.text());
}

/// Posts 300 envelopes of 4,000 bytes (`c-0` … `c-299`), into the second 1 MiB segment, while
/// the sink holds everything back.
fn post_into_the_second_segment(d: &Daemon) {
    let text = "c".repeat(4000);
    for n in 0..300 {
        let r = d.post_json(&json!({"source": "s", "id": format!("c-{n}"), "text": text}));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    assert!(d.metric("spoolgate_spool_segments") >= 2.0);
}

/// Compaction must write its checkpoints before it deletes anything, so a full disk fails its
/// passes until space returns: they are counted, logged once as an error (not once a second),
/// and the segments are deleted once it can write again.
#[test]
fn without_a_reserve_compaction_on_a_full_disk_fails_quietly_and_deletes_once_space_returns() {
    let scratch = tempfile::tempdir().unwrap();
    let (sink, cfg) = HeldSink::start(scratch.path());
    let (fs, _, d) = daemon_on_tmpfs(&cfg, &["--set", "spool.reserve_bytes=0"]);
    post_into_the_second_segment(&d);

    fs.fill("filler");
    sink.release();
    d.wait_metric("spoolgate_compaction_errors_total", |v| v >= 3.0);
    let log = d.log();
    assert_eq!(
        log.matches("compaction pass failed").count(),
        1,
        "one error for the run of failures:\n{log}"
    );
    assert_eq!(d.metric("spoolgate_compaction_segments_deleted_total"), 0.0);

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 1.0);
    assert!(d.log().contains("compaction passes succeed again"));
    assert_eq!(common::ids(&sink.sink.delivered()).len(), 300);
}

#[test]
fn compaction_on_a_disk_another_process_filled_spends_the_reserve_and_deletes_delivered_segments() {
    const RESERVE: f64 = 1_048_576.0;
    let scratch = tempfile::tempdir().unwrap();
    let (sink, cfg) = HeldSink::start(scratch.path());
    let (fs, data, d) = daemon_on_tmpfs(&cfg, &["--set", "spool.reserve_bytes=1048576"]);
    d.wait_metric("spoolgate_spool_reserve_bytes", |v| v == RESERVE);
    assert_eq!(
        std::fs::metadata(data.join("reserve")).unwrap().len(),
        RESERVE as u64
    );
    post_into_the_second_segment(&d);

    // Another process takes every free block; the reserve is what is left to the daemon.
    fs.fill("filler");
    sink.release();
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 1.0);
    assert!(d.metric("spoolgate_spool_reserve_spent_total") >= 1.0);
    let log = d.log();
    assert!(log.contains("spent the disk reserve"), "{log}");
    assert_no_segment_damaged(&log);
    assert_eq!(common::ids(&sink.sink.delivered()).len(), 300);

    // Once there is room again, the reserve is held again.
    std::fs::remove_file(fs.path.join("filler")).unwrap();
    d.wait_metric("spoolgate_spool_reserve_bytes", |v| v == RESERVE);
    assert_eq!(
        std::fs::metadata(data.join("reserve")).unwrap().len(),
        RESERVE as u64
    );
}

/// The reserve is made again only with `disk_free_soft_bytes` + its size free. When that much
/// does not come free (here: a soft mark larger than the filesystem, standing for space
/// another process keeps), the spent reserve is kept as free space instead: ingest resumes
/// once `disk_free_hard_bytes` + its size is free, and stops again below that, also after a
/// restart (the emptied file remembers).
#[test]
fn a_spent_reserve_that_cannot_be_made_again_is_kept_as_free_space_across_a_restart() {
    const RESERVE: u64 = 1 << 20;
    let scratch = tempfile::tempdir().unwrap();
    let (sink, cfg) = HeldSink::start(scratch.path());
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    // A reserve file of the configured size is held as found, room or not.
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("reserve"), vec![0u8; RESERVE as usize]).unwrap();
    let args = [
        &small_spool_args()[..],
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "spool.reserve_bytes=1048576",
            "--set",
            "spool.disk_free_soft_bytes=1073741824",
        ],
    ]
    .concat();
    let mut d = Daemon::start_in(&data, &args, &[]);
    d.wait_metric("spoolgate_spool_reserve_bytes", |v| v == RESERVE as f64);
    post_into_the_second_segment(&d);

    fs.fill("filler");
    sink.release();
    d.wait_metric("spoolgate_spool_reserve_spent_total", |v| v >= 1.0);
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    assert_eq!(common::ids(&sink.sink.delivered()).len(), 300);
    assert_eq!(std::fs::metadata(data.join("reserve")).unwrap().len(), 0);

    // With room above the reserve's size the daemon is ready and takes envelopes, though it
    // cannot make the reserve again.
    std::fs::remove_file(fs.path.join("filler")).unwrap();
    common::wait_for("/readyz to answer 200 again", || {
        (d.get("/readyz").status == 200).then_some(())
    });
    let r = d.post_json(&json!({"source": "s", "id": "after", "text": "After the reserve."}));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(d.metric("spoolgate_spool_reserve_bytes"), 0.0);

    // A restart finds the emptied file: the reserve is still spent, and once the free space
    // falls below its size, ingest is refused for it rather than running into ENOSPC.
    d.kill9();
    d.restart();
    fs.fill("filler");
    d.wait_metric("spoolgate_spool_filesystem_free_bytes", |v| {
        v < RESERVE as f64
    });
    let refused = d.post_json(&json!({"source": "s", "id": "refused", "text": "No room."}));
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["reason"], "reserve", "{}", refused.text());
    assert_eq!(refused.json()["limit_bytes"], RESERVE, "{}", refused.text());
    assert_eq!(d.get("/readyz").json()["reason"], "disk reserve spent");
    assert_no_segment_damaged(&d.log());
}

/// Starts the daemon of `d` again as the harness does, but leaves the address file alone and
/// reads the bound addresses from the daemon's log ("spoolgate starting ingest=… metrics=…"):
/// on a filesystem too full for an address file, the daemon starts without one.
fn respawn_reading_addresses_from_log(d: &mut Daemon) {
    let log_len = d.log().len();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(d.log_path())
        .unwrap();
    let child = std::process::Command::new(common::bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(&d.data_dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(&d.args)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log))
        .spawn()
        .unwrap();
    d.child = Some(child);
    let (ingest, metrics) = common::wait_for("the daemon's starting line", || {
        let log = d.log();
        let line = log
            .get(log_len..)?
            .lines()
            .find(|l| l.contains("spoolgate starting"))?;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
        };
        Some((field("ingest=")?, field("metrics=")?))
    });
    d.ingest = ingest;
    d.metrics = metrics;
    d.wait_ready();
}

#[test]
fn a_restart_on_a_disk_full_to_the_last_block_spends_the_reserve_to_write_its_address_file() {
    const RESERVE: f64 = 1_048_576.0;
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    let args = [
        &small_spool_args()[..],
        &["--set", "spool.reserve_bytes=1048576"],
    ]
    .concat();
    let mut d = Daemon::start_in(&data, &args, &[]);
    d.wait_metric("spoolgate_spool_reserve_bytes", |v| v == RESERVE);
    assert_eq!(d.post_json(&envelope(1)).status, 202);
    d.kill9();
    // The harness removes the old address file before a start, which would give back the
    // page the new one needs; so it goes first, and the filler takes that page too.
    std::fs::remove_file(data.join("spoolgate.addr")).unwrap();
    fs.fill("filler");

    // Not `restart`: the daemon recovers but does not turn ready while the reserve is spent.
    d.spawn();
    common::wait_for("/readyz to name the spent reserve", || {
        let r = d.get("/readyz");
        (r.status == 503 && r.json()["reason"] == "disk reserve spent").then_some(())
    });
    assert_eq!(d.metric("spoolgate_spool_reserve_spent_total"), 1.0);
    assert!(
        d.log().contains("so that the daemon can start"),
        "{}",
        d.log()
    );
    // What the reserve gave back is for forwarding and compaction: ingest waits.
    let refused = d.post_json(&envelope(2));
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.json()["reason"], "reserve", "{}", refused.text());
    assert_eq!(refused.json()["limit"], "spool.reserve_bytes");
    assert!(refused.header("retry-after").is_some());

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    d.wait_metric("spoolgate_spool_reserve_bytes", |v| v == RESERVE);
    d.wait_ready();
    let again = d.post_json(&envelope(1));
    assert_eq!(again.status, 202, "{}", again.text());
    assert_eq!(again.json()["envelopes"][0]["duplicate"], true);
}

#[test]
fn without_a_reserve_a_restart_on_a_disk_full_to_the_last_block_starts_without_an_address_file() {
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    let args = [&small_spool_args()[..], &["--set", "spool.reserve_bytes=0"]].concat();
    let mut d = Daemon::start_in(&data, &args, &[]);
    assert_eq!(d.post_json(&envelope(1)).status, 202);
    d.kill9();
    fs.fill("filler");

    respawn_reading_addresses_from_log(&mut d);
    // The previous process's file is gone: a tool must not find its pid and ports.
    assert!(!data.join("spoolgate.addr").exists());
    assert!(
        d.log().contains("starting without an address file"),
        "{}",
        d.log()
    );
    let again = d.post_json(&envelope(1));
    assert_eq!(again.status, 202, "{}", again.text());
    assert_eq!(again.json()["envelopes"][0]["duplicate"], true);
}

#[test]
fn a_log_on_the_full_filesystem_costs_log_lines_not_requests() {
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    let mut d = Daemon::start_in(&data, &small_spool_args(), &[]);
    d.kill9();
    // The daemon's stderr now goes to a file on the filesystem about to fill.
    d.log_file = fs.path.join("spoolgate.log");
    d.restart();
    fs.fill("filler");
    // The log file's last page may still have room for a few lines: take that too.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(d.log_path())
        .unwrap();
    while std::io::Write::write(&mut log, b"-").is_ok_and(|n| n == 1) {}

    // The refusal logs a warning that cannot be written; the request is answered all the same.
    let text = "x".repeat(4000);
    let mut acked = Vec::new();
    let refused = post_until_refused(&d, &text, &mut acked)
        .expect("a full disk must eventually refuse with 429");
    assert_eq!(refused.json()["reason"], "enospc", "{}", refused.text());
    assert_eq!(d.get("/readyz").status, 200);

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    let r = d.post_json(&json!({"source": "s", "id": "after", "text": text}));
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(d.log().contains("appends succeed again"), "{}", d.log());
}

#[test]
fn a_spool_that_filled_the_disk_itself_spends_the_reserve_on_forwarding_and_drains() {
    const RESERVE: f64 = 3.0 * 1_048_576.0;
    let scratch = tempfile::tempdir().unwrap();
    let (sink, cfg) = HeldSink::start(scratch.path());
    // Seals hold the gated envelopes, so draining a backlog needs room for the seals of the
    // batches in flight before the oldest segment can go: three 1 MiB segments' worth of
    // reserve, and batches of 50 envelopes (200 KB of seal each).
    let (_fs, _, d) = daemon_on_tmpfs(
        &cfg,
        &[
            "--set",
            "spool.reserve_bytes=3145728",
            "--set",
            "forward.batch_records_max=50",
        ],
    );
    d.wait_metric("spoolgate_spool_reserve_bytes", |v| v == RESERVE);
    // With the free-space watermarks off, the spool itself fills the disk while the sink
    // holds everything back: no room is left for the next segment, which the seals and
    // tombstones of those envelopes need.
    let text = "f".repeat(4000);
    let mut acked = Vec::new();
    let refused = post_until_refused(&d, &text, &mut acked)
        .expect("the spool must fill the disk and refuse with 429");
    assert_eq!(refused.json()["reason"], "enospc", "{}", refused.text());

    sink.release();
    // Forwarding spends the reserve, delivers, tombstones; compaction frees the segments.
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 1.0);
    assert!(d.metric("spoolgate_spool_reserve_spent_total") >= 1.0);
    let delivered = common::ids(&sink.sink.delivered());
    for id in &acked {
        assert!(
            delivered.contains(id),
            "{id} acknowledged but not delivered"
        );
    }
    // Once there is room the reserve is made again, and ingest resumes.
    d.wait_metric("spoolgate_spool_reserve_bytes", |v| v == RESERVE);
    let r = d.post_json(&json!({"source": "s", "id": "after", "text": text}));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_no_segment_damaged(&d.log());
}
