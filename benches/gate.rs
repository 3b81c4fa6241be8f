//! Gate throughput per core at 1 KiB, next to a baseline from the same process: SHA-256 of the
//! same texts (which the gate computes anyway for `text_hash`), so the ratio says how many
//! hashes' worth of work one classification costs on this machine today.
//!
//! Workload: 1 KiB English-like texts, one in three carrying PII (email, phone, payment card,
//! IBAN, IPv4, an AWS access key); 50 keyword rules and 20 regex rules, in two flavours:
//! *sparse* (domain terms that one text in five contains, as a typical rules file) and *dense*
//! (keywords built from the texts' own vocabulary, so nearly every text hits several rules: the
//! worst case for the keyword automaton); the default PII policy (`tag`) and `mask`. The
//! `tag` rows are run a second time on the same texts with one non-ASCII character each (an
//! em dash in the first sentence break after byte 300), as real text often has: a regex with
//! Unicode word boundaries cannot use the fast lazy DFA on such text.
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

/// The daemon's allocator (see Cargo.toml), so the figures match what `spoolgate serve` does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
            // One text in five names a domain term that the sparse rules look for.
            if n % 5 == 1 {
                let term = DOMAIN_TERMS[(next() as usize) % DOMAIN_TERMS.len()];
                t.replace_range(100..100 + term.len(), term);
            }
            t
        })
        .collect()
}

/// The same texts with one non-ASCII character each: the first sentence break after byte 300
/// becomes an em dash, cut back to `TEXT_BYTES` on a character boundary.
fn with_non_ascii(texts: &[String]) -> Vec<String> {
    texts
        .iter()
        .map(|t| {
            let mut t = match t[300..].find(". ") {
                Some(i) => {
                    let at = 300 + i;
                    format!("{} \u{2014} {}", &t[..at], &t[at + 2..])
                }
                None => format!("\u{2014}{}", &t[3..]),
            };
            let mut end = TEXT_BYTES.min(t.len());
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            t.truncate(end);
            t
        })
        .collect()
}

/// Terms the sparse rules match; absent from the filler vocabulary.
const DOMAIN_TERMS: &[&str] = &[
    " chargeback ",
    " subpoena ",
    " gdpr erasure ",
    " data breach ",
    " outage report ",
    " refund policy ",
    " fraud alert ",
    " legal hold ",
    " cancel subscription ",
    " INC-204817 ",
];

/// Dense rules: keywords made of the filler vocabulary itself, so nearly every text hits
/// several rules (the worst case for the keyword automaton, which can never skip ahead).
fn dense_rules() -> String {
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
    toml
}

/// Sparse rules: domain terms that one text in five contains, as in a typical rules file.
fn sparse_rules() -> String {
    let mut toml = String::new();
    for n in 0..50 {
        let term = DOMAIN_TERMS[n % DOMAIN_TERMS.len()].trim();
        toml.push_str(&format!(
            "[[rule]]\nname = \"kw{n}\"\nkeywords = [\"{term}\", \"kw-{n}-marker\"]\ntags = [\"t{n}\"]\n{}\n",
            if n % 5 == 0 { format!("intent = \"intent{n}\"\n") } else { String::new() }
        ));
    }
    for n in 0..20 {
        toml.push_str(&format!(
            "[[rule]]\nname = \"re{n}\"\nregex = ['\\bINC-{n}\\d{{4}}\\b']\ntags = [\"r{n}\"]\nlane = \"high\"\n\n"
        ));
    }
    toml
}

fn rules_file(dir: &std::path::Path, name: &str, toml: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
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
    // An optional filter (`cargo bench --bench gate -- sparse-tag`) runs only the matching rows,
    // for profiling one case.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let ascii: Vec<Envelope> = texts().iter().map(|t| envelope(t)).collect();
    let non_ascii: Vec<Envelope> = with_non_ascii(&texts())
        .iter()
        .map(|t| envelope(t))
        .collect();
    assert!(non_ascii
        .iter()
        .all(|e| !e.text.as_deref().unwrap_or("").is_ascii()));
    println!("| rules | policy | text | texts with PII | texts tagged | gate env/s/core | SHA-256 env/s | gate/SHA-256 |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    for (rules_name, toml) in [("sparse", sparse_rules()), ("dense", dense_rules())] {
        let rules = rules_file(dir.path(), rules_name, &toml);
        for (name, policy, text, envelopes) in [
            ("tag", PiiAction::Tag, "ASCII", &ascii),
            ("mask", PiiAction::Mask, "ASCII", &ascii),
            ("tag", PiiAction::Tag, "one non-ASCII char", &non_ascii),
        ] {
            if !format!("{rules_name}-{name}-{text}").contains(&filter) {
                continue;
            }
            let g = gate(&rules, policy);
            // Check the workload has the PII and rule hits it claims before timing it.
            let classified: Vec<Envelope> = envelopes
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    g.classify(&mut e);
                    e
                })
                .collect();
            let with_pii = classified.iter().filter(|e| !e.pii.is_empty()).count();
            let tagged = classified.iter().filter(|e| !e.tags.is_empty()).count();
            let mut gate_rates = Vec::new();
            let mut sha_rates = Vec::new();
            let mut ratios = Vec::new();
            for _ in 0..rounds {
                let gr = gate_round(&g, envelopes);
                let sr = sha_round(envelopes);
                gate_rates.push(gr);
                sha_rates.push(sr);
                ratios.push(gr / sr);
            }
            println!(
                "| {rules_name} | {name} | {text} | {with_pii}/{} | {tagged}/{} | {:.0} | {:.0} | {:.3} |",
                envelopes.len(),
                envelopes.len(),
                median(gate_rates),
                median(sha_rates),
                median(ratios)
            );
        }
    }
}
