//! The ingest API as a client sees it: the real binary, real HTTP.

mod common;

use common::{envelope, request, Daemon, SMALL_SEGMENTS};
use serde_json::json;

#[test]
fn a_json_object_is_accepted_with_its_id_slot_and_position() {
    let d = Daemon::start(&[]);
    let r = d.post_json(&json!({"source": "svc", "id": "one", "text": "hi"}));
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(body["accepted"], 1);
    let e = &body["envelopes"][0];
    assert_eq!(e["id"], "one");
    assert_eq!(e["slot"], u64::from(spoolgate::slots::slot_of("svc")));
    assert!(e["position"]["segment"].as_u64().unwrap() >= 1);
    assert_eq!(e["duplicate"], false);
}

#[test]
fn a_json_array_ndjson_and_msgpack_are_all_accepted() {
    let d = Daemon::start(&[]);
    let r = d.post_json(&json!([envelope(1), envelope(2)]));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["accepted"], 2);

    let nd = format!("{}\n{}\n", envelope(3), envelope(4));
    let r = d.post("application/x-ndjson", nd.as_bytes());
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["accepted"], 2);

    let one = rmp_serde::to_vec_named(&envelope(5)).unwrap();
    let r = d.post("application/msgpack", &one);
    assert_eq!(r.status, 202, "{}", r.text());
    let many = rmp_serde::to_vec_named(&json!([envelope(6), envelope(7), envelope(8)])).unwrap();
    let r = d.post("application/msgpack", &many);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["accepted"], 3);
    assert_eq!(d.metric("spoolgate_ingest_envelopes_accepted_total"), 8.0);
}

#[test]
fn a_bad_item_at_index_57_is_named_and_nothing_is_written() {
    let d = Daemon::start(&[]);
    let appends_before = d.metric("spoolgate_spool_appends_total");
    let mut items: Vec<serde_json::Value> = (0..100).map(envelope).collect();
    items[57] = json!({"id": "no-source", "text": "x"});
    let r = d.post_json(&json!(items));
    assert_eq!(r.status, 400);
    let body = r.json();
    assert_eq!(body["error"], "invalid_envelope");
    assert_eq!(body["index"], 57);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("`source` is required"));
    assert_eq!(d.metric("spoolgate_spool_appends_total"), appends_before);
    // None of the 99 valid ids was remembered either: all of them can be sent now.
    items[57] = envelope(57);
    let r = d.post_json(&json!(items));
    assert_eq!(r.status, 202);
    assert!(r.json()["envelopes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["duplicate"] == false));
}

#[test]
fn every_client_error_has_its_status_and_a_reason() {
    let d = Daemon::start(&[
        "--set",
        "ingest.body_bytes_max=4096",
        "--set",
        "ingest.envelope_bytes_max=1024",
    ]);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "application/json",
            b"{not json".to_vec(),
            400,
            "malformed_body",
        ),
        ("application/json", b"42".to_vec(), 400, "malformed_body"),
        ("application/json", b"[]".to_vec(), 400, "empty_batch"),
        (
            "application/json",
            br#"{"source": 5}"#.to_vec(),
            400,
            "invalid_envelope",
        ),
        (
            "application/json",
            br#"{"source":"s","priority":"urgent"}"#.to_vec(),
            400,
            "invalid_envelope",
        ),
        ("application/msgpack", vec![0xc1], 400, "malformed_body"),
        (
            "text/plain",
            b"hello".to_vec(),
            415,
            "unsupported_media_type",
        ),
        ("application/json", vec![b' '; 5000], 413, "body_too_large"),
        (
            "application/json",
            format!(r#"{{"source":"s","text":"{}"}}"#, "x".repeat(2000)).into_bytes(),
            413,
            "envelope_too_large",
        ),
        (
            // About 650 bytes encoded, but each -9 is the byte 0xF7, stored as two: over 1024
            // as the spool stores it (spool-format.md §3).
            "application/json",
            format!(
                r#"{{"source":"s","meta":{{"n":[{}]}}}}"#,
                ["-9"; 600].join(",")
            )
            .into_bytes(),
            413,
            "envelope_too_large",
        ),
    ];
    for (ct, body, status, code) in cases {
        let r = d.post(ct, &body);
        assert_eq!(
            r.status,
            status,
            "{ct} {:?}: {}",
            String::from_utf8_lossy(&body[..body.len().min(40)]),
            r.text()
        );
        assert_eq!(r.json()["error"], code, "{}", r.text());
        assert!(!r.json()["message"].as_str().unwrap_or("").is_empty());
    }
    let r = request(&d.ingest, "GET", "/v1/envelopes", &[], b"").unwrap();
    assert_eq!(r.status, 405);
    let r = request(&d.ingest, "POST", "/nope", &[], b"").unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(d.metric("spoolgate_spool_appends_total"), 0.0);
}

