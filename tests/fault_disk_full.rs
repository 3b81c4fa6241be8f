//! A real ENOSPC: the data directory on a small tmpfs that another process fills.

mod common;

use common::{Daemon, Tmpfs, SMALL_SEGMENTS};
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

#[test]
fn a_full_disk_answers_429_never_500_and_ingest_resumes_when_space_returns() {
    let fs = Tmpfs::mount("8m");
    let data = fs.path.join("data");
    let mut d = Daemon::start_in(&data, &small_spool_args(), &[]);
    fs.fill("filler");

    let text = "x".repeat(4000);
    let mut acked = Vec::new();
    let mut refused = None;
    for n in 0..4096 {
        let id = format!("full-{n}");
        let r = d.post_json(&json!({"source": "s", "id": id, "text": text}));
        match r.status {
            202 => acked.push(id),
            429 => {
                refused = Some(r);
                break;
            }
            other => panic!("status {other} while the disk fills: {}", r.text()),
        }
    }
    let refused = refused.expect("a full disk must eventually refuse with 429");
    assert_eq!(refused.json()["reason"], "enospc", "{}", refused.text());
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        d.get("/readyz").status,
        200,
        "a full disk must not poison the spool"
    );

    std::fs::remove_file(fs.path.join("filler")).unwrap();
    let r = d.post_json(&json!({"source": "s", "id": "after", "text": text}));
    assert_eq!(r.status, 202, "{}", r.text());
    acked.push("after".into());

    // Everything acknowledged survives a crash: after restart each id is a dedup hit.
    d.kill9();
    d.restart();
    for id in &acked {
        let r = d.post_json(&json!({"source": "s", "id": id, "text": text}));
        assert_eq!(r.status, 202);
        assert_eq!(r.json()["envelopes"][0]["duplicate"], true, "{id} lost");
    }
    let log = d.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && (l.contains("damaged") || l.contains("torn"))),
        "no segment may be damaged:\n{log}"
    );
}
