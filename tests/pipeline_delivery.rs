//! Delivery as a user sees it: what reaches the sinks, what verify says, what happens when a
//! sink fails or refuses, and that the spool shrinks once everything is delivered.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::process::Command;

use common::{envelope, file_sink_records, ids, Daemon, TestSink, SMALL_SEGMENTS};
use serde_json::json;

fn verify(path: &std::path::Path) -> (bool, String) {
    let (code, text) = verify_with(path, &[]);
    (code == Some(0), text)
}

/// `spoolgate verify PATH ARGS...`: its exit code and what it printed.
fn verify_with(path: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(common::bin())
        .arg("verify")
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn post_many(d: &Daemon, n: usize, streams: usize) -> Vec<String> {
    let mut acked = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(20) {
        let items: Vec<_> = chunk
            .iter()
            .map(|i| json!({"source": "svc", "tenant": format!("t{}", i % streams), "id": format!("id-{i}"), "text": format!("record {i}. mail x{i}@example.com")}))
            .collect();
        let r = d.post_json(&json!(items));
        assert_eq!(r.status, 202, "{}", r.text());
        acked.extend(chunk.iter().map(|i| format!("id-{i}")));
    }
    acked
}

#[test]
fn delivered_output_verifies_and_a_changed_byte_a_removed_line_or_swapped_lines_do_not() {
    let mut d = Daemon::start(&[]);
    post_many(&d, 60, 3);
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 60.0
    });
    assert_eq!(d.terminate().code(), Some(0));
    let out = d.data_dir.join("out");
    let (ok, text) = verify(&out);
    assert!(ok, "{text}");
    assert!(text.contains("3 stream(s), 60 record(s)"), "{text}");

    let file = std::fs::read_dir(&out)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let original = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let scratch = tempfile::tempdir().unwrap();
    let check = |name: &str, content: String| {
        let p = scratch.path().join(name);
        std::fs::write(&p, content).unwrap();
        let (ok, text) = verify(&p);
        assert!(!ok, "{name} must fail verification");
        assert!(
            text.contains("BROKEN") && text.contains("stream"),
            "{name}: {text}"
        );
    };
    check(
        "changed.jsonl",
        original.replacen("record 7.", "record 8.", 1),
    );
    let mut removed = lines.clone();
    removed.remove(5);
    check("removed.jsonl", removed.join("\n"));
    // Swap two records of the same stream.
    let stream_of =
        |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap()["stream"].clone();
    let first = 0;
    let second = (1..lines.len())
        .find(|&i| stream_of(lines[i]) == stream_of(lines[0]))
        .unwrap();
    let mut swapped = lines.clone();
    swapped.swap(first, second);
    check("swapped.jsonl", swapped.join("\n"));
    // A key the hash does not cover, added to a line.
    check(
        "added.jsonl",
        original.replacen("{\"stream\"", "{\"approved\":true,\"stream\"", 1),
    );

    // Output whose oldest records were removed (a consumer took the first file away) starts
    // after seq 1: a gap for verify, checked from there on with --partial.
    let later = scratch.path().join("later.jsonl");
    std::fs::write(&later, lines[10..].join("\n")).unwrap();
    let (code, text) = verify_with(&later, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("--partial"), "{text}");
    let (code, text) = verify_with(&later, &["--partial"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("50 record(s)"), "{text}");
    // A directory holding no records verified nothing: not a pass.
    let empty = tempfile::tempdir().unwrap();
    let (code, text) = verify_with(empty.path(), &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("no forward records found"), "{text}");
}

/// A sink with a body limit that answers 413 as soon as it has read a request's head, without
/// reading the body, and closes the connection (what Go's net/http does past its drain limit,
/// and many proxies): a client still writing a large body then sees the connection reset, not
/// the 413. Bodies up to `limit_bytes` are read and taken (200). Returns the URL and the
/// `seq`s it took, in order.
fn early_413_sink(limit_bytes: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u64>>>) {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/batch", listener.local_addr().unwrap());
    let taken = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = taken.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let t = t.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut out = conn;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    if len > limit_bytes {
                        let _ = out.write_all(
                            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large",
                        );
                        // Closed with the body unread: the kernel resets the connection.
                        return;
                    }
                    let mut body = vec![0u8; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let batch: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                    t.lock()
                        .unwrap()
                        .extend(batch.iter().map(|r| r["seq"].as_u64().unwrap()));
                    if out
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, taken)
}