#[test]
fn a_request_that_cannot_fit_one_segment_is_refused_with_413_and_nothing_is_written() {
    // 1 MiB segments and the default 16 MiB body bound: a request is written as one group in
    // one segment, so 30 envelopes of 50 KB cannot be taken whole.
    let d = Daemon::start(&SMALL_SEGMENTS);
    let text = "y".repeat(50_000);
    let batch = |n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| json!({"source": "s", "id": format!("big-{i}"), "text": text}))
            .collect()
    };
    let r = d.post_json(&json!(batch(30)));
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "request_too_large", "{}", r.text());
    let message = r.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("spool.segment_bytes_max"), "{message}");
    assert_eq!(d.metric("spoolgate_spool_appends_total"), 0.0);
    // The same envelopes in smaller requests are taken.
    let r = d.post_json(&json!(batch(10)));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(d.metric("spoolgate_spool_appends_total"), 10.0);
}

#[test]
fn with_tokens_on_a_missing_token_is_401_a_wrong_one_403_and_a_foreign_tenant_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let cfg = scratch.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[[ingest.tokens]]\ntoken = \"0123456789abcdef-acme\"\ntenant = \"acme\"\n",
    )
    .unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()]);
    let body = json!({"source": "s"}).to_string();
    let r = d.post("application/json", body.as_bytes());
    assert_eq!(r.status, 401);
    let r = request(
        &d.ingest,
        "POST",
        "/v1/envelopes",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer wrong-token-wrong-token"),
        ],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 403);
    let ok = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer 0123456789abcdef-acme"),
    ];
    let r = request(&d.ingest, "POST", "/v1/envelopes", &ok, body.as_bytes()).unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let foreign = json!({"source": "s", "tenant": "other"}).to_string();
    let r = request(&d.ingest, "POST", "/v1/envelopes", &ok, foreign.as_bytes()).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("bound to tenant"), "{}", r.text());
}

#[test]
fn a_retried_id_is_answered_with_its_original_position_even_after_a_restart() {
    let mut d = Daemon::start(&[]);
    let first = d.post_json(&json!({"source": "s", "id": "retry-me"}));
    assert_eq!(first.status, 202);
    let original = first.json()["envelopes"][0]["position"].clone();
    let again = d.post_json(&json!({"source": "s", "id": "retry-me"}));
    assert_eq!(again.json()["envelopes"][0]["position"], original);
    assert_eq!(again.json()["envelopes"][0]["duplicate"], true);
    d.kill9();
    d.restart();
    let after = d.post_json(&json!({"source": "s", "id": "retry-me"}));
    assert_eq!(after.status, 202);
    assert_eq!(after.json()["envelopes"][0]["position"], original);
    assert_eq!(after.json()["envelopes"][0]["duplicate"], true);
    assert_eq!(d.metric("spoolgate_ingest_dedup_hits_total"), 1.0);
}

