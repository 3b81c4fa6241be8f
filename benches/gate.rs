//! Gate throughput per core at 1 KiB, next to a baseline from the same process: SHA-256 of the
//! same texts (which the gate computes anyway for `text_hash`), so the ratio says how many
//! hashes' worth of work one classification costs on this machine today.
//!
//! Workload: 1 KiB English-like texts, one in three carrying PII (email, phone, payment card,
//! IBAN, IPv4, an AWS access key); a rules file of 50 keyword rules and 20 regex rules; the
//! default PII policy (`tag`) and, in a second row, `mask` for every kind.
//!
//! Run: `cargo bench --bench gate` (or `scripts/bench-gate.sh`). Each figure is the median of
//! `SPOOLGATE_BENCH_ROUNDS` (default 5) rounds, alternating gate and baseline.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use spoolgate::config::{GateConfig, PiiAction};
use spoolgate::envelope::Envelope;
use spoolgate::gate::Gate;
use spoolgate::metrics::Metrics;

const TEXT_BYTES: usize = 1024;
const TEXTS: usize = 3000;
const ROUND_DURATION: Duration = Duration::from_millis(1500);

const WORDS: &[&str] = &[
    "the",
    "order",
    "customer",
    "shipment",
    "delivered",
    "late",
    "agent",
    "reported",
    "service",
    "account",
    "update",
    "please",
    "review",
    "system",
    "error",
    "ticket",
    "request",
    "team",
    "warehouse",
    "invoice",
    "payment",
    "status",
    "pending",
    "network",
    "latency",
    "queue",
    "deploy",
    "rollback",
    "config",
    "cluster",
    "node",
    "storage",
    "backup",
    "restore",
    "user",
    "login",
    "session",
    "token",
    "renewal",
    "contract",
    "support",
    "priority",
    "escalate",
];

const PII_SNIPPETS: &[&str] = &[
    "Contact jane.doe@example.com about it.",
    "Call +1 415 555 0132 before noon.",
    "Card 4111 1111 1111 1111 was charged twice.",
    "Transfer to GB82 WEST 1234 5698 7654 32 today.",
    "The host 192.168.10.42 stopped answering.",
    "Key AKIAIOSFODNN7EXAMPLE leaked in the log.",
];

/// Deterministic texts: a tiny xorshift so every run classifies the same bytes.
fn texts() -> Vec<String> {
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..TEXTS)
        .map(|n| {
            let mut t = String::with_capacity(TEXT_BYTES + 64);
            let mut words_in_sentence = 0;
            // One text in three gets one PII sentence half-way through.
            let mut pii_pending = n % 3 == 0;
            while t.len() < TEXT_BYTES {
                if pii_pending && t.len() > TEXT_BYTES / 2 && words_in_sentence == 0 {
                    t.push_str(PII_SNIPPETS[(next() as usize) % PII_SNIPPETS.len()]);
                    t.push(' ');
                    pii_pending = false;
                }
                let w = WORDS[(next() as usize) % WORDS.len()];
                t.push_str(w);
                words_in_sentence += 1;
                if words_in_sentence > 8 + (next() % 8) as usize {
                    t.push_str(". ");
                    words_in_sentence = 0;
                } else {
                    t.push(' ');
                }
            }
            t.truncate(TEXT_BYTES);
            t
        })
        .collect()
}

fn rules_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut toml = String::new();
    for n in 0..50 {
        let a = WORDS[n % WORDS.len()];
        let b = WORDS[(n * 7 + 3) % WORDS.len()];
        toml.push_str(&format!(
            "[[rule]]\nname = \"kw{n}\"\nkeywords = [\"{a} {b}\", \"kw-{n}-marker\"]\ntags = [\"t{n}\"]\n{}\n",
            if n % 5 == 0 { format!("intent = \"intent{n}\"\n") } else { String::new() }
        ));
    }
    for n in 0..20 {
        toml.push_str(&format!(
            "[[rule]]\nname = \"re{n}\"\nregex = ['(?i)\\b(ticket|order|invoice)[ #-]*{n}\\d{{3}}\\b']\ntags = [\"r{n}\"]\nlane = \"high\"\n\n"
        ));
    }
    let path = dir.join("rules.toml");
    std::fs::write(&path, toml).expect("write rules");
    path
}

fn gate(rules: &std::path::Path, policy: PiiAction) -> Gate {
    let config = GateConfig {
        rules_path: Some(rules.to_path_buf()),
        pii_default: policy,
        pii: BTreeMap::new(),
        ..GateConfig::default()
    };
    Gate::new(&config, Arc::new(Metrics::new())).expect("gate")
}

fn envelope(text: &str) -> Envelope {
    Envelope {
        version: 1,
        id: "bench".into(),
        source: "bench".into(),
        text: Some(text.to_string()),
        ts_ms: 1_700_000_000_000,
        ..Default::default()
    }
}

/// Envelopes per second for one core: classify (including the envelope clone it works on).
fn gate_round(g: &Gate, envelopes: &[Envelope]) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < ROUND_DURATION {
        for e in envelopes {
            let mut e = e.clone();
            g.classify(&mut e);
            black_box(&e);
        }
        n += envelopes.len() as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Baseline: SHA-256 of the same texts, with the same clone, per second.
fn sha_round(envelopes: &[Envelope]) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < ROUND_DURATION {
        for e in envelopes {
            let e = e.clone();
            black_box(Sha256::digest(e.text.as_deref().unwrap_or("").as_bytes()));
        }
        n += envelopes.len() as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    // Only `cargo bench` (which passes `--bench`) measures; under `cargo test` this is a build
    // check.
    if !std::env::args().any(|a| a == "--bench") {
        println!("gate: run with `cargo bench --bench gate` to measure");
        return;
    }
    let rounds: usize = std::env::var("SPOOLGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = rules_file(dir.path());
    let envelopes: Vec<Envelope> = texts().iter().map(|t| envelope(t)).collect();

    // Sanity before timing: the workload has the PII and rule hits it claims.
    let tagger = gate(&rules, PiiAction::Tag);
    let with_pii = envelopes
        .iter()
        .filter(|e| {
            let mut e = (*e).clone();
            tagger.classify(&mut e);
            !e.pii.is_empty()
        })
        .count();
    let tagged = envelopes
        .iter()
        .filter(|e| {
            let mut e = (*e).clone();
            tagger.classify(&mut e);
            !e.tags.is_empty()
        })
        .count();
    println!(
        "workload: {} texts of {TEXT_BYTES} B, {with_pii} with PII, {tagged} with rule tags; 50 keyword + 20 regex rules",
        envelopes.len()
    );

    println!("| policy | gate env/s/core | SHA-256 env/s | gate/SHA-256 |");
    println!("|---|---:|---:|---:|");
    for (name, policy) in [("tag", PiiAction::Tag), ("mask", PiiAction::Mask)] {
        let g = gate(&rules, policy);
        let mut gate_rates = Vec::new();
        let mut sha_rates = Vec::new();
        let mut ratios = Vec::new();
        for _ in 0..rounds {
            let gr = gate_round(&g, &envelopes);
            let sr = sha_round(&envelopes);
            gate_rates.push(gr);
            sha_rates.push(sr);
            ratios.push(gr / sr);
        }
        println!(
            "| {name} | {:.0} | {:.0} | {:.3} |",
            median(gate_rates),
            median(sha_rates),
            median(ratios)
        );
    }
}