#[test]
fn a_sink_that_answers_413_before_reading_the_body_and_closes_gets_every_record_in_smaller_parts() {
    let (url, taken) = early_413_sink(256 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let cfg = scratch.path().join("sink.toml");
    std::fs::write(
        &cfg,
        format!(
            "[forward]\nretry_initial_ms = 5\nretry_max_ms = 50\n\
             [sinks.default]\ntype = \"http\"\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    // 56 envelopes of 64 KiB in one stream: a batch of some 3.7 MB of JSON, over the limit
    // until it has been halved four times, and large enough that the client is still writing
    // it when the sink closes.
    let n = 56u64;
    let batch: Vec<serde_json::Value> = (0..n)
        .map(|i| json!({"source": "s", "id": format!("e-{i}"), "text": format!("{i} {}", "x".repeat(64 * 1024))}))
        .collect();
    assert_eq!(d.post_json(&json!(batch)).status, 202);
    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= n as f64);
    assert_eq!(
        *taken.lock().unwrap(),
        (1..=n).collect::<Vec<_>>(),
        "every record once, in order"
    );
}

/// A daemon forwarding to `sink`, retrying after 5 ms and at most 50 ms apart.
fn daemon_retrying_fast(sink: &TestSink, scratch: &std::path::Path) -> Daemon {
    let cfg = sink.config_file(
        scratch,
        "[forward]\nretry_initial_ms = 5\nretry_max_ms = 50\n",
    );
    Daemon::start(&["--config", cfg.to_str().unwrap()])
}

#[test]
fn a_sink_failing_with_500_for_a_while_loses_nothing_and_keeps_per_stream_order() {
    let sink = TestSink::start(|n| {
        if n < 5 {
            (500, "busy".into())
        } else {
            (200, String::new())
        }
    });
    let scratch = tempfile::tempdir().unwrap();
    let d = daemon_retrying_fast(&sink, scratch.path());
    let acked = post_many(&d, 100, 4);
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 100.0
    });
    let delivered = sink.delivered();
    let got = ids(&delivered);
    for id in &acked {
        assert!(got.contains(id), "{id} lost");
    }
    let mut last: HashMap<String, u64> = HashMap::new();
    for r in &delivered {
        let stream = r["stream"].as_str().unwrap().to_string();
        let seq = r["seq"].as_u64().unwrap();
        let prev = last.insert(stream.clone(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "stream {stream} out of order");
    }
    assert!(d.metric("spoolgate_forward_retries_total{sink=\"default\"}") >= 5.0);
    assert_eq!(
        d.metric("spoolgate_forward_errors_total{kind=\"retryable\",sink=\"default\"}"),
        5.0
    );
}

#[test]
fn a_sink_that_redirects_is_retried_not_dead_lettered_and_gets_every_record_once_it_answers() {
    let sink = TestSink::start(|n| {
        if n < 3 {
            (308, String::new())
        } else {
            (200, String::new())
        }
    });
    let scratch = tempfile::tempdir().unwrap();
    let d = daemon_retrying_fast(&sink, scratch.path());
    let acked = post_many(&d, 20, 2);
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 20.0
    });
    let got = ids(&sink.delivered());
    for id in &acked {
        assert!(got.contains(id), "{id} lost");
    }
    assert_eq!(
        d.metric("spoolgate_forward_errors_total{kind=\"retryable\",sink=\"default\"}"),
        3.0
    );
    let dead = d.data_dir.join("dead-letter");
    let dead_files = std::fs::read_dir(&dead).map(|r| r.count()).unwrap_or(0);
    assert_eq!(dead_files, 0, "a redirect is not a refusal of the batch");
}

/// Posts envelopes 1 and 2 to a daemon whose sink answers every request with `status` and
/// `reason`, waits until both are dead-lettered and tombstoned, and returns the dead-letter
/// files' contents and what the sink took.
fn dead_lettered(status: u16, reason: &'static str) -> (String, Vec<serde_json::Value>) {
    let sink = TestSink::start(move |_| (status, reason.into()));
    let scratch = tempfile::tempdir().unwrap();
    let cfg = sink.config_file(scratch.path(), "");
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let r = d.post_json(&json!([envelope(1), envelope(2)]));
    assert_eq!(r.status, 202);
    d.wait_metric(
        "spoolgate_forward_dead_lettered_records_total{sink=\"default\"}",
        |v| v >= 2.0,
    );
    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= 2.0);
    let dl = d.data_dir.join("dead-letter");
    let files: Vec<_> = std::fs::read_dir(&dl)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!files.is_empty());
    let all: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    (all, sink.delivered())
}