#[test]
fn an_id_spoolgate_generated_sent_back_by_a_client_is_not_deduplicated_before_or_after_a_restart() {
    // A restart cannot tell such an id from one spoolgate generated (which is never indexed),
    // so it is not indexed while running either: the same answer before and after.
    let mut d = Daemon::start(&[]);
    let generated = spoolgate::ingest::ids::generate(spoolgate::ingest::now_ms());
    let post = |d: &Daemon| {
        let r = d.post_json(&json!({"source": "s", "id": generated}));
        assert_eq!(r.status, 202, "{}", r.text());
        let item = r.json()["envelopes"][0].clone();
        (item["duplicate"].clone(), item["position"].clone())
    };
    let (dup1, at1) = post(&d);
    let (dup2, at2) = post(&d);
    assert_eq!((dup1, dup2), (json!(false), json!(false)));
    assert_ne!(at1, at2);
    d.kill9();
    d.restart();
    let (dup3, at3) = post(&d);
    assert_eq!(dup3, json!(false));
    assert_ne!(at3, at2);
    assert_eq!(d.metric("spoolgate_ingest_dedup_hits_total"), 0.0);
}

#[test]
fn envelopes_without_an_id_do_not_take_the_places_of_client_ids_in_the_dedup_index() {
    // Room for two ids. Generated ids cannot be retried (a retry gets a new one), so the ten
    // id-less envelopes must not evict the client's ids.
    let d = Daemon::start(&["--set", "ingest.dedup_entries_max=2"]);
    assert_eq!(
        d.post_json(&json!({"source": "s", "id": "kept"})).status,
        202
    );
    let anonymous: Vec<_> = (0..10).map(|_| json!({"source": "s"})).collect();
    let r = d.post_json(&json!(anonymous));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["accepted"], 10);
    let again = d.post_json(&json!({"source": "s", "id": "kept"}));
    assert_eq!(again.json()["envelopes"][0]["duplicate"], true);
    // The bound still holds for client ids: two more evict "kept".
    for id in ["x", "y"] {
        assert_eq!(d.post_json(&json!({"source": "s", "id": id})).status, 202);
    }
    let evicted = d.post_json(&json!({"source": "s", "id": "kept"}));
    assert_eq!(evicted.json()["envelopes"][0]["duplicate"], false);
}

#[test]
fn after_a_restart_envelopes_without_an_id_still_do_not_take_the_places_of_client_ids() {
    // The index is rebuilt from the spool at start-up, where the records do not say whose id
    // they carry: the generated ids' check value is what keeps these ten from evicting "kept".
    let mut d = Daemon::start(&["--set", "ingest.dedup_entries_max=2"]);
    let first = d.post_json(&json!({"source": "s", "id": "kept"}));
    assert_eq!(first.status, 202);
    let anonymous: Vec<_> = (0..10).map(|_| json!({"source": "s"})).collect();
    assert_eq!(d.post_json(&json!(anonymous)).status, 202);
    d.kill9();
    d.restart();
    // Sampled once before ingest opens: the index holds the one client id, not the ten.
    assert_eq!(d.metric("spoolgate_ingest_dedup_entries"), 1.0);
    let again = d.post_json(&json!({"source": "s", "id": "kept"}));
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["envelopes"][0]["duplicate"], true);
    assert_eq!(
        again.json()["envelopes"][0]["position"],
        first.json()["envelopes"][0]["position"]
    );
}

