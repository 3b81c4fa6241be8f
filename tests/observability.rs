//! Metrics tell the truth (exact values for a known workload), and rules reload while running.

mod common;

use common::{envelope, file_sink_records, Daemon};
use serde_json::json;

#[test]
fn a_known_workload_produces_exact_counter_values_across_a_restart_with_a_corrupt_record() {
    // Nothing is forwarded (so nothing sealed) before the restart: the corrupt record is then
    // lost with its frame. (A sealed one would be re-sent from its seal; fault_suite tests it.)
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

    let mut offsets = Vec::new();
    for batch in 0..2 {
        let items: Vec<_> = (0..5).map(|i| envelope(batch * 5 + i)).collect();
        let r = d.post_json(&json!(items));
        assert_eq!(r.status, 202);
        offsets.extend(
            r.json()["envelopes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["position"]["offset"].as_u64().unwrap()),
        );
    }
    for _ in 0..3 {
        assert_eq!(d.post_json(&json!({"text": "no source"})).status, 400);
    }
    assert_eq!(d.metric("spoolgate_ingest_envelopes_accepted_total"), 10.0);
    assert_eq!(
        d.metric("spoolgate_ingest_requests_total{code=\"202\",route=\"/v1/envelopes\"}"),
        2.0
    );
    assert_eq!(
        d.metric("spoolgate_ingest_requests_total{code=\"400\",route=\"/v1/envelopes\"}"),
        3.0
    );
    assert_eq!(d.metric("spoolgate_spool_poisoned"), 0.0);
    // Exact at once, not eventually: every scrape computes the backlog as of the scrape
    // rather than reading what the compaction loop last left (up to a second old).
    assert_eq!(d.metric("spoolgate_spool_pending_records"), 10.0);
    assert_eq!(d.metric("spoolgate_spool_segments"), 1.0);
    assert_eq!(d.terminate().code(), Some(0));

    // Corrupt envelope 5 on disk, then restart with the file sink.
    let seg = data.join("spool").join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[offsets[5] as usize + 20] ^= 0x08;
    std::fs::write(&seg, bytes).unwrap();
    d.args = vec!["--set".into(), "spool.preallocate=false".into()];
    d.restart();

    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= 9.0);
    assert_eq!(
        d.metric("spoolgate_recovery_corrupt_records_dropped_total"),
        1.0
    );
    assert!(d.metric("spoolgate_recovery_corrupt_bytes_dropped_total") > 0.0);
    assert_eq!(d.metric("spoolgate_replay_recovered_total"), 9.0);
    assert_eq!(
        d.metric("spoolgate_forward_records_total{sink=\"default\"}"),
        9.0
    );
    assert_eq!(d.metric("spoolgate_tombstones_written_total"), 9.0);
    d.wait_metric("spoolgate_spool_pending_records", |v| v == 0.0);
    assert_eq!(
        d.metric("spoolgate_ingest_envelopes_accepted_total"),
        0.0,
        "counters describe this process"
    );
    assert_eq!(file_sink_records(&d.data_dir).len(), 9);
    let text = d.get("/metrics").text();
    for family in [
        "spoolgate_build_info",
        "process_resident_memory_bytes",
        "spoolgate_spool_fsync_duration_seconds_bucket",
    ] {
        assert!(text.contains(family), "{family} missing");
    }
}

#[test]
fn with_forwarding_disabled_the_backlog_gauges_count_every_envelope_its_bytes_and_its_age() {
    let d = Daemon::start(&["--set", "forward.enabled=false"]);
    for batch in 0..2 {
        let items: Vec<_> = (0..5).map(|i| envelope(batch * 5 + i)).collect();
        assert_eq!(d.post_json(&json!(items)).status, 202);
    }
    assert_eq!(d.metric("spoolgate_spool_pending_records"), 10.0);
    // Ten msgpack envelopes of some 60 bytes each, none of which any consumer has read.
    let bytes = d.metric("spoolgate_spool_pending_bytes");
    assert!((400.0..2_000.0).contains(&bytes), "{bytes}");
    // Their age grows from their commit, though nothing put them in the ledger.
    d.wait_metric("spoolgate_spool_oldest_pending_age_seconds", |v| v > 0.0);
    // Nothing reads the ring, so it holds nothing rather than sitting full.
    assert_eq!(d.metric("spoolgate_ring_depth_records"), 0.0);
    assert_eq!(d.metric("spoolgate_ring_overflows_total"), 0.0);
}

#[test]
fn after_a_restart_the_chain_streams_gauge_counts_the_restored_heads_before_any_seal() {
    let mut d = Daemon::start(&[]);
    for tenant in ["a", "b", "c"] {
        let r = d.post_json(&json!({"source": "svc", "tenant": tenant, "text": "hello"}));
        assert_eq!(r.status, 202);
    }
    d.wait_metric("spoolgate_tombstones_written_total", |v| v >= 3.0);
    assert_eq!(d.metric("spoolgate_chain_streams"), 3.0);
    assert_eq!(d.terminate().code(), Some(0));
    // Without forwarding nothing is sealed in this process; the heads are still there.
    d.args = vec!["--set".into(), "forward.enabled=false".into()];
    d.restart();
    assert_eq!(d.metric("spoolgate_chain_streams"), 3.0);
}

fn write_rules(path: &std::path::Path, body: &str) {
    // Editors replace files by rename; do the same.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn tags_of(d: &Daemon, id: &str) -> Vec<String> {
    let id = id.to_string();
    common::wait_for(&format!("{id} delivered"), || {
        file_sink_records(&d.data_dir)
            .into_iter()
            .find(|r| r["envelope"]["id"] == id.as_str())
            .map(|r| {
                r["envelope"]["tags"]
                    .as_array()
                    .map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default()
            })
    })
}

#[test]
fn the_rules_file_hot_reloads_and_an_invalid_one_is_refused_keeping_the_old_rules() {
    let scratch = tempfile::tempdir().unwrap();
    let rules = scratch.path().join("rules.toml");
    write_rules(
        &rules,
        "[[rule]]\nname = \"a\"\nkeywords = [\"alpha\"]\ntags = [\"v1\"]\n",
    );
    let d = Daemon::start(&["--set", &format!("gate.rules_path=\"{}\"", rules.display())]);
    assert_eq!(
        d.post_json(&json!({"source": "s", "id": "one", "text": "alpha"}))
            .status,
        202
    );
    assert_eq!(tags_of(&d, "one"), vec!["v1"]);

    write_rules(
        &rules,
        "[[rule]]\nname = \"a\"\nkeywords = [\"alpha\"]\ntags = [\"v2\"]\n",
    );
    d.wait_metric("spoolgate_gate_rules_reloads_total{result=\"ok\"}", |v| {
        v >= 1.0
    });
    let mut probe = 0;
    common::wait_for("the new rules to apply", || {
        probe += 1;
        let id = format!("probe-{probe}");
        assert_eq!(
            d.post_json(&json!({"source": "s", "id": id, "text": "alpha"}))
                .status,
            202
        );
        (tags_of(&d, &id) == vec!["v2"]).then_some(())
    });

    write_rules(&rules, "[[rule]]\nname = \"a\"\nregex = [\"(\"]\n");
    d.wait_metric(
        "spoolgate_gate_rules_reloads_total{result=\"error\"}",
        |v| v >= 1.0,
    );
    assert_eq!(
        d.post_json(&json!({"source": "s", "id": "three", "text": "alpha"}))
            .status,
        202
    );
    assert_eq!(
        tags_of(&d, "three"),
        vec!["v2"],
        "the previous rules stay in force"
    );
    assert!(d.log().contains("rules reload refused"));
}