#[test]
fn a_sink_answering_400_sends_the_batch_to_the_dead_letter_directory_with_the_reason() {
    let (all, delivered) = dead_lettered(400, "field envelope.text is not allowed");
    assert!(all.contains("field envelope.text is not allowed"), "{all}");
    assert!(all.contains("\"status\": 400"));
    assert!(all.contains("e-1") && all.contains("e-2"));
    assert!(delivered.is_empty());
}

/// `spoolgate dead-letter ARGS...`: its exit code, stdout and stderr.
fn dead_letter_cli(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = Command::new(common::bin())
        .arg("dead-letter")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_dead_lettered_batch_is_listed_and_resent_to_its_sink_identically_once_the_sink_takes_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let refusing = std::sync::Arc::new(AtomicBool::new(true));
    let r = refusing.clone();
    let sink = TestSink::start(move |_| {
        if r.load(Ordering::SeqCst) {
            (400, "field envelope.text is not allowed".into())
        } else {
            (200, String::new())
        }
    });
    let scratch = tempfile::tempdir().unwrap();
    let cfg = sink.config_file(scratch.path(), "");
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(d.post_json(&json!([envelope(1), envelope(2)])).status, 202);
    d.wait_metric(
        "spoolgate_forward_dead_lettered_records_total{sink=\"default\"}",
        |v| v >= 2.0,
    );
    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= 2.0);
    let dir = d.data_dir.join("dead-letter");
    let letters: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let sealed: Vec<serde_json::Value> = letters
        .iter()
        .flat_map(|f| {
            let letter: serde_json::Value =
                serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
            letter["records"].as_array().unwrap().clone()
        })
        .collect();
    let sealed_ids: Vec<&str> = sealed
        .iter()
        .map(|r| r["envelope"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(sealed_ids.len(), 2);
    assert!(sealed_ids.contains(&"e-1") && sealed_ids.contains(&"e-2"));

    let (code, listed, _) = dead_letter_cli(&[OsStr::new("list"), dir.as_os_str()]);
    assert_eq!(code, Some(0));
    assert_eq!(listed.lines().count(), letters.len(), "{listed}");
    assert!(listed.contains("sink=default status=400"), "{listed}");
    assert!(
        listed.contains("reason: field envelope.text is not allowed"),
        "{listed}"
    );

    let mut resend: Vec<&OsStr> = vec![
        OsStr::new("resend"),
        OsStr::new("--config"),
        cfg.as_os_str(),
        OsStr::new("--remove"),
    ];
    resend.extend(letters.iter().map(|l| l.as_os_str()));
    // Still refused: said so, exit 1, every letter kept.
    let (code, _, err) = dead_letter_cli(&resend);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("not delivered to default: rejected with status 400: field envelope.text is not allowed"),
        "{err}"
    );
    assert!(letters.iter().all(|l| l.exists()));
    assert!(sink.delivered().is_empty());

    // Taken: the sink gets the very records that were sealed, and the letters are removed.
    refusing.store(false, Ordering::SeqCst);
    let (code, out, err) = dead_letter_cli(&resend);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("delivered to default"), "{out}");
    assert!(letters.iter().all(|l| !l.exists()));
    let key = |r: &serde_json::Value| (r["stream"].to_string(), r["seq"].as_u64().unwrap());
    let mut delivered = sink.delivered();
    let mut expected = sealed;
    delivered.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(delivered, expected, "re-sent as sealed");
}