#[test]
fn a_new_stream_beyond_streams_max_is_refused_with_422_and_the_bound_survives_a_restart() {
    let mut d = Daemon::start(&["--set", "ingest.streams_max=2"]);
    assert_eq!(d.post_json(&json!({"source": "a"})).status, 202);
    assert_eq!(
        d.post_json(&json!({"source": "x", "tenant": "b"})).status,
        202
    );
    // The forwarding pipeline appends seals and tombstones on its own, so "nothing written" is
    // judged by what ingest accepted.
    assert_eq!(d.metric("spoolgate_ingest_envelopes_accepted_total"), 2.0);
    let r = d.post_json(&json!([{"source": "a"}, {"source": "c"}]));
    assert_eq!(r.status, 422);
    let body = r.json();
    assert_eq!(body["error"], "stream_limit");
    assert_eq!(body["index"], 1);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("ingest.streams_max (2)"));
    assert_eq!(d.metric("spoolgate_ingest_envelopes_accepted_total"), 2.0);
    assert_eq!(
        d.metric("spoolgate_ingest_rejected_total{reason=\"streams\"}"),
        1.0
    );
    // A tenant is the stream: another source of tenant b is not a new stream.
    assert_eq!(
        d.post_json(&json!({"source": "y", "tenant": "b"})).status,
        202
    );
    d.kill9();
    d.restart();
    assert_eq!(d.post_json(&json!({"source": "c"})).status, 422);
    assert_eq!(d.post_json(&json!({"source": "a"})).status, 202);
    assert_eq!(
        d.post_json(&json!({"source": "z", "tenant": "b"})).status,
        202
    );
}

#[test]
fn a_retry_answered_from_the_dedup_index_makes_no_stream_whatever_source_it_names() {
    let d = Daemon::start(&["--set", "ingest.streams_max=2"]);
    assert_eq!(d.post_json(&json!({"source": "a", "id": "x"})).status, 202);
    // Retries of id x under other sources write nothing, so they are no new streams.
    for source in ["b", "c", "d"] {
        let r = d.post_json(&json!({"source": source, "id": "x"}));
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(r.json()["envelopes"][0]["duplicate"], true);
    }
    assert_eq!(d.post_json(&json!({"source": "real"})).status, 202);
    assert_eq!(d.post_json(&json!({"source": "third"})).status, 422);
    // The refused request released its id: written under a stream that exists, it is new.
    assert_eq!(
        d.post_json(&json!({"source": "third", "id": "y"})).status,
        422
    );
    let r = d.post_json(&json!({"source": "real", "id": "y"}));
    assert_eq!(r.json()["envelopes"][0]["duplicate"], false, "{}", r.text());
}

#[test]
fn a_nan_in_msgpack_meta_is_refused_with_its_index_not_kept_as_null() {
    let d = Daemon::start(&[]);
    let item = |float: &[u8]| {
        let mut b = b"\x82\xa6source\xa1s\xa4meta\x81\xa5ratio".to_vec();
        b.extend_from_slice(float);
        b
    };
    let mut nan = vec![0xcb];
    nan.extend_from_slice(&f64::NAN.to_bits().to_be_bytes());
    let mut body = vec![0x92];
    body.extend(item(&[0xcb, 0x3f, 0xe0, 0, 0, 0, 0, 0, 0]));
    body.extend(item(&nan));
    let r = d.post("application/msgpack", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["index"], 1);
    assert!(r.json()["message"].as_str().unwrap().contains("NaN"));
    assert_eq!(d.metric("spoolgate_ingest_envelopes_accepted_total"), 0.0);
}

#[test]
fn a_body_dense_with_values_is_charged_for_what_decoding_would_build_and_refused_before_it() {
    let d = Daemon::start(&[
        "--set",
        "ingest.body_bytes_max=2097152",
        "--set",
        "ingest.inflight_bytes_max=16777216",
    ]);
    // 2 MiB of msgpack nils in `meta`: 2 million values, which as a decoded tree would take
    // some 128 MB, eight times the whole in-flight budget.
    let nils = 2 * 1024 * 1024 - 32;
    let mut body = b"\x82\xa6source\xa1s\xa4meta\x81\xa1a\xdd".to_vec();
    body.extend_from_slice(&(nils as u32).to_be_bytes());
    body.extend(std::iter::repeat_n(0xc0u8, nils));
    let r = d.post("application/msgpack", &body);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "too_many_values");
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("ingest.inflight_bytes_max"));
    // A batch of ordinary envelopes of the same size is charged little more than its bytes.
    let batch: Vec<serde_json::Value> = (0..1000)
        .map(|n| json!({"source": "s", "text": "x".repeat(2000), "meta": {"n": n}}))
        .collect();
    let r = d.post_json(&json!(batch));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        d.metric("spoolgate_ingest_envelopes_accepted_total"),
        1000.0
    );
}

