//! The fault suite: crash drills, a failing fdatasync, on-disk corruption, hostile input and
//! hostile clients, each against the real binary. Outcomes are deterministic: the drills are
//! seeded, and every wait is on a condition (readiness, a metric, a file).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{envelope, file_sink_records, ids, request, Daemon};
use serde_json::json;
use spoolgate::drill::{DrillOptions, DrillSink};

fn drill(sink: DrillSink, seed: u64, flip_rules: bool, flaky_stream: bool) {
    drill_with(sink, seed, flip_rules, flaky_stream, &[], 0);
}

fn drill_with(
    sink: DrillSink,
    seed: u64,
    flip_rules: bool,
    flaky_stream: bool,
    extra_sets: &[&str],
    clean_stops_percent: u8,
) -> spoolgate::drill::DrillReport {
    let scratch = tempfile::tempdir().unwrap();
    let report = spoolgate::drill::run(&DrillOptions {
        binary: common::bin().into(),
        data_dir: scratch.path().join("data"),
        kills: 20,
        seed,
        clients: 4,
        acks_per_round_max: 150,
        sink,
        sets: [
            "spool.segment_bytes_max=4194304",
            "forward.retry_initial_ms=5",
            // Small inboxes fill while a sink refuses, so the dispatcher leaves workers behind.
            "forward.worker_queue_records_max=16",
        ]
        .iter()
        .chain(extra_sets)
        .map(|s| s.to_string())
        .collect(),
        flip_rules,
        flaky_stream,
        log: None,
        full_disk: false,
        clean_stops_percent,
    })
    .unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.lost, 0, "{report}");
    // Every kill landed under load: no round waited in vain for acknowledgements.
    assert_eq!(report.rounds_short, 0, "{report}");
    if flaky_stream {
        // The recorder did refuse, so the retries and takeovers were exercised.
        assert!(report.refused_batches > 0, "{report}");
    }
    report
}

#[test]
fn twenty_kills_under_load_with_the_file_sink_lose_nothing_and_chains_verify() {
    drill(DrillSink::File, 11, false, false);
}

#[test]
fn twenty_kills_under_load_with_the_http_sink_and_rules_changing_while_down_lose_nothing() {
    drill(DrillSink::Http, 12, true, false);
}

#[test]
fn twenty_kills_with_interval_durability_lose_nothing_since_the_page_cache_outlives_the_process() {
    // `interval` acknowledges after write(2), before the fdatasync: a SIGKILL (unlike a power
    // loss) must still lose nothing, as the README's durability table says.
    drill_with(
        DrillSink::File,
        14,
        false,
        false,
        &["spool.durability=interval"],
        0,
    );
}

#[test]
fn twenty_rounds_of_kills_and_clean_stops_under_load_lose_nothing_and_no_clean_stop_reads_as_damage(
) {
    // A rolling restart among the crashes: SIGTERM while the clients keep sending. Each clean
    // stop must exit 0 and leave its durable-end marker at the end of the data; the drill
    // inspects the spool after it (no damaged range, no bytes after the data), as the restart
    // will find it (spool-format.md §4, row 14), or `passed` fails.
    let report = drill_with(DrillSink::Http, 15, true, false, &[], 40);
    assert!(report.clean_stops > 0, "{report}");
    assert!(report.kills > 0, "{report}");
    assert_eq!(report.clean_stops_unmarked, 0, "{report}");
}

#[test]
fn twenty_kills_while_the_http_sink_keeps_refusing_one_stream_lose_nothing_and_keep_order() {
    // The recorder answers 503 to batches of one stream every other 500 ms: its worker
    // retries while the others deliver, across kills and restarts. The drill checks that every
    // acknowledged envelope arrives, duplicates are identical and every chain verifies (which
    // needs each stream's records in order).
    drill(DrillSink::Http, 13, false, true);
}