#[test]
fn a_rejected_batch_the_full_dead_letter_directory_cannot_take_stays_pending_until_room_is_made() {
    let sink = TestSink::start(|_| (400, "schema mismatch".into()));
    let scratch = tempfile::tempdir().unwrap();
    let cfg = sink.config_file(
        scratch.path(),
        "[forward]\nretry_initial_ms = 5\nretry_max_ms = 50\n\
         dead_letter_bytes_max = 65536\n",
    );
    // Dead letters from an earlier run fill the directory to its bound.
    let data_dir = scratch.path().join("data");
    let dl = data_dir.join("dead-letter");
    std::fs::create_dir_all(&dl).unwrap();
    let earlier = dl.join("earlier.json");
    std::fs::write(&earlier, vec![b' '; 65_536]).unwrap();
    let d = Daemon::start_in(&data_dir, &["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(d.metric("spoolgate_dead_letter_bytes"), 65_536.0);

    let r = d.post_json(&json!([envelope(1), envelope(2)]));
    assert_eq!(r.status, 202);
    // Refused at least twice: the batch went back to the sink after the first refusal.
    d.wait_metric(
        "spoolgate_forward_errors_total{kind=\"dead_letter_full\",sink=\"default\"}",
        |v| v >= 2.0,
    );
    assert_eq!(
        d.metric("spoolgate_forward_dead_lettered_records_total{sink=\"default\"}"),
        0.0
    );
    assert_eq!(d.metric("spoolgate_tombstones_written_total"), 0.0);
    // The gauge is refreshed by the compactor's periodic pass, hence the wait.
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 2.0);
    assert_eq!(
        std::fs::read_dir(&dl).unwrap().count(),
        1,
        "nothing written"
    );
    assert!(
        d.log().contains("dead-letter directory full"),
        "{}",
        d.log()
    );

    // The operator clears the directory; the next retry dead-letters the batch.
    std::fs::remove_file(&earlier).unwrap();
    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= 2.0);
    assert_eq!(
        d.metric("spoolgate_forward_dead_lettered_records_total{sink=\"default\"}"),
        2.0
    );
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    let files: Vec<_> = std::fs::read_dir(&dl)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let body = std::fs::read_to_string(&files[0]).unwrap();
    assert!(body.contains("schema mismatch") && body.contains("e-1") && body.contains("e-2"));
    assert_eq!(
        d.metric("spoolgate_dead_letter_bytes"),
        std::fs::metadata(&files[0]).unwrap().len() as f64
    );
}

#[test]
fn a_rejected_batch_a_failing_dead_letter_directory_cannot_take_waits_and_no_worker_fails() {
    let sink = TestSink::start(|_| (400, "schema mismatch".into()));
    let scratch = tempfile::tempdir().unwrap();
    // A regular file where the dead-letter directory's parent should be: every attempt to
    // create the directory fails with an I/O error that is not a full disk.
    let blocker = scratch.path().join("blocked");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let dl = blocker.join("dead-letter");
    let cfg = sink.config_file(
        scratch.path(),
        &format!(
            "[forward]\nretry_initial_ms = 5\nretry_max_ms = 50\ndead_letter_dir = \"{}\"\n",
            dl.display()
        ),
    );
    let d = Daemon::start_in(
        &scratch.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    let r = d.post_json(&json!([envelope(1), envelope(2)]));
    assert_eq!(r.status, 202);
    d.wait_metric(
        "spoolgate_forward_errors_total{kind=\"dead_letter_failed\",sink=\"default\"}",
        |v| v >= 2.0,
    );
    // The batch waits; its worker was not failed and no slot changed hands.
    assert_eq!(d.metric("spoolgate_worker_takeovers_total"), 0.0);
    assert_eq!(d.metric("spoolgate_tombstones_written_total"), 0.0);

    // The operator fixes the path; the next retry dead-letters the batch.
    std::fs::remove_file(&blocker).unwrap();
    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= 2.0);
    assert_eq!(
        d.metric("spoolgate_forward_dead_lettered_records_total{sink=\"default\"}"),
        2.0
    );
    assert_eq!(std::fs::read_dir(&dl).unwrap().count(), 1);
    assert_eq!(d.metric("spoolgate_worker_takeovers_total"), 0.0);
}

#[test]
fn a_sink_answering_413_gets_the_batch_in_halves_and_every_record_arrives_in_order() {
    // The sink takes at most 3 records per request, like an endpoint with a body limit.
    let sink = TestSink::start_by_batch(|_, batch| {
        if batch.len() > 3 {
            (413, "request entity too large".into())
        } else {
            (200, String::new())
        }
    });
    let scratch = tempfile::tempdir().unwrap();
    let cfg = sink.config_file(scratch.path(), "[forward]\nworkers = 1\n");
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let items: Vec<_> = (0..40).map(envelope).collect();
    let r = d.post_json(&json!(items));
    assert_eq!(r.status, 202, "{}", r.text());
    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= 40.0);
    let delivered = sink.delivered();
    let got = ids(&delivered);
    for n in 0..40 {
        assert!(got.contains(&format!("e-{n}")), "e-{n} lost");
    }
    let seqs: Vec<u64> = delivered
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=40).collect::<Vec<_>>(),
        "one stream, in order, once"
    );
    assert!(d.metric("spoolgate_forward_errors_total{kind=\"too_large\",sink=\"default\"}") >= 1.0);
    assert_eq!(
        d.metric("spoolgate_forward_dead_lettered_records_total{sink=\"default\"}"),
        0.0
    );
}