/// Posts 50 KB envelopes until the spool occupies two 1 MiB segments on disk: the second one
/// is prepared (preallocated) once the first is half full, and counts from then on. A quota
/// under two segments may refuse a post of the fill itself (the sampler saw the second segment
/// between two posts): that ends the fill too. Returns how many posts the quota refused.
fn fill_first_segment(d: &Daemon) -> u32 {
    let text = "y".repeat(50_000);
    for n in 0..40 {
        let r = d.post_json(&json!({"source": "fill", "id": format!("fill-{n}"), "text": text}));
        if r.status == 429 && r.json()["reason"] == "quota" {
            return 1;
        }
        assert_eq!(r.status, 202, "{}", r.text());
        if d.metric("spoolgate_spool_disk_bytes") >= 2.0 * 1048576.0 {
            return 0;
        }
    }
    d.wait_metric("spoolgate_spool_disk_bytes", |v| v >= 2.0 * 1048576.0);
    0
}

/// A sink that never confirms, so nothing is compacted away while a test fills the spool.
fn held_sink_config(scratch: &std::path::Path) -> (common::TestSink, String) {
    let sink = common::TestSink::start(|_| (503, "hold".into()));
    let cfg = sink.config_file(scratch, "");
    (sink, cfg.to_str().unwrap().to_string())
}

/// A daemon with small segments, a sink that never confirms and the given spool quotas.
fn start_with_quotas(
    scratch: &std::path::Path,
    soft_bytes: u64,
    hard_bytes: u64,
) -> (common::TestSink, Daemon) {
    let (sink, cfg) = held_sink_config(scratch);
    let soft = format!("spool.quota_soft_bytes={soft_bytes}");
    let hard = format!("spool.quota_hard_bytes={hard_bytes}");
    let d = Daemon::start(
        &[
            &["--config", &cfg][..],
            &SMALL_SEGMENTS,
            &["--set", &soft, "--set", &hard],
        ]
        .concat(),
    );
    (sink, d)
}

#[test]
fn above_the_spool_quota_ingest_answers_429_with_retry_after_and_the_limit() {
    // Segments are 1 MiB (preallocated); the hard quota of 1.5 MiB trips once a second exists.
    let scratch = tempfile::tempdir().unwrap();
    let (_sink, d) = start_with_quotas(scratch.path(), 1_572_864, 1_572_864);
    assert_eq!(d.metric("spoolgate_ready"), 1.0);
    let refused_while_filling = fill_first_segment(&d);
    let r = d.post_json(&envelope(2));
    assert_eq!(r.status, 429, "{}", r.text());
    let body = r.json();
    assert_eq!(body["reason"], "quota");
    assert_eq!(body["limit"], "spool.quota_hard_bytes");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(
        d.metric("spoolgate_ingest_rejected_total{reason=\"quota\"}"),
        f64::from(1 + refused_while_filling)
    );
    // Readiness reports the hard watermark too, and so does its gauge, for alerting.
    assert_eq!(d.get("/readyz").status, 503);
    assert_eq!(d.metric("spoolgate_ready"), 0.0);
}

#[test]
fn above_the_soft_quota_only_low_priority_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let (_sink, d) = start_with_quotas(scratch.path(), 1_572_864, 1_073_741_824);
    assert_eq!(fill_first_segment(&d), 0, "no hard quota to trip");
    let low = d.post_json(&json!({"source": "s", "priority": "low"}));
    assert_eq!(low.status, 429);
    assert_eq!(low.json()["reason"], "priority");
    let normal = d.post_json(&json!({"source": "s", "priority": "normal"}));
    assert_eq!(normal.status, 202);
}