#[test]
fn a_failed_fdatasync_answers_503_poisons_the_spool_and_a_restart_recovers() {
    // fdatasync 1 and 2 create the first segment; the 6th is the 4th append's.
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let mut d = Daemon::start_in(&data, &[], &[(spoolgate::daemon::FAILPOINT_FSYNC_ENV, "6")]);
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for n in 0..10 {
        let r = d.post_json(&envelope(n));
        match r.status {
            202 => acked.push(format!("e-{n}")),
            503 => {
                assert_eq!(r.json()["error"], "poisoned", "{}", r.text());
                refused.push(format!("e-{n}"));
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert!(!refused.is_empty(), "the failpoint must have fired");
    assert_eq!(d.get("/readyz").status, 503);
    assert_eq!(d.metric("spoolgate_spool_poisoned"), 1.0);
    // Workers that meet the poison wait for a restart instead of taking each other over.
    assert_eq!(d.metric("spoolgate_worker_takeovers_total"), 0.0);
    d.kill9();
    d.envs.clear();
    d.restart();
    let r = d.post_json(&envelope(100));
    assert_eq!(r.status, 202);
    // Some acknowledged envelopes may have been delivered before the poison (the pipeline's own
    // appends count towards the failpoint too), so wait on the sink's output, not on this
    // process's forward counter.
    let delivered = common::wait_for("every acknowledged envelope in the file sink", || {
        let delivered = ids(&file_sink_records(&d.data_dir));
        let all = acked.iter().all(|id| delivered.contains(id)) && delivered.contains("e-100");
        all.then_some(delivered)
    });
    for id in &acked {
        assert!(delivered.contains(id), "acknowledged {id} lost");
    }
    for id in &refused {
        assert!(
            !delivered.contains(id),
            "{id} was refused with 503 but delivered as if acknowledged"
        );
    }
    // The spool's chain evidence holds across the poison and the restart, the refused range
    // (void marker) included, and so does the sink's output.
    assert_eq!(d.terminate().code(), Some(0));
    for path in [d.data_dir.clone(), d.data_dir.join("out")] {
        let out = std::process::Command::new(common::bin())
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains(": ok: "), "{text}");
    }
}

#[test]
fn corrupt_bytes_mid_segment_and_a_cut_last_record_after_a_clean_stop_cost_only_the_touched_records_and_are_reported(
) {
    // Forwarding off keeps everything pending, and unsealed, in the spool while we corrupt it
    // (a sealed record whose frame is damaged is re-sent from its seal: see
    // `an_envelope_frame_damaged_after_its_seal_is_delivered_from_the_seal_after_a_restart`).
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let mut d = Daemon::start_in(
        &data,
        &[
            "--set",
            "forward.enabled=false",
            "--set",
            "spool.preallocate=false",
        ],
        &[],
    );
    let mut positions = Vec::new();
    for n in 0..20 {
        let r = d.post_json(&envelope(n));
        assert_eq!(r.status, 202);
        positions.push(
            r.json()["envelopes"][0]["position"]["offset"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(d.terminate().code(), Some(0));
    let seg = data.join("spool").join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    // Flip a byte inside envelope 7's payload, and cut the file in the middle of envelope 19.
    // The stop was clean, so envelope 19 was durable: its loss is corruption to report, not a
    // torn write to zero (spool-format.md §4, row 14).
    bytes[positions[7] as usize + 30] ^= 0x55;
    bytes.truncate(positions[19] as usize + 25);
    std::fs::write(&seg, bytes).unwrap();

    d.args = vec!["--set".into(), "spool.preallocate=false".into()];
    d.restart();
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 18.0
    });
    assert_eq!(
        d.metric("spoolgate_recovery_corrupt_records_dropped_total"),
        2.0
    );
    assert_eq!(
        d.metric("spoolgate_recovery_torn_tail_bytes_truncated_total"),
        0.0
    );
    let log = d.log();
    assert!(log.contains("skipping a damaged range"), "{log}");
    assert!(
        log.contains("records before the durable end are damaged"),
        "{log}"
    );
    let delivered = ids(&file_sink_records(&d.data_dir));
    for n in 0..20 {
        let id = format!("e-{n}");
        assert_eq!(delivered.contains(&id), n != 7 && n != 19, "{id}");
    }
}

#[test]
fn malformed_input_gets_its_documented_4xx_and_leaves_the_spool_unchanged() {
    let d = Daemon::start(&[]);
    let mut deep = String::new();
    for _ in 0..200 {
        deep.push('[');
    }
    let huge_field = format!(
        r#"{{"source":"s","text":"{}"}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    let many: String = format!("[{}]", vec![r#"{"source":"s"}"#; 100_000].join(","));
    let corpus: Vec<(&str, Vec<u8>, u16)> = vec![
        ("application/json", br#"{"source":"s""#.to_vec(), 400),
        ("application/json", br#"{"source":["s"]}"#.to_vec(), 400),
        (
            "application/json",
            br#"{"source":"s","ts_ms":"NaN"}"#.to_vec(),
            400,
        ),
        (
            "application/json",
            br#"{"source":"s","ts_ms":1e400}"#.to_vec(),
            400,
        ),
        ("application/json", deep.into_bytes(), 400),
        ("application/json", vec![b'{', 0xff, 0xfe, b'}'], 400),
        ("application/json", br#"{"source":"\u0000"}"#.to_vec(), 400),
        ("application/json", huge_field.into_bytes(), 413),
        ("application/json", many.into_bytes(), 413),
        (
            "application/x-ndjson",
            b"{\"source\":\"s\"}\nnot json\n".to_vec(),
            400,
        ),
        ("application/msgpack", vec![0x81, 0xa6], 400),
        (
            "application/msgpack",
            vec![0x81, 0xa6, b's', b'o', b'u', b'r', b'c', b'e', 0x05],
            400,
        ),
        (
            "application/msgpack",
            vec![
                0x81, 0xa6, b's', b'o', b'u', b'r', b'c', b'e', 0xa2, 0xff, 0xfe,
            ],
            400,
        ),
        ("application/msgpack", vec![0x81, 0x01, 0x02], 400),
        (
            "application/msgpack",
            vec![0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
            400,
        ),
        ("application/xml", b"<x/>".to_vec(), 415),
        ("", br#"{"source":"s"}"#.to_vec(), 415),
        ("application/json", br#"{"text":"no source"}"#.to_vec(), 400),
    ];
    for (ct, body, status) in corpus {
        let headers: Vec<(&str, &str)> = if ct.is_empty() {
            vec![]
        } else {
            vec![("Content-Type", ct)]
        };
        let r = request(&d.ingest, "POST", "/v1/envelopes", &headers, &body).unwrap();
        assert_eq!(
            r.status,
            status,
            "{ct} {:?}: {}",
            String::from_utf8_lossy(&body[..body.len().min(30)]),
            r.text()
        );
        assert!(r.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(d.metric("spoolgate_spool_appends_total"), 0.0);
    assert_eq!(d.get("/healthz").status, 200);
    assert_eq!(d.post_json(&envelope(1)).status, 202);
}

/// Posts as a well-behaved client does under a connection flood: a connection reset before its
/// request got through is retried on a new one. (With the accept queue overflowing, Linux falls
/// back to SYN cookies and drops handshakes; `nstat` during this test shows thousands of
/// ListenOverflows and about one reset of a client connection per run.) The reset shows as
/// ECONNRESET, or as EPIPE when it lands before the client has written its request (seen once
/// in CI on 2026-11-30), or as a close without a byte of response (seen once in CI later that
/// day): a client thread descheduled between `connect` and its write, on two vCPUs shared with
/// 200 opener threads, holds a connection that has sent nothing, which is exactly what the
/// flood's connections are, and the daemon closes the longest idle of those to make room. The
/// request never reached the daemon, and ids make a retry safe in any case.
fn post_through_a_connection_flood(d: &Daemon, body: &serde_json::Value) -> common::Response {
    let body = body.to_string();
    let headers = [("Content-Type", "application/json")];
    let mut resets = 0;
    loop {
        match common::request(
            &d.ingest,
            "POST",
            "/v1/envelopes",
            &headers,
            body.as_bytes(),
        ) {
            Ok(r) => return r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::UnexpectedEof
                ) && resets < 100 =>
            {
                resets += 1;
                eprintln!("connection reset under the flood ({resets}), retrying");
            }
            Err(e) => panic!("ingest request failed after {resets} resets: {e}"),
        }
    }
}

#[test]
fn idle_connections_and_a_client_that_never_reads_do_not_stop_others_being_served() {
    let d = Daemon::start(&[
        "--set",
        "ingest.connections_max=64",
        "--set",
        "ingest.header_read_timeout_ms=100",
        "--set",
        "ingest.idle_timeout_ms=100",
    ]);
    // A client that sends a request and never reads the response.
    let mut deaf = TcpStream::connect(&d.ingest).unwrap();
    let body = json!([envelope(1)]).to_string();
    write!(
        deaf,
        "POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // 10,000 idle connections opened at once from 200 threads: far more than connections_max
    // and than the kernel's accept backlog. Each is held open without sending anything.
    let openers: Vec<_> = (0..200)
        .map(|_| {
            let addr = d.ingest.clone();
            std::thread::spawn(move || -> Vec<std::io::Result<TcpStream>> {
                (0..50).map(|_| TcpStream::connect(&addr)).collect()
            })
        })
        .collect();
    // Everyone else is still served meanwhile: idle connections are cut by the timeouts.
    for n in 0..5 {
        let r = post_through_a_connection_flood(&d, &envelope(100 + n));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let (idle, failed): (Vec<_>, Vec<_>) = openers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .partition(|c| c.is_ok());
    // The flood only has to dwarf connections_max. A loaded CI machine has refused a few of
    // the 10,000 connects once (1 run in 6); say how, rather than fail on the machine's limits.
    assert!(
        idle.len() >= 5_000,
        "only {} of 10,000 connections opened; first error: {:?}",
        idle.len(),
        failed
            .first()
            .map(|e| e.as_ref().err().map(|e| e.to_string()))
    );
    if !failed.is_empty() {
        eprintln!(
            "{} of 10,000 connects failed: {:?}",
            failed.len(),
            failed[0].as_ref().err().map(|e| e.to_string())
        );
    }
    assert!(d.metric("spoolgate_ingest_connections_open") <= 64.0);
    let r = post_through_a_connection_flood(&d, &envelope(200));
    assert_eq!(r.status, 202, "{}", r.text());
    drop(idle);
    // The deaf client's request was answered all the same (or its connection cut by the idle
    // timeout once the answer was sent): a response is waiting, or the server closed.
    deaf.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut buf = [0u8; 12];
    match deaf.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => assert!(
            buf[..n].starts_with(&b"HTTP/1.1 202"[..n.min(12)]),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the deaf client's request was neither answered nor closed"
        ),
    }
    assert!(d.metric("spoolgate_ingest_connections_open") <= 64.0);
}

#[test]
fn temp_files_left_by_a_kill_during_a_checkpoint_write_are_removed_at_the_next_start() {
    let mut d = Daemon::start(&[]);
    assert_eq!(d.post_json(&envelope(1)).status, 202);
    d.kill9();
    let stale = d.data_dir.join(".tmpXq3ZpL");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    let other = d.data_dir.join("operator-notes.tmp");
    std::fs::write(&other, b"not ours").unwrap();
    d.restart();
    assert!(!stale.exists());
    // Nothing else in the data directory is touched, and what was acknowledged is there.
    assert!(other.exists());
    let again = d.post_json(&envelope(1));
    assert_eq!(again.json()["envelopes"][0]["duplicate"], true);
}

/// Starts the daemon on `data_dir` expecting it to refuse: waits for it to exit, and asserts
/// that it failed and that its stderr (kept in `scratch`) says each of `said`.
fn refused_start(data_dir: &std::path::Path, scratch: &std::path::Path, said: &[&str]) {
    let log = scratch.join("refused.log");
    let child = std::process::Command::new(common::bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed when dropped, so that a start that was not refused does not outlive the test.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reaped(child);
    let status = common::wait_for("the refused start to exit", || child.0.try_wait().unwrap());
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{stderr}");
    for said in said {
        assert!(stderr.contains(said), "{said:?} missing from: {stderr}");
    }
}

/// Runs `spoolgate chain-heads ARGS`, asserts that it succeeded, and returns its stdout.
fn chain_heads(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(common::bin())
        .arg("chain-heads")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "chain-heads {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The heads of the file sink's output under `data_dir`, imported as its checkpoint.
fn import_heads_from_output(data_dir: &std::path::Path, scratch: &std::path::Path) -> String {
    let heads_json = chain_heads(&["from-output".as_ref(), data_dir.join("out").as_os_str()]);
    let heads_file = scratch.join("heads.json");
    std::fs::write(&heads_file, &heads_json).unwrap();
    chain_heads(&[
        "import".as_ref(),
        data_dir.as_os_str(),
        heads_file.as_os_str(),
    ]);
    heads_json
}

/// The offset and kind of every frame in a segment file written without preallocation
/// (spool-format.md §3: an 8-byte-aligned frame of 16 header bytes and its payload).
fn frames_of(segment: &[u8]) -> Vec<(usize, u8)> {
    let mut frames = Vec::new();
    let mut at = 64;
    while at + 16 <= segment.len() && segment[at..at + 4] == [0xF7, 0x53, 0x47, 0x46] {
        let len = u32::from_le_bytes(segment[at + 4..at + 8].try_into().unwrap()) as usize;
        frames.push((at, segment[at + 8]));
        at += (16 + len).div_ceil(8) * 8;
    }
    frames
}

#[test]
fn a_damaged_seal_of_delivered_records_does_not_move_its_streams_head_back() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let args = ["--set", "spool.preallocate=false"];
    let mut d = Daemon::start_in(&data, &args, &[]);
    let batch: Vec<serde_json::Value> = (0..3).map(envelope).collect();
    assert_eq!(d.post_json(&json!(batch)).status, 202);
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    assert_eq!(d.terminate().code(), Some(0));
    let before = file_sink_records(&data);
    assert_eq!(before.len(), 3);
    assert_eq!(before[2]["seq"], 3);
    // The stream's only seal is in the active segment, which compaction keeps, so no
    // checkpoint holds its head: the seal, and the tombstone after it, are all there is.
    assert!(!data.join("chain-heads").exists());
    let seg = data.join("spool").join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    let frames = frames_of(&bytes);
    let seals: Vec<usize> = frames.iter().filter(|f| f.1 == 2).map(|f| f.0).collect();
    assert_eq!(seals.len(), 1, "{frames:?}");
    assert!(
        frames.iter().any(|f| f.1 == 3 && f.0 > seals[0]),
        "{frames:?}"
    );
    bytes[seals[0] + 40] ^= 0x55;
    std::fs::write(&seg, bytes).unwrap();

    d.restart();
    assert_eq!(
        d.metric("spoolgate_recovery_corrupt_records_dropped_total"),
        1.0
    );
    assert_eq!(d.post_json(&envelope(3)).status, 202);
    let next = delivered_record(&d, "e-3");
    assert_eq!(
        next["seq"], 4,
        "the head comes back from the tombstone: {next}"
    );
    assert_eq!(next["prev_hash"], before[2]["hash"]);
    assert_eq!(
        file_sink_records(&data).len(),
        4,
        "the delivered, tombstoned records are not sent again"
    );
}

/// The record the file sink wrote for envelope id `id`.
fn delivered_record(d: &Daemon, id: &str) -> serde_json::Value {
    common::wait_for(&format!("delivery of {id}"), || {
        file_sink_records(&d.data_dir)
            .into_iter()
            .find(|r| r["envelope"]["id"] == id)
    })
}

#[test]
fn a_second_daemon_on_a_running_daemons_data_directory_is_refused_before_it_touches_anything() {
    let scratch = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_in(&scratch.path().join("data"), &[], &[]);
    let addresses = std::fs::read(d.data_dir.join("spoolgate.addr")).unwrap();
    refused_start(
        &d.data_dir,
        scratch.path(),
        &["is in use by another spoolgate", "LOCK"],
    );
    // The running daemon's address file is its own still, and it still takes envelopes.
    assert_eq!(
        std::fs::read(d.data_dir.join("spoolgate.addr")).unwrap(),
        addresses
    );
    let r = d.post_json(&envelope(1));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(d.terminate().code(), Some(0));
}

#[test]
fn a_damaged_chain_heads_checkpoint_stops_the_start_untouched_until_the_heads_are_restored_from_the_output(
) {
    use spoolgate::chain::{ChainHead, Chains};
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let heads_path = data_dir.join(spoolgate::daemon::CHAIN_HEADS_FILE);
    // A checkpoint as compaction leaves it: stream "test" has sent 5 records, whose seals are
    // gone from the spool.
    let head = ChainHead {
        seq: 5,
        hash: [0xab; 32],
    };
    let mut heads = Chains::new();
    heads.advance("test", head);
    heads.save(&heads_path).unwrap();

    let mut d = Daemon::start_in(&data_dir, &[], &[]);
    assert_eq!(d.post_json(&envelope(1)).status, 202);
    let first = delivered_record(&d, "e-1");
    assert_eq!(first["seq"], 6, "{first}");
    assert_eq!(first["prev_hash"], hex::encode(head.hash), "{first}");
    assert_eq!(d.terminate().code(), Some(0));

    // One changed byte: the start stops before anything is forwarded, and says what to do.
    let mut damaged = std::fs::read(&heads_path).unwrap();
    *damaged.last_mut().unwrap() ^= 0x04;
    std::fs::write(&heads_path, &damaged).unwrap();
    refused_start(
        &data_dir,
        scratch.path(),
        &[
            "chain-heads",
            "CRC mismatch",
            "spoolgate chain-heads import",
        ],
    );
    assert_eq!(std::fs::read(&heads_path).unwrap(), damaged);

    // The way out the error names: each stream's last delivered head, read from the file
    // sink's output, imported. The stream then continues from the record it delivered last.
    let heads_json = import_heads_from_output(&data_dir, scratch.path());
    let heads: serde_json::Value = serde_json::from_str(&heads_json).unwrap();
    assert_eq!(heads, json!({"test": {"seq": 6, "hash": first["hash"]}}));
    assert_eq!(
        Chains::load(&heads_path).unwrap().head("test").unwrap().seq,
        6
    );
    d.restart();
    assert_eq!(d.post_json(&envelope(2)).status, 202);
    let second = delivered_record(&d, "e-2");
    assert_eq!(second["seq"], 7, "{second}");
    assert_eq!(second["prev_hash"], first["hash"], "{second}");
    assert_eq!(d.terminate().code(), Some(0));

    // Without any checkpoint, a stream continues from its latest seal still in the spool.
    std::fs::remove_file(&heads_path).unwrap();
    d.restart();
    assert_eq!(d.post_json(&envelope(3)).status, 202);
    let third = delivered_record(&d, "e-3");
    assert_eq!(third["seq"], 8, "{third}");
    assert_eq!(third["prev_hash"], second["hash"], "{third}");
}

/// A daemon on `data_dir` with 1 MiB segments that took `n` envelopes of 50 KB in one stream,
/// delivered and tombstoned them, and had compaction delete segments (about 2.5 MB of
/// envelopes and as much again of their seals); stopped cleanly. Returns it and the last
/// record it delivered, whose seq is `n`.
fn delivered_then_compacted(data_dir: &std::path::Path, n: usize) -> (Daemon, serde_json::Value) {
    let mut d = Daemon::start_in(data_dir, &common::SMALL_SEGMENTS, &[]);
    let text = "x".repeat(50_000);
    for i in 0..n {
        let r = d.post_json(&json!({"source": "test", "id": format!("big-{i}"), "text": text}));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= n as f64);
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 1.0);
    let last = delivered_record(&d, &format!("big-{}", n - 1));
    assert_eq!(last["seq"], n, "{last}");
    assert_eq!(d.terminate().code(), Some(0));
    (d, last)
}

/// The way out a refused start names: each stream's last delivered head, read from the file
/// sink's output and imported; then the daemon starts, and the stream goes on from `last`.
fn goes_on_after_heads_imported(
    d: &mut Daemon,
    scratch: &std::path::Path,
    last: &serde_json::Value,
) {
    import_heads_from_output(&d.data_dir, scratch);
    d.restart();
    assert_eq!(d.post_json(&envelope(1)).status, 202);
    let next = delivered_record(d, "e-1");
    assert_eq!(next["seq"], last["seq"].as_u64().unwrap() + 1, "{next}");
    assert_eq!(next["prev_hash"], last["hash"], "{next}");
}

#[test]
fn a_chain_heads_checkpoint_lost_after_compaction_stops_the_start_until_heads_are_imported() {
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    let n = 50;
    let (mut d, last) = delivered_then_compacted(&data_dir, n);

    let heads_path = data_dir.join(spoolgate::daemon::CHAIN_HEADS_FILE);
    // Compaction's checkpoint names the oldest segment it kept: the oldest one there is.
    let oldest = std::fs::read_dir(data_dir.join("spool"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".seg")
                .map(|id| id.parse::<u64>().unwrap())
        })
        .min()
        .unwrap();
    assert!(oldest > 1);
    assert_eq!(
        spoolgate::chain::Chains::load(&heads_path)
            .unwrap()
            .first_kept,
        Some(oldest)
    );
    std::fs::remove_file(&heads_path).unwrap();
    refused_start(
        &data_dir,
        scratch.path(),
        &[
            "is missing",
            "oldest segment",
            "spoolgate chain-heads import",
        ],
    );
    assert!(!heads_path.exists());

    goes_on_after_heads_imported(&mut d, scratch.path(), &last);
}

#[test]
fn the_oldest_segments_removed_by_something_other_than_compaction_stop_the_start_until_heads_are_imported(
) {
    // A sink that never takes anything: the segments stay, as a backlog's would.
    let hold = common::TestSink::start(|_| (503, "hold".into()));
    let scratch = tempfile::tempdir().unwrap();
    let cfg = hold.config_file(scratch.path(), "");
    let data_dir = scratch.path().join("data");
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend(common::SMALL_SEGMENTS);
    let mut d = Daemon::start_in(&data_dir, &args, &[]);
    let text = "x".repeat(50_000);
    for i in 0..50 {
        let r = d.post_json(&json!({"source": "test", "id": format!("big-{i}"), "text": text}));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    assert_eq!(d.terminate().code(), Some(0));
    let spool = data_dir.join("spool");
    let segment = |id: u64| spool.join(format!("{id:020}.seg"));
    assert!(segment(3).exists());
    // The checkpoint a compaction pass that kept segment 1 and after would have written;
    // then segments 1 and 2 are removed by hand, the way an operator short of disk might.
    let mut heads = spoolgate::chain::Chains::new();
    heads.first_kept = Some(1);
    heads
        .save(&data_dir.join(spoolgate::daemon::CHAIN_HEADS_FILE))
        .unwrap();
    std::fs::remove_file(segment(1)).unwrap();
    std::fs::remove_file(segment(2)).unwrap();
    let third = std::fs::read(segment(3)).unwrap();

    // Their seals may have taken each stream past the checkpoint's heads: no start on it.
    refused_start(
        &data_dir,
        scratch.path(),
        &["is missing segments 1 to 2", "spoolgate chain-heads import"],
    );
    assert_eq!(
        std::fs::read(segment(3)).unwrap(),
        third,
        "a refused start changed the spool"
    );

    // Nothing was ever delivered, so the operator vouches for the spool with no heads.
    let empty = scratch.path().join("no-heads.json");
    std::fs::write(&empty, "{}").unwrap();
    chain_heads(&["import".as_ref(), data_dir.as_os_str(), empty.as_os_str()]);
    d.restart();
    assert_eq!(d.metric("spoolgate_recovery_segments_missing_total"), 0.0);
    assert_eq!(d.post_json(&envelope(1)).status, 202);
}

#[test]
fn a_spool_emptied_after_compaction_stops_the_start_until_heads_are_imported() {
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    let n = 50;
    let (mut d, last) = delivered_then_compacted(&data_dir, n);

    // Every segment removed, the way an operator clearing the spool to free a disk might: the
    // checkpoint's heads are older than the seals that went with the segments.
    let spool = data_dir.join("spool");
    let segments = |spool: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(".seg"))
            .collect()
    };
    for name in segments(&spool) {
        std::fs::remove_file(spool.join(name)).unwrap();
    }
    refused_start(
        &data_dir,
        scratch.path(),
        &[
            "is missing every segment from",
            "spoolgate chain-heads import",
        ],
    );
    assert!(
        segments(&spool).is_empty(),
        "a refused start made a segment"
    );

    // The way out the error names; the stream then goes on after its last delivered record.
    goes_on_after_heads_imported(&mut d, scratch.path(), &last);
}

/// Sends one POST on a keep-alive connection and reads its whole response; returns the status.
fn post_keep_alive(stream: &mut TcpStream, n: usize) -> u16 {
    let body = json!([envelope(n)]).to_string();
    write!(
        stream,
        "POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    read_response_status(stream)
}

fn read_response_status(stream: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("response head");
        assert_eq!(n, 1, "connection closed before a response");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    head[9..12].parse().unwrap()
}

/// A read that fails the test instead of hanging if the daemon never answers or closes; the
/// daemon's own idle timeout in these tests is ten minutes, so only eviction can close early.
fn guarded(stream: TcpStream) -> TcpStream {
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    stream
}

fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.read(&mut buf), Ok(0))
}

#[test]
fn at_the_connection_limit_the_longest_idle_keep_alive_connection_makes_room() {
    let d = Daemon::start(&[
        "--set",
        "ingest.connections_max=3",
        "--set",
        "ingest.idle_timeout_ms=600000",
        "--set",
        "ingest.header_read_timeout_ms=600000",
    ]);
    // Three clients each send a request and keep their connection open, idle; the first has
    // been idle the longest.
    let mut pool: Vec<TcpStream> = (0..3)
        .map(|n| {
            let mut s = guarded(TcpStream::connect(&d.ingest).unwrap());
            assert_eq!(post_keep_alive(&mut s, n), 202);
            s
        })
        .collect();
    // A fourth client is served at once instead of waiting out the idle timeout...
    let mut late = guarded(TcpStream::connect(&d.ingest).unwrap());
    assert_eq!(post_keep_alive(&mut late, 10), 202);
    // ...because the longest-idle connection was closed, and only that one.
    assert!(closed_by_peer(&mut pool[0]));
    assert_eq!(post_keep_alive(&mut pool[1], 11), 202);
    assert_eq!(post_keep_alive(&mut pool[2], 12), 202);
    assert_eq!(d.metric("spoolgate_ingest_connections_evicted_total"), 1.0);
    assert!(d.metric("spoolgate_ingest_connections_open") <= 3.0);
}

#[test]
fn a_connection_in_the_middle_of_a_request_is_never_evicted() {
    let d = Daemon::start(&[
        "--set",
        "ingest.connections_max=2",
        "--set",
        "ingest.idle_timeout_ms=600000",
        "--set",
        "ingest.header_read_timeout_ms=600000",
        "--set",
        "ingest.body_read_timeout_ms=600000",
    ]);
    // The oldest connection is mid-request: headers sent, body not yet. `Expect:
    // 100-continue` makes the daemon say when its handler starts reading the body, so the test
    // knows the request is in progress before it goes on.
    let mut slow = guarded(TcpStream::connect(&d.ingest).unwrap());
    let body = json!([envelope(1)]).to_string();
    write!(
        slow,
        "POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        assert_eq!(slow.read(&mut byte).unwrap(), 1);
        interim.push(byte[0]);
    }
    assert!(interim.starts_with(b"HTTP/1.1 100"), "{interim:?}");
    // A second connection, accepted later, finishes a request and idles: by age alone `slow`
    // would be the one to go.
    let mut idle = guarded(TcpStream::connect(&d.ingest).unwrap());
    assert_eq!(post_keep_alive(&mut idle, 2), 202);
    let mut late = guarded(TcpStream::connect(&d.ingest).unwrap());
    assert_eq!(post_keep_alive(&mut late, 3), 202);
    assert!(closed_by_peer(&mut idle));
    // The slow client finishes its body and is answered, and its connection stays open.
    slow.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_response_status(&mut slow), 202);
    assert_eq!(post_keep_alive(&mut slow, 4), 202);
    assert_eq!(d.metric("spoolgate_ingest_connections_evicted_total"), 1.0);
}

#[test]
fn a_request_whose_client_hung_up_keeps_its_bytes_counted_until_the_writer_is_done_with_it() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let hold = scratch.path().join("hold-fsync");
    let d = Daemon::start_in(
        &data,
        &[],
        &[(
            spoolgate::daemon::FAILPOINT_HOLD_FSYNC_ENV,
            hold.to_str().unwrap(),
        )],
    );
    // The disk stalls: the request's fdatasync waits, and the client gives up on it.
    std::fs::write(&hold, b"").unwrap();
    let body = serde_json::to_vec(&envelope(1)).unwrap();
    let mut s = TcpStream::connect(&d.ingest).unwrap();
    write!(
        s,
        "POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    // The writer has the request in hand once its fdatasync is held.
    let held = scratch.path().join("hold-fsync.held");
    common::wait_for("the request's fdatasync to be held", || {
        held.exists().then_some(())
    });
    drop(s);
    // The handler is gone with its connection; its frames are still queued for the writer,
    // and the body's bytes still count against ingest.inflight_bytes_max.
    d.wait_metric("spoolgate_ingest_connections_open", |v| v == 0.0);
    let counted = d.metric("spoolgate_ingest_inflight_bytes");
    assert!(counted >= body.len() as f64, "{counted}");
    std::fs::remove_file(&hold).unwrap();
    d.wait_metric("spoolgate_ingest_inflight_bytes", |v| v == 0.0);
}

#[test]
fn an_envelope_frame_damaged_after_its_seal_is_delivered_from_the_seal_after_a_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    // The sink refuses everything at first and keeps what it was offered: the records were
    // sealed (durable) before they were sent.
    let accept = Arc::new(AtomicBool::new(false));
    let offered: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = {
        let (accept, offered) = (accept.clone(), offered.clone());
        common::TestSink::start_by_batch(move |_, batch| {
            if accept.load(Ordering::SeqCst) {
                (200, String::new())
            } else {
                offered.lock().unwrap().extend_from_slice(batch);
                (503, "down".into())
            }
        })
    };
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let cfg = sink.config_file(scratch.path(), "");
    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "spool.preallocate=false",
    ];
    let mut d = Daemon::start_in(&data, &args, &[]);
    let batch: Vec<serde_json::Value> = (0..3).map(envelope).collect();
    assert_eq!(d.post_json(&json!(batch)).status, 202);
    common::wait_for("the sink to be offered all three", || {
        (ids(&offered.lock().unwrap()).len() == 3).then_some(())
    });
    d.kill9();

    // The disk damages the second envelope's frame.
    let seg = data.join("spool").join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    let envelopes: Vec<usize> = frames_of(&bytes)
        .into_iter()
        .filter(|&(_, kind)| kind == 1)
        .map(|(at, _)| at)
        .collect();
    assert_eq!(envelopes.len(), 3);
    bytes[envelopes[1]..envelopes[1] + 4].copy_from_slice(&[0xff; 4]);
    std::fs::write(&seg, bytes).unwrap();

    accept.store(true, Ordering::SeqCst);
    d.restart();
    common::wait_for("all three delivered", || {
        (ids(&sink.delivered()).len() == 3).then_some(())
    });
    let by_id = |records: &[serde_json::Value], id: &str| {
        records
            .iter()
            .find(|r| r["envelope"]["id"] == id)
            .cloned()
            .unwrap()
    };
    let offered = offered.lock().unwrap().clone();
    for id in ["e-0", "e-1", "e-2"] {
        assert_eq!(
            by_id(&sink.delivered(), id),
            by_id(&offered, id),
            "{id} is delivered as it was sealed"
        );
    }
    assert_eq!(
        d.metric("spoolgate_recovery_envelopes_resent_from_seals_total"),
        1.0
    );
    assert_eq!(
        d.metric("spoolgate_recovery_corrupt_records_dropped_total"),
        1.0
    );
    // Its id is still known: a client retrying it is answered as a duplicate, at the
    // position it was first written to, rather than sealed again under a new sequence number.
    let retry = d.post_json(&envelope(1));
    assert_eq!(retry.status, 202, "{}", retry.text());
    let answer = &retry.json()["envelopes"][0];
    assert_eq!(answer["duplicate"], true, "{answer}");
    assert_eq!(
        answer["position"]["offset"], envelopes[1] as u64,
        "{answer}"
    );
}