#[test]
fn a_single_record_a_sink_refuses_as_too_large_is_dead_lettered_with_the_reason() {
    let (all, delivered) = dead_lettered(413, "request entity too large");
    assert!(all.contains("\"status\": 413"), "{all}");
    assert!(all.contains("e-1") && all.contains("e-2"));
    assert!(delivered.is_empty());
}

#[test]
fn an_envelope_whose_gated_record_outgrows_a_spool_record_is_dead_lettered_and_its_stream_goes_on()
{
    // With the `hash` policy every short address grows about 3.5x, so an envelope that fits a
    // spool record as received cannot be sealed once gated. It must not stall its slot: it goes
    // to the dead-letter directory (gated, so the addresses stay hashed) and is tombstoned,
    // and the records around it are delivered with consecutive sequence numbers.
    let scratch = tempfile::tempdir().unwrap();
    let cfg = scratch.path().join("spoolgate.toml");
    std::fs::write(
        &cfg,
        "[spool]\nrecord_bytes_max = 65536\n\
         [ingest]\nenvelope_bytes_max = 64512\n\
         [gate.pii]\nemail = \"hash\"\n",
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let big = "a@b.co ".repeat(8_000);
    for (id, text) in [
        ("before", "First."),
        ("big", big.as_str()),
        ("after", "Last."),
    ] {
        let r = d.post_json(&json!({"source": "svc", "tenant": "t", "id": id, "text": text}));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 2.0
    });
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    let delivered: Vec<(String, u64)> = file_sink_records(&d.data_dir)
        .iter()
        .map(|r| {
            (
                r["envelope"]["id"].as_str().unwrap().to_string(),
                r["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        delivered,
        vec![("before".to_string(), 1), ("after".to_string(), 2)]
    );
    assert_eq!(
        d.metric("spoolgate_gate_envelopes_total{outcome=\"unsealable\"}"),
        1.0
    );
    let files: Vec<_> = std::fs::read_dir(d.data_dir.join("dead-letter"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let letter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    assert_eq!(letter["envelope"]["id"], "big");
    let reason = letter["reason"].as_str().unwrap();
    assert!(reason.contains("spool.record_bytes_max"), "{reason}");
    let text = letter["envelope"]["text"].as_str().unwrap();
    assert!(text.starts_with("[EMAIL:") && !text.contains("a@b.co"));
}

#[test]
fn once_everything_is_delivered_the_spool_shrinks_to_the_active_segment_and_a_restart_replays_nothing(
) {
    let mut d = Daemon::start(&SMALL_SEGMENTS);
    let text = "z".repeat(30_000);
    for n in 0..100 {
        let r = d.post_json(&json!({"source": "big", "id": format!("big-{n}"), "text": text}));
        assert_eq!(r.status, 202);
    }
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 100.0
    });
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 2.0);
    d.wait_metric("spoolgate_spool_segments", |v| v == 1.0);
    assert!(d.metric("spoolgate_compaction_bytes_reclaimed_total") >= 2.0 * 1048576.0);
    assert_eq!(d.metric("spoolgate_spool_pending_records"), 0.0);
    d.kill9();
    d.restart();
    assert_eq!(d.metric("spoolgate_replay_recovered_total"), 0.0);
    // The segments compaction deleted are below the checkpoint's first_kept: not missing.
    assert_eq!(d.metric("spoolgate_recovery_segments_missing_total"), 0.0);
    assert_eq!(file_sink_records(&d.data_dir).len(), 100);
}

#[test]
fn a_graceful_stop_right_after_delivery_leaves_every_delivered_record_tombstoned() {
    // Tombstones are appended in the background while workers go on; whatever the sink
    // confirmed before a stop must be tombstoned by the time the process exits, or the next
    // start would deliver it again. (Workers wait for their appends before returning, and the
    // spool closes after the workers; removing only the first of those two waits does not
    // make this test fail.)
    let mut d = Daemon::start(&[]);
    for round in 0..5 {
        for n in 0..40 {
            let r = d.post_json(&envelope(round * 1000 + n));
            assert_eq!(r.status, 202);
        }
        // Counters start from zero in each process, and nothing is replayed into this one.
        d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
            v >= 40.0
        });
        // Stop as soon as the sink has confirmed, while the last tombstones may be in flight.
        assert!(d.terminate().success());
        d.restart();
        assert_eq!(d.metric("spoolgate_replay_recovered_total"), 0.0);
        assert_eq!(d.metric("spoolgate_spool_pending_records"), 0.0);
    }
    assert_eq!(file_sink_records(&d.data_dir).len(), 200);
}