#[test]
fn sigterm_exits_zero_and_everything_acknowledged_survives() {
    let mut d = Daemon::start(&[]);
    let ingest = d.ingest.clone();
    // Requests race the shutdown; each one either got 202 (and must survive) or was refused.
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let ingest = ingest.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for n in 0..200 {
                    let id = format!("t{t}-{n}");
                    let body = json!({"source": "s", "id": id}).to_string();
                    match request(
                        &ingest,
                        "POST",
                        "/v1/envelopes",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    ) {
                        Ok(r) if r.status == 202 => acked.push(id),
                        Ok(r) => assert!(r.status == 503, "unexpected {}: {}", r.status, r.text()),
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect();
    d.wait_metric("spoolgate_ingest_envelopes_accepted_total", |v| v >= 20.0);
    let status = d.terminate();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    let acked: Vec<String> = senders
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(!acked.is_empty());
    d.restart();
    // Every acknowledged id is in the spool: sending it again is a dedup hit.
    for id in &acked {
        let r = d.post_json(&json!({"source": "s", "id": id}));
        assert_eq!(
            r.json()["envelopes"][0]["duplicate"],
            true,
            "{id} was acknowledged but is missing"
        );
    }
}

#[test]
fn a_client_sending_headers_byte_by_byte_is_cut_off_by_the_header_timeout() {
    use std::io::{Read, Write};
    let d = Daemon::start(&["--set", "ingest.header_read_timeout_ms=300"]);
    let mut slow = std::net::TcpStream::connect(&d.ingest).unwrap();
    slow.set_read_timeout(Some(common::DEADLINE)).unwrap();
    // Dribble a header that never ends, one byte every 20 ms: a server whose timeout started
    // again at every byte read would keep it open for ever. The pauses are the slow client
    // under test, not a wait for the server.
    slow.write_all(b"POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dribbler = {
        let mut slow = slow.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if slow.write_all(b"a").is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    let mut buf = Vec::new();
    let read = slow.read_to_end(&mut buf);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    dribbler.join().unwrap();
    match read {
        // Closed by the server (possibly after a 408 response).
        Ok(_) => assert!(
            buf.is_empty() || buf.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&buf)
        ),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server never closed the stalled connection"
        ),
    }
    // Other clients were served all along.
    assert_eq!(d.post_json(&envelope(1)).status, 202);
}

#[test]
fn a_request_being_handled_is_not_cut_by_the_idle_timeout() {
    use std::io::{Read, Write};
    let d = Daemon::start(&["--set", "ingest.idle_timeout_ms=100"]);
    let body = envelope(1).to_string().into_bytes();
    let mut paused = std::net::TcpStream::connect(&d.ingest).unwrap();
    paused.set_read_timeout(Some(common::DEADLINE)).unwrap();
    write!(
        paused,
        "POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    paused.write_all(&body[..10]).unwrap();
    // The handler has taken the body's bytes from the budget: the request is being handled.
    d.wait_metric("spoolgate_ingest_inflight_bytes", |v| {
        v == body.len() as f64
    });
    // A connection opened after that which sends nothing is cut by the idle timeout, so the
    // request's body has now paused for longer than the idle timeout as well.
    let _idle = std::net::TcpStream::connect(&d.ingest).unwrap();
    d.wait_metric("spoolgate_ingest_connections_timed_out_total", |v| v >= 1.0);
    // Its body has `ingest.body_read_timeout_ms` (15 s by default), and it is answered.
    paused
        .write_all(&body[10..])
        .expect("the daemon closed a connection whose request it was handling");
    let mut response = Vec::new();
    paused
        .read_to_end(&mut response)
        .expect("the daemon reset a connection whose request it was handling");
    assert!(
        response.starts_with(b"HTTP/1.1 202"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    // Only the connection that sent nothing timed out.
    assert_eq!(
        d.metric("spoolgate_ingest_connections_timed_out_total"),
        1.0
    );
}

/// A JSON envelope body of exactly `len` bytes.
fn body_of_len(n: usize, len: usize) -> Vec<u8> {
    let bare =
        serde_json::to_vec(&json!({"source": "s", "id": format!("big-{n}"), "text": ""})).unwrap();
    serde_json::to_vec(
        &json!({"source": "s", "id": format!("big-{n}"), "text": "x".repeat(len - bare.len())}),
    )
    .unwrap()
}

#[test]
fn a_chunked_body_keeps_only_its_size_of_the_budget_once_read() {
    use std::io::{Read, Write};
    // The whole budget is one body's bound: a chunked body takes all of it until its size is
    // known, and what decoding needs must then still fit.
    let d = Daemon::start(&[
        "--set",
        "ingest.envelope_bytes_max=50000",
        "--set",
        "ingest.body_bytes_max=65536",
        "--set",
        "ingest.inflight_bytes_max=65536",
    ]);
    let body = envelope(1).to_string().into_bytes();
    let mut chunked = std::net::TcpStream::connect(&d.ingest).unwrap();
    chunked.set_read_timeout(Some(common::DEADLINE)).unwrap();
    chunked
        .write_all(
            b"POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
              Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap();
    chunked
        .write_all(format!("{:x}\r\n", body.len()).as_bytes())
        .unwrap();
    chunked.write_all(&body).unwrap();
    chunked.write_all(b"\r\n").unwrap();
    // Until the last chunk, its size is unknown: it holds the whole bound.
    d.wait_metric("spoolgate_ingest_inflight_bytes", |v| v == 65_536.0);
    chunked.write_all(b"0\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    chunked.read_to_end(&mut raw).unwrap();
    assert!(
        raw.starts_with(b"HTTP/1.1 202"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    d.wait_metric("spoolgate_ingest_inflight_bytes", |v| v == 0.0);
    assert_eq!(
        d.metric("spoolgate_ingest_rejected_total{reason=\"inflight_bytes\"}"),
        0.0
    );
}

#[test]
fn request_bodies_past_the_inflight_budget_get_429_until_the_held_ones_finish() {
    use std::io::{Read, Write};
    let d = Daemon::start(&[
        "--set",
        "ingest.envelope_bytes_max=50000",
        "--set",
        "ingest.body_bytes_max=50000",
        "--set",
        "ingest.inflight_bytes_max=65536",
    ]);
    // A client declares 40,000 bytes and sends only part of them: its bytes stay taken.
    let held = body_of_len(1, 40_000);
    let mut slow = std::net::TcpStream::connect(&d.ingest).unwrap();
    slow.set_read_timeout(Some(common::DEADLINE)).unwrap();
    slow.write_all(
        format!(
            "POST /v1/envelopes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            held.len()
        )
        .as_bytes(),
    )
    .unwrap();
    slow.write_all(&held[..1_000]).unwrap();
    d.wait_metric("spoolgate_ingest_inflight_bytes", |v| v == 40_000.0);

    // 40,000 + 30,000 would pass 65,536: refused before its body is read, with the limit named.
    let second = body_of_len(2, 30_000);
    let r = d.post("application/json", &second);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let body = r.json();
    assert_eq!(body["reason"], "inflight_bytes");
    assert_eq!(body["limit"], "ingest.inflight_bytes_max");
    assert_eq!(body["limit_bytes"], 65_536);
    assert_eq!(body["current_bytes"], 40_000);
    assert_eq!(
        d.metric("spoolgate_ingest_rejected_total{reason=\"inflight_bytes\"}"),
        1.0
    );
    // A smaller request still fits beside the held one.
    assert_eq!(d.post_json(&envelope(3)).status, 202);

    // The held request completes and gives its bytes back; the refused one now goes through.
    slow.write_all(&held[1_000..]).unwrap();
    let mut raw = Vec::new();
    slow.read_to_end(&mut raw).unwrap();
    assert!(
        raw.starts_with(b"HTTP/1.1 202"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    d.wait_metric("spoolgate_ingest_inflight_bytes", |v| v == 0.0);
    assert_eq!(d.post("application/json", &second).status, 202);
}