#[test]
fn a_retried_id_is_deduplicated_after_its_segment_was_compacted_and_the_daemon_restarted() {
    let mut d = Daemon::start(&SMALL_SEGMENTS);
    let text = "z".repeat(30_000);
    let body = |n: usize| json!({"source": "big", "id": format!("big-{n}"), "text": text});
    let first = d.post_json(&body(0));
    assert_eq!(first.status, 202);
    let original = first.json()["envelopes"][0]["position"].clone();
    let first_segment = d
        .data_dir
        .join("spool")
        .join(format!("{:020}.seg", original["segment"].as_u64().unwrap()));
    assert!(first_segment.exists());
    for n in 1..100 {
        assert_eq!(d.post_json(&body(n)).status, 202);
    }
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 100.0
    });
    // The segment that held big-0 is gone: only a dedup checkpoint remembers it.
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 2.0);
    let checkpoints: Vec<_> = std::fs::read_dir(&d.data_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("dedup-"))
        .collect();
    assert!(!checkpoints.is_empty());
    assert!(!first_segment.exists());
    d.kill9();
    d.restart();
    let again = d.post_json(&body(0));
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["envelopes"][0]["position"], original);
    assert_eq!(again.json()["envelopes"][0]["duplicate"], true);
    assert_eq!(d.metric("spoolgate_ingest_dedup_hits_total"), 1.0);
    assert_eq!(d.metric("spoolgate_ingest_envelopes_accepted_total"), 0.0);
    assert_eq!(
        d.metric("spoolgate_recovery_dedup_files_skipped_total"),
        0.0
    );
}

#[test]
fn a_stream_known_only_from_the_chain_heads_checkpoint_still_counts_against_streams_max() {
    let mut d = Daemon::start(&[&SMALL_SEGMENTS[..], &["--set", "ingest.streams_max=2"]].concat());
    let early = d.post_json(&json!({"source": "early"}));
    assert_eq!(early.status, 202);
    let early_segment = d.data_dir.join("spool").join(format!(
        "{:020}.seg",
        early.json()["envelopes"][0]["position"]["segment"]
            .as_u64()
            .unwrap()
    ));
    assert!(early_segment.exists());
    let text = "z".repeat(30_000);
    for n in 0..100 {
        let r = d.post_json(&json!({"source": "big", "id": format!("big-{n}"), "text": text}));
        assert_eq!(r.status, 202);
    }
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 101.0
    });
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 2.0);
    // The envelope and the seal of `early` are gone with their segment.
    assert!(!early_segment.exists());
    d.kill9();
    d.restart();
    assert_eq!(d.post_json(&json!({"source": "late"})).status, 422);
    assert_eq!(d.post_json(&json!({"source": "early"})).status, 202);
}

#[test]
fn dedup_checkpoints_on_disk_stay_within_about_twice_dedup_entries_max() {
    let entries_max = 50usize;
    let mut d = Daemon::start(
        &[
            &SMALL_SEGMENTS[..],
            &["--set", &format!("ingest.dedup_entries_max={entries_max}")],
        ]
        .concat(),
    );
    let text = "z".repeat(30_000);
    for n in 0..300 {
        let r = d.post_json(&json!({"source": "big", "id": format!("big-{n}"), "text": text}));
        assert_eq!(r.status, 202);
    }
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 300.0
    });
    d.wait_metric("spoolgate_compaction_segments_deleted_total", |v| v >= 8.0);
    // Stopped, so no pass writes or removes a file while they are read.
    d.kill9();
    // Each pass that deleted segments wrote the ids it still remembered; older files whose
    // ids newer ones outnumber are gone (a load would evict those ids anyway).
    let files = spoolgate::ingest::dedup_file::list(&d.data_dir).unwrap();
    assert!(!files.is_empty());
    let on_disk: usize = files
        .iter()
        .map(|(path, _)| spoolgate::ingest::dedup_file::read(path).unwrap().len())
        .sum();
    assert!(
        on_disk < 2 * entries_max,
        "{on_disk} entries in {} files",
        files.len()
    );
}

#[test]
fn a_damaged_dedup_checkpoint_is_skipped_and_counted_and_the_daemon_still_starts() {
    let mut d = Daemon::start(&[]);
    assert_eq!(d.post_json(&json!({"source": "s", "id": "x"})).status, 202);
    d.kill9();
    std::fs::write(
        d.data_dir
            .join("dedup-00000000000000000002-00000000000000000001"),
        b"SGDEDUP1garbage",
    )
    .unwrap();
    d.restart();
    assert_eq!(
        d.metric("spoolgate_recovery_dedup_files_skipped_total"),
        1.0
    );
    // The id still in the spool is deduplicated as before.
    let again = d.post_json(&json!({"source": "s", "id": "x"}));
    assert_eq!(again.json()["envelopes"][0]["duplicate"], true);
}

#[test]
fn records_pending_at_a_kill_are_replayed_and_delivered_after_restart() {
    // A sink that is down: everything stays pending, then the daemon is killed.
    let sink = TestSink::start(|n| {
        if n < 1_000_000 {
            (503, "down".into())
        } else {
            (200, String::new())
        }
    });
    let scratch = tempfile::tempdir().unwrap();
    let cfg = sink.config_file(
        scratch.path(),
        "[forward]\nretry_initial_ms = 5\nretry_max_ms = 20\n",
    );
    let mut d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let acked = post_many(&d, 40, 2);
    d.wait_metric(
        "spoolgate_forward_errors_total{kind=\"retryable\",sink=\"default\"}",
        |v| v >= 1.0,
    );
    d.kill9();
    // Back up with the embedded file sink: the replay delivers everything there.
    d.args.clear();
    d.restart();
    d.wait_metric("spoolgate_forward_records_total{sink=\"default\"}", |v| {
        v >= 40.0
    });
    assert_eq!(d.metric("spoolgate_replay_recovered_total"), 40.0);
    // Written before this process started, they can only have come from the segments.
    assert!(d.metric("spoolgate_forward_records_read_from_segments_total") >= 40.0);
    let got = ids(&file_sink_records(&d.data_dir));
    for id in &acked {
        assert!(got.contains(id), "{id} not replayed");
    }
}

#[test]
fn a_sink_that_keeps_failing_holds_back_only_its_own_records_and_delivers_them_in_order_once_it_recovers(
) {
    // Two workers own alternate slots. Records of tenant `held` are routed to an HTTP sink that
    // answers 503 until told otherwise; every other tenant's records go to the file sink and
    // live in the other worker's slots. The held worker's inbox (4 records) fills at once.
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healthy.clone();
    let sink = TestSink::start(move |_| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            (200, String::new())
        } else {
            (503, "down".into())
        }
    });
    let held = "held";
    let held_worker = spoolgate::slots::slot_of(held) % 2;
    let free: Vec<String> = (0..)
        .map(|i| format!("free{i}"))
        .filter(|t| spoolgate::slots::slot_of(t) % 2 != held_worker)
        .take(4)
        .collect();
    let scratch = tempfile::tempdir().unwrap();
    let rules = scratch.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"hold\"\nkeywords = [\"HOLDME\"]\nsink = \"held\"\n",
    )
    .unwrap();
    let cfg = scratch.path().join("spoolgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gate]\nrules_path = \"{}\"\n\
             [forward]\nworkers = 2\nworker_queue_records_max = 4\nbatch_records_max = 2\n\
             retry_initial_ms = 5\nretry_max_ms = 20\n\
             [sinks.held]\ntype = \"http\"\nurl = \"{}\"\n",
            rules.display(),
            sink.url
        ),
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let post = |tenant: &str, i: usize, text: &str| {
        let r = d.post_json(&json!({"source": "svc", "tenant": tenant, "id": format!("{tenant}-{i}"), "text": text}));
        assert_eq!(r.status, 202, "{}", r.text());
        format!("{tenant}-{i}")
    };
    let held_ids: Vec<String> = (0..40).map(|i| post(held, i, "HOLDME please")).collect();
    let mut free_ids = Vec::new();
    for i in 0..100 {
        free_ids.push(post(&free[i % free.len()], i, "nothing special"));
    }

    // While the held sink is down, every other record is delivered.
    let delivered = common::wait_for("the free tenants' records in the file sink", || {
        let got = ids(&file_sink_records(&d.data_dir));
        free_ids.iter().all(|id| got.contains(id)).then_some(got)
    });
    assert!(held_ids.iter().all(|id| !delivered.contains(id)));
    assert!(sink.delivered().is_empty());
    assert!(d.metric("spoolgate_forward_workers_left_behind_total") >= 1.0);

    // Once it recovers, the held records arrive, all of them, in stream order.
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let got = common::wait_for("the held records at the recovered sink", || {
        let got = sink.delivered();
        let ids = ids(&got);
        held_ids.iter().all(|id| ids.contains(id)).then_some(got)
    });
    let seqs: Vec<u64> = got.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=40).collect::<Vec<u64>>(),
        "held stream out of order"
    );
}

#[test]
fn a_file_sink_at_its_directory_bound_holds_records_in_the_spool_until_a_consumer_takes_files() {
    let scratch = tempfile::tempdir().unwrap();
    let cfg = scratch.path().join("sink.toml");
    std::fs::write(
        &cfg,
        "[sinks.default]\ntype = \"file\"\nfile_bytes_max = 4096\ndir_bytes_max = 8192\n\
         [forward]\nbatch_records_max = 2\nretry_initial_ms = 5\nretry_max_ms = 50\n",
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let n = 40;
    let r = d.post_json(&json!((0..n).map(envelope).collect::<Vec<_>>()));
    assert_eq!(r.status, 202, "{}", r.text());

    let out = d.data_dir.join("out");
    let retryable = "spoolgate_forward_errors_total{kind=\"retryable\",sink=\"default\"}";
    let tombstoned = "spoolgate_tombstones_written_total";
    let mut taken = String::new();
    let mut refusals = 0;
    loop {
        let errors_before = d.metric(retryable);
        let finished = common::wait_for("every record delivered, or the sink refusing", || {
            if d.metric(tombstoned) >= n as f64 {
                Some(true)
            } else if d.metric(retryable) > errors_before {
                Some(false)
            } else {
                None
            }
        });
        if finished {
            break;
        }
        refusals += 1;
        assert!(refusals <= n, "no progress after removing files");
        // Refused: the files reached the bound, and passed it by at most one batch (2 records).
        let mut files: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let bytes: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert!((8192..8192 + 2048).contains(&bytes), "{bytes} bytes");
        assert!(d.metric(tombstoned) < n as f64);
        assert!(d.log().contains("output directory full"), "{}", d.log());
        // A consumer takes every closed file (not the one being appended to).
        for f in &files[..files.len() - 1] {
            taken.push_str(&std::fs::read_to_string(f).unwrap());
            std::fs::remove_file(f).unwrap();
        }
    }
    assert!(refusals >= 1, "the bound was never reached");
    let mut all = taken;
    let mut rest: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    rest.sort();
    for f in &rest {
        all.push_str(&std::fs::read_to_string(f).unwrap());
    }
    let joined = scratch.path().join("all.jsonl");
    std::fs::write(&joined, &all).unwrap();
    let (ok, report) = verify(&joined);
    assert!(ok, "{report}");
    let records: Vec<serde_json::Value> = all
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got = ids(&records);
    for i in 0..n {
        assert!(got.contains(&format!("e-{i}")), "e-{i} lost");
    }
}

#[test]
fn an_unsealable_envelope_waits_for_room_in_a_full_dead_letter_directory_without_failing_its_worker(
) {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    // An operator has not yet removed an earlier dead letter that fills the directory's bound.
    let earlier = data.join("dead-letter").join("dl-earlier.json");
    std::fs::create_dir_all(earlier.parent().unwrap()).unwrap();
    std::fs::write(&earlier, vec![b' '; 5000]).unwrap();
    let cfg = scratch.path().join("spoolgate.toml");
    std::fs::write(
        &cfg,
        "[spool]\nrecord_bytes_max = 65536\n\
         [ingest]\nenvelope_bytes_max = 64512\n\
         [forward]\ndead_letter_bytes_max = 4096\nretry_initial_ms = 10\nretry_max_ms = 100\n\
         [gate.pii]\nemail = \"hash\"\n",
    )
    .unwrap();
    let d = Daemon::start_in(&data, &["--config", cfg.to_str().unwrap()], &[]);
    let big = "a@b.co ".repeat(8_000);
    for (id, text) in [("before", "First."), ("big", big.as_str())] {
        let r = d.post_json(&json!({"source": "svc", "tenant": "t", "id": id, "text": text}));
        assert_eq!(r.status, 202, "{}", r.text());
    }
    d.wait_metric(
        "spoolgate_forward_errors_total{kind=\"dead_letter_full\",sink=\"default\"}",
        |v| v >= 2.0,
    );
    assert_eq!(d.metric("spoolgate_worker_takeovers_total"), 0.0);
    assert_eq!(
        d.metric("spoolgate_gate_envelopes_total{outcome=\"unsealable\"}"),
        0.0
    );

    std::fs::remove_file(&earlier).unwrap();
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    assert_eq!(
        d.metric("spoolgate_gate_envelopes_total{outcome=\"unsealable\"}"),
        1.0
    );
    assert_eq!(d.metric("spoolgate_worker_takeovers_total"), 0.0);
    let ids: Vec<String> = file_sink_records(&d.data_dir)
        .iter()
        .map(|r| r["envelope"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["before".to_string()]);
}
