//! `spoolgate drill`: a crash-recovery drill, as operators are told to run one.
//!
//! The drill starts a spoolgate binary on a scratch data directory (or drives one the operator
//! already runs, given its addresses and how to kill and restart it), sends load from several
//! client threads while keeping a ledger of every id that was answered 202, and kills the
//! daemon with SIGKILL at seeded random moments — after a random number of acknowledgements, so
//! a run is reproducible in its schedule. After each kill it restarts the daemon and measures
//! the time until `/readyz` answers 200. Before each restart it verifies the spool as the kill
//! left it (`spoolgate verify DATA_DIR`: every seal links, and the `chain-heads` checkpoint
//! never runs ahead of the seals). When the last round is done it waits for the pipeline to
//! deliver everything, stops it with SIGTERM, and checks against what the sink received and
//! what the spool holds:
//!
//! - **no loss**: every acknowledged id was delivered at least once, with the source, tenant
//!   and text that were sent;
//! - **identical duplicates**: an id delivered more than once was delivered identically (the
//!   same JSON value: sequence number, hashes, gate output and envelope);
//! - **chains verify**: every stream is gapless from 1 and every link is valid;
//! - **everything tombstoned**: once the daemon has drained and stopped cleanly (exit 0), no
//!   envelope in the spool is without its tombstone, so a restart would replay nothing;
//! - **no failure went unseen**: the daemon never exited by itself (a kill that finds it dead
//!   fails the drill), ingest never answered 5xx, and every round reached its target (unless
//!   the drill runs on a full disk on purpose, where it must instead have seen the disk fill).
//!
//! Clients re-send a batch whose answer a kill cut off, to the restarted daemon, as an ingest
//! service would: the dedup index must answer it with the original positions if it was
//! written, so an id sealed twice shows up as a non-identical duplicate.
//!
//! The sink is the daemon's file sink (JSON lines under `<data>/out`) or, with `--sink http`,
//! a recording HTTP server inside the drill process, which outlives the daemon's deaths.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Counts rules-file rewrites across restarts (only with `flip_rules`).
static RULES_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Bound on how long the drill waits for the daemon to become ready or to drain.
pub const WAIT_MAX: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillSink {
    File,
    Http,
}

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub binary: PathBuf,
    pub data_dir: PathBuf,
    pub kills: usize,
    pub seed: u64,
    pub clients: usize,
    /// Each round runs until this many more acknowledgements (drawn from 1..=max) arrived.
    pub acks_per_round_max: u64,
    pub sink: DrillSink,
    /// Extra `--set KEY=VALUE` for the daemon.
    pub sets: Vec<String>,
    /// Rewrite the rules file while the daemon is down, before every restart, so replayed
    /// records would be classified differently if anything were recomputed.
    pub flip_rules: bool,
    /// The daemon's log (default: next to the data directory, `<data_dir>.log`). The
    /// full-disk drill puts it off the full filesystem, where lines would be lost.
    pub log: Option<PathBuf>,
    /// The data directory is on a filesystem the drill fills on purpose: rounds may fall short
    /// of their target (ingest refuses while the disk is full), and the drill must see the
    /// refusals that say the disk filled (429 `enospc` or `reserve`).
    pub full_disk: bool,
    /// HTTP sink only: the recorder answers 503 to every batch holding a record of
    /// [`FLAKY_STREAM`] during alternate [`FLAKY_PERIOD`]s, so the worker owning that stream
    /// retries while the others deliver (the dispatcher leaves it behind when its inbox fills).
    pub flaky_stream: bool,
    /// The share of rounds, in percent, that end with SIGTERM instead of SIGKILL, the clients
    /// still sending: a rolling restart among the crashes. The daemon must stop by itself
    /// (exit 0) and leave its durable-end marker at the end of its data, and the restart must find nothing damaged
    /// (spool-format.md §4, row 14). 0 (the default) keeps a seed's schedule as it was.
    pub clean_stops_percent: u8,
}

/// The stream the recorder refuses at times with `flaky_stream`.
pub const FLAKY_STREAM: &str = "tenant-0";
/// Length of each refusing (and each accepting) period with `flaky_stream`.
pub const FLAKY_PERIOD: Duration = Duration::from_millis(500);

#[derive(Debug, Default, Serialize)]
pub struct DrillReport {
    pub seed: u64,
    pub kills: usize,
    pub acknowledged: u64,
    pub delivered_unique: u64,
    pub delivered_total: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub non_identical_duplicates: u64,
    pub chain_error: Option<String>,
    /// The first break `verify_spool` found in the spool's seals and checkpoint, which is
    /// checked after every kill, before the restart.
    pub spool_chain_error: Option<String>,
    /// The first damage `spoolgate inspect` found in the spool after a kill: a damaged range, a
    /// missing segment, or, in a segment older than the newest ones, a header that does not
    /// read or bytes after the data (a torn tail of the newest segment is what a kill may
    /// leave, and is not counted). A SIGKILL leaves the page cache whole, so any is a bug.
    pub spool_damage: Option<String>,
    pub streams: u64,
    pub ready_after_restart_ms: Vec<u64>,
    pub lost_ids: Vec<String>,
    /// Batches the recorder refused with 503 (`flaky_stream`).
    pub refused_batches: u64,
    /// `spoolgate_forward_workers_left_behind_total` of the last daemon, read before it stops.
    pub workers_left_behind_last_run: u64,
    /// Rounds killed without their acknowledgement target, after waiting [`WAIT_MAX`]: the
    /// daemon was not taking envelopes (a full disk does that on purpose; otherwise a fault).
    pub rounds_short: u64,
    /// The drill ran on a disk it fills on purpose ([`DrillOptions::full_disk`]).
    pub full_disk: bool,
    /// Rounds in which the daemon had exited before the drill killed it, with its status.
    pub daemon_exits: Vec<String>,
    /// Ingest answers other than 202, by status and the body's `error` (and `reason`).
    pub answers: BTreeMap<String, u64>,
    /// Requests sent whole whose answer never came (a kill cut them off; their outcome is
    /// unknown to the client). Requests that found no daemon to connect to are not counted.
    pub cut_off_requests: u64,
    /// Cut-off batches sent again (normally to the restarted daemon).
    pub resent_batches: u64,
    /// Envelopes of re-sent batches answered `"duplicate": true`: the first send had been
    /// written before the kill, and dedup answered with its position across the restart.
    pub resent_duplicates: u64,
    /// Kills that left envelopes without a tombstone, which the restart then replays.
    pub kills_leaving_pending: u64,
    /// Where the kills landed, as the spool they left shows it: kills that left records sealed
    /// (their chain output durable, perhaps forwarded) and not tombstoned, whose replay must
    /// forward them identically; kills that left envelopes not yet sealed; kills that left a
    /// torn tail (the kill cut a write).
    pub kills_after_seal_before_tombstone: u64,
    pub kills_before_seal: u64,
    pub kills_mid_write: u64,
    /// Rounds that ended with SIGTERM ([`DrillOptions::clean_stops_percent`]), not counted in
    /// `kills`.
    pub clean_stops: u64,
    /// Clean stops after which the spool held no durable-end marker at the end of its data
    /// (with the daemon's exit 0).
    pub clean_stops_unmarked: u64,
    /// 503 `not_ready` answers during clean stops: what ingest says while it shuts down,
    /// moved out of `answers`, where a 5xx fails the drill.
    pub refused_while_stopping: u64,
    /// Delivered records whose envelope differs from what was sent (source, tenant or text),
    /// and the first of them.
    pub content_mismatches: u64,
    pub first_content_mismatch: Option<String>,
    /// Why the last daemon did not drain (its pending count did not reach 0 in time).
    pub drain_error: Option<String>,
    /// How the last daemon ended after SIGTERM, if not with exit 0 in time.
    pub final_exit_error: Option<String>,
    /// Envelopes without a tombstone in the spool after the drained daemon stopped.
    pub pending_after_shutdown: Option<u64>,
    /// Why the spool could not be inspected after the stop.
    pub pending_inspect_error: Option<String>,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// What failed, one line each; empty when the drill passed.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.acknowledged == 0 {
            f.push("no envelope was acknowledged".to_string());
        }
        if self.lost > 0 {
            f.push(format!(
                "{} acknowledged envelopes were not delivered",
                self.lost
            ));
        }
        if self.non_identical_duplicates > 0 {
            f.push(format!(
                "{} ids were delivered in different forms",
                self.non_identical_duplicates
            ));
        }
        if let Some(e) = &self.first_content_mismatch {
            f.push(format!(
                "{} records differ from what was sent, first: {e}",
                self.content_mismatches
            ));
        }
        for e in [
            &self.chain_error,
            &self.spool_chain_error,
            &self.spool_damage,
            &self.drain_error,
            &self.final_exit_error,
        ]
        .into_iter()
        .flatten()
        {
            f.push(e.clone());
        }
        if let Some(first) = self.daemon_exits.first() {
            f.push(format!("the daemon exited by itself: {first}"));
        }
        if self.clean_stops_unmarked > 0 && !self.full_disk {
            f.push(format!(
                "{} clean stops left no durable-end marker at the end of the data",
                self.clean_stops_unmarked
            ));
        }
        let server_errors: u64 = self
            .answers
            .iter()
            .filter(|(k, _)| k.starts_with('5'))
            .map(|(_, n)| n)
            .sum();
        if server_errors > 0 {
            f.push(format!("ingest answered 5xx {server_errors} times"));
        }
        match self.pending_after_shutdown {
            Some(0) => {}
            Some(n) => f.push(format!(
                "{n} envelopes were left without a tombstone after a clean stop"
            )),
            None => f.push(format!(
                "the spool was not inspected after the stop: {}",
                self.pending_inspect_error.as_deref().unwrap_or("no reason")
            )),
        }
        if self.full_disk {
            if !self.answers.keys().any(|k| {
                k.starts_with("429 ") && (k.ends_with("/enospc") || k.ends_with("/reserve"))
            }) {
                f.push("the disk never filled (no 429 enospc or reserve)".to_string());
            }
        } else if self.rounds_short > 0 {
            f.push(format!(
                "{} rounds fell short of their acknowledgements",
                self.rounds_short
            ));
        }
        f
    }
}

impl std::fmt::Display for DrillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ready = self.ready_after_restart_ms.clone();
        ready.sort_unstable();
        let pct = |p: f64| -> u64 {
            if ready.is_empty() {
                return 0;
            }
            ready[((ready.len() - 1) as f64 * p).round() as usize]
        };
        writeln!(
            f,
            "drill seed {}: {}",
            self.seed,
            if self.passed() { "PASSED" } else { "FAILED" }
        )?;
        writeln!(f, "  kills (SIGKILL)          {}", self.kills)?;
        if self.clean_stops > 0 {
            writeln!(
                f,
                "  clean stops (SIGTERM)    {} ({} answered 503 while stopping, {} unmarked)",
                self.clean_stops, self.refused_while_stopping, self.clean_stops_unmarked
            )?;
        }
        if self.rounds_short > 0 {
            writeln!(
                f,
                "  rounds short of target   {} (killed after waiting {} s)",
                self.rounds_short,
                WAIT_MAX.as_secs()
            )?;
        }
        writeln!(f, "  envelopes acknowledged   {}", self.acknowledged)?;
        writeln!(f, "  delivered (unique)       {}", self.delivered_unique)?;
        writeln!(f, "  delivered (total)        {}", self.delivered_total)?;
        writeln!(
            f,
            "  duplicates               {} (non-identical: {})",
            self.duplicates, self.non_identical_duplicates
        )?;
        writeln!(f, "  lost                     {}", self.lost)?;
        writeln!(
            f,
            "  content                  {}",
            self.first_content_mismatch
                .as_deref()
                .unwrap_or("every delivered envelope as it was sent")
        )?;
        writeln!(
            f,
            "  cut-off requests         {} (re-sent: {}, envelopes of them answered as duplicates: {})",
            self.cut_off_requests, self.resent_batches, self.resent_duplicates
        )?;
        writeln!(
            f,
            "  kills leaving replay     {} of {} (sealed, not tombstoned: {}; not yet sealed: {}; mid-write: {})",
            self.kills_leaving_pending,
            self.kills,
            self.kills_after_seal_before_tombstone,
            self.kills_before_seal,
            self.kills_mid_write
        )?;
        for (answer, n) in &self.answers {
            writeln!(f, "  answered {answer:<15} {n}")?;
        }
        writeln!(
            f,
            "  after the last stop      {}",
            match (&self.final_exit_error, self.pending_after_shutdown) {
                (Some(e), _) => e.clone(),
                (None, Some(0)) => "exit 0, every envelope tombstoned".to_string(),
                (None, Some(n)) => format!("exit 0, {n} envelopes without a tombstone"),
                (None, None) => "not inspected".to_string(),
            }
        )?;
        if self.refused_batches > 0 {
            writeln!(
                f,
                "  sink refusals (503)      {} batches; workers left behind in the last run: {}",
                self.refused_batches, self.workers_left_behind_last_run
            )?;
        }
        writeln!(f, "  streams verified         {}", self.streams)?;
        writeln!(
            f,
            "  chains                   {}",
            self.chain_error
                .as_deref()
                .unwrap_or("every stream gapless, every link valid")
        )?;
        writeln!(
            f,
            "  spool seals              {}",
            self.spool_chain_error
                .as_deref()
                .unwrap_or("verified after every kill, with the chain-heads checkpoint")
        )?;
        writeln!(
            f,
            "  spool frames             {}",
            self.spool_damage.as_deref().unwrap_or(
                "no damaged range, no missing segment after any kill (spoolgate inspect)"
            )
        )?;
        writeln!(
            f,
            "  time to ready (ms)       p50 {}  p90 {}  max {}",
            pct(0.5),
            pct(0.9),
            ready.last().copied().unwrap_or(0)
        )?;
        for id in self.lost_ids.iter().take(20) {
            writeln!(f, "  LOST {id}")?;
        }
        for failure in self.failures() {
            writeln!(f, "  FAILED: {failure}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Daemon(String),
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    send(addr, method, path, content_type, body).map_err(|e| match e {
        SendError::NotSent(e) | SendError::CutOff(e) => e,
    })
}

/// How a request failed: before it was sent whole (the server cannot have acted on it), or
/// after (it may have).
enum SendError {
    NotSent(std::io::Error),
    CutOff(std::io::Error),
}

fn send(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), SendError> {
    let mut s = TcpStream::connect(addr).map_err(SendError::NotSent)?;
    let sent = (|| {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        s.write_all(body)
    })();
    sent.map_err(SendError::NotSent)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(SendError::CutOff)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            SendError::CutOff(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "truncated response",
            ))
        })?;
    let status = std::str::from_utf8(&raw[..split])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, raw[split + 4..].to_vec()))
}

/// On a filesystem too full for its address file the daemon starts without one; its log, from
/// `from` (where this start's lines begin), then gives its addresses: the `spoolgate starting`
/// line, in the human format the drill's daemons log in, once a line says the file was skipped.
fn addresses_from_log(log: &std::path::Path, from: u64) -> Option<(String, String)> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(text.get(usize::try_from(from).ok()?..)?);
    if !text.contains("starting without an address file") {
        return None;
    }
    let line = text.lines().find(|l| l.contains("spoolgate starting"))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
    };
    Some((field("ingest=")?, field("metrics=")?))
}

/// SIGKILL's number, which `ExitStatus::signal` reports for a process it ended.
fn libc_sigkill() -> i32 {
    rustix::process::Signal::Kill as i32
}

/// Where the drill's daemons log.
fn log_path(opts: &DrillOptions) -> PathBuf {
    opts.log
        .clone()
        .unwrap_or_else(|| opts.data_dir.with_extension("log"))
}

struct Running {
    child: Child,
    ingest: String,
    metrics: String,
}

/// A drill that stops on an error must not leave its daemon running (on the full-disk drill's
/// tmpfs that would also keep the unmount from succeeding). A daemon already waited for is
/// not killed again: `kill` then fails harmlessly.
impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_daemon(
    opts: &DrillOptions,
    sink_url: Option<&str>,
) -> Result<(Running, Duration), DrillError> {
    std::fs::create_dir_all(&opts.data_dir)?;
    let addr_file = opts.data_dir.join(crate::daemon::ADDRESSES_FILE);
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(opts))?;
    let mut cmd = Command::new(&opts.binary);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&opts.data_dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        // `addresses_from_log` reads the human format.
        .env("SPOOLGATE_LOG_FORMAT", "human")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    if let Some(url) = sink_url {
        let config = opts.data_dir.with_extension("toml");
        std::fs::write(
            &config,
            format!("[sinks.default]\ntype = \"http\"\nurl = \"{url}\"\n"),
        )?;
        cmd.arg("--config").arg(config);
    }
    for s in &opts.sets {
        cmd.args(["--set", s]);
    }
    if opts.flip_rules {
        let rules = opts.data_dir.with_extension("rules.toml");
        let generation = RULES_GENERATION.fetch_add(1, Ordering::Relaxed);
        std::fs::write(
            &rules,
            format!("[[rule]]\nname = \"drill\"\nkeywords = [\"drill\"]\ntags = [\"generation-{generation}\"]\nintent = \"drill-{generation}\"\n"),
        )?;
        cmd.args(["--set", &format!("gate.rules_path=\"{}\"", rules.display())]);
    }
    let log_path = log_path(opts);
    let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (ingest, metrics) = loop {
        if let Some(status) = child.try_wait()? {
            return Err(DrillError::Daemon(format!(
                "daemon exited during start-up with {status}; see {}",
                log_path.display()
            )));
        }
        if started.elapsed() > WAIT_MAX {
            let _ = child.kill();
            return Err(DrillError::Daemon(
                "daemon did not bind its listeners in time".into(),
            ));
        }
        let parsed = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .filter(|v| v["pid"].as_u64() == Some(u64::from(pid)));
        if let Some(v) = parsed {
            break (
                v["ingest"].as_str().unwrap_or_default().to_string(),
                v["metrics"].as_str().unwrap_or_default().to_string(),
            );
        }
        if let Some(found) = addresses_from_log(&log_path, log_start) {
            break found;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The last answer of /readyz, so that a daemon that never turns ready says why.
    let mut last_answer = String::from("no answer");
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(DrillError::Daemon(format!(
                "daemon exited during recovery with {status}"
            )));
        }
        if started.elapsed() > WAIT_MAX {
            let _ = child.kill();
            return Err(DrillError::Daemon(format!(
                "daemon did not become ready in time; /readyz last answered: {last_answer}"
            )));
        }
        match http(&metrics, "GET", "/readyz", "text/plain", b"") {
            Ok((200, _)) => break,
            Ok((status, body)) => {
                last_answer = format!("{status} {}", String::from_utf8_lossy(&body));
            }
            Err(e) => last_answer = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((
        Running {
            child,
            ingest,
            metrics,
        },
        started.elapsed(),
    ))
}

/// A recording HTTP sink: stores every JSON record it is sent, in arrival order.
struct Recorder {
    addr: String,
    records: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
}

impl Recorder {
    fn start(flaky: bool) -> std::io::Result<Recorder> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (r, s, n) = (records.clone(), stop.clone(), refused.clone());
        let started = Instant::now();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (r, n) = (r.clone(), n.clone());
                let refusing = move || {
                    flaky && (started.elapsed().as_millis() / FLAKY_PERIOD.as_millis()) % 2 == 0
                };
                std::thread::spawn(move || {
                    let _ = serve_recorder_connection(conn, &r, &n, refusing);
                });
            }
        });
        Ok(Recorder {
            addr,
            records,
            stop,
            refused,
        })
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn serve_recorder_connection(
    conn: TcpStream,
    records: &Mutex<Vec<String>>,
    refused: &AtomicU64,
    refusing: impl Fn() -> bool,
) -> std::io::Result<()> {
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
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
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let status = match serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
            Ok(batch) if refusing() && batch.iter().any(|r| r["stream"] == FLAKY_STREAM) => {
                refused.fetch_add(1, Ordering::Relaxed);
                "503 Service Unavailable"
            }
            Ok(batch) => {
                let mut r = records.lock().unwrap_or_else(|p| p.into_inner());
                for rec in batch {
                    r.push(rec.to_string());
                }
                "200 OK"
            }
            Err(_) => "400 Bad Request",
        };
        write!(out, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n")?;
    }
}

/// Reads the file sink's output: one JSON record per line, in file-name order.
fn read_file_sink(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    files.sort();
    let mut out = Vec::new();
    for f in files {
        if f.extension().and_then(|e| e.to_str()) != Some("jsonl") {
            continue;
        }
        let text = std::fs::read_to_string(&f)?;
        out.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_string));
    }
    Ok(out)
}

/// What the clients share: ids handed out, what was acknowledged, and the answers.
struct Ledger {
    next_id: AtomicU64,
    /// Acknowledged id -> (tenant, text) as sent, to check what is delivered against.
    acked: Mutex<HashMap<String, (String, String)>>,
    /// Batches without an answer, to be sent again (normally to the restarted daemon), with
    /// whether they were sent whole (cut off) or found no daemon. Each client leaves at most
    /// one per round (it stops at its first failed request), so this holds at most `clients`.
    unanswered: Mutex<Vec<(Vec<serde_json::Value>, bool)>>,
    answers: Mutex<BTreeMap<String, u64>>,
    cut_off_requests: AtomicU64,
    resent_batches: AtomicU64,
    resent_duplicates: AtomicU64,
}

fn new_batch(rng: &mut fastrand::Rng, next_id: &AtomicU64) -> Vec<serde_json::Value> {
    (0..rng.usize(1..=8))
        .map(|_| {
            let n = next_id.fetch_add(1, Ordering::Relaxed);
            let pii = if n % 3 == 0 {
                " contact me at drill@example.com"
            } else {
                ""
            };
            serde_json::json!({
                "id": format!("drill-{n}"),
                "source": "drill",
                "tenant": format!("tenant-{}", n % 7),
                "text": format!("drill envelope {n}.{pii} Some more words to classify."),
            })
        })
        .collect()
}

/// How an answer other than 202 is counted: status, then the body's `error` and `reason`.
fn answer_key(status: u16, body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let mut key = status.to_string();
    if let Some(e) = v["error"].as_str() {
        key = format!("{key} {e}");
        if let Some(r) = v["reason"].as_str() {
            key = format!("{key}/{r}");
        }
    }
    key
}

/// How ingest's answer while it shuts down is counted in [`DrillReport::answers`].
const NOT_READY_ANSWER: &str = "503 not_ready";

fn not_ready_answers(ledger: &Ledger) -> u64 {
    ledger
        .answers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(NOT_READY_ANSWER)
        .copied()
        .unwrap_or(0)
}

/// Sends SIGTERM and waits, at most [`WAIT_MAX`], for the daemon to exit; says what went
/// wrong, if it did not exit 0 (it is then killed).
fn stop_cleanly(child: &mut Child) -> Option<String> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let stopping = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return None,
            Ok(Some(status)) => return Some(format!("a clean stop ended with {status}")),
            Ok(None) if stopping.elapsed() > WAIT_MAX => {
                let _ = child.kill();
                let _ = child.wait();
                return Some(format!(
                    "the daemon did not stop within {} s of SIGTERM",
                    WAIT_MAX.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Some(format!("cannot wait for the daemon: {e}")),
        }
    }
}

/// Whether the spool of the data directory holds a durable-end marker naming the end of its
/// data, as a clean close leaves it: the marker's segment ends there, and no later segment
/// holds anything.
fn clean_close_marked(data_dir: &Path) -> bool {
    let dir = data_dir.join("spool");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return false;
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let (Some(end), Ok(report)) = (
        crate::spool::durable_marker(&names),
        crate::spool::inspect(&dir),
    ) else {
        return false;
    };
    let header = crate::spool::format::HEADER_LEN;
    report
        .segments
        .iter()
        .any(|s| s.id == end.segment && s.data_end.max(header) == end.offset)
        && report
            .segments
            .iter()
            .all(|s| s.id <= end.segment || s.data_end <= header)
}

/// One client: sends batches (first any a kill left unanswered) until `stop` is set or the
/// daemon stops answering.
fn client(ingest: &str, seed: u64, ledger: &Ledger, got: &AtomicU64, stop: &AtomicBool) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Ordering::Relaxed) {
        let unanswered = ledger
            .unanswered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let resend = unanswered.as_ref().is_some_and(|(_, cut_off)| *cut_off);
        let items = match unanswered {
            Some((items, _)) => items,
            None => new_batch(&mut rng, &ledger.next_id),
        };
        let body = serde_json::Value::Array(items.clone()).to_string();
        if resend {
            ledger.resent_batches.fetch_add(1, Ordering::Relaxed);
        }
        match send(
            ingest,
            "POST",
            "/v1/envelopes",
            "application/json",
            body.as_bytes(),
        ) {
            Ok((202, answer)) => {
                let mut a = ledger.acked.lock().unwrap_or_else(|p| p.into_inner());
                for i in &items {
                    let field = |k: &str| i[k].as_str().unwrap_or_default().to_string();
                    a.insert(field("id"), (field("tenant"), field("text")));
                }
                drop(a);
                got.fetch_add(items.len() as u64, Ordering::Relaxed);
                if resend {
                    let answer: serde_json::Value =
                        serde_json::from_slice(&answer).unwrap_or_default();
                    let duplicates = answer["envelopes"].as_array().map_or(0, |e| {
                        e.iter().filter(|e| e["duplicate"] == true).count() as u64
                    });
                    ledger
                        .resent_duplicates
                        .fetch_add(duplicates, Ordering::Relaxed);
                }
            }
            Ok((status, body)) => {
                *ledger
                    .answers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(answer_key(status, &body))
                    .or_default() += 1;
                // A refusal (a full disk answers thousands a second) is not retried at once:
                // a tight loop would take the CPU the daemon needs to recover.
                if status == 429 || status == 503 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Err(failed) => {
                // A request sent whole may or may not have been written: an ingest service
                // would send it again, and so does the drill (normally to the next daemon;
                // after a read timeout, to this one, which may answer 409 while the first
                // send is still in flight).
                let cut_off = matches!(failed, SendError::CutOff(_));
                if cut_off {
                    ledger.cut_off_requests.fetch_add(1, Ordering::Relaxed);
                }
                ledger
                    .unanswered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((items, cut_off || resend));
                return;
            }
        }
    }
}

pub fn run(opts: &DrillOptions) -> Result<DrillReport, DrillError> {
    let mut report = DrillReport {
        seed: opts.seed,
        ..Default::default()
    };
    let recorder = match opts.sink {
        DrillSink::Http => Some(Recorder::start(opts.flaky_stream)?),
        DrillSink::File => None,
    };
    let sink_url = recorder
        .as_ref()
        .map(|r| format!("http://{}/ingest", r.addr));
    report.full_disk = opts.full_disk;
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let ledger = Ledger {
        next_id: AtomicU64::new(0),
        acked: Mutex::new(HashMap::new()),
        unanswered: Mutex::new(Vec::new()),
        answers: Mutex::new(BTreeMap::new()),
        cut_off_requests: AtomicU64::new(0),
        resent_batches: AtomicU64::new(0),
        resent_duplicates: AtomicU64::new(0),
    };
    let (mut running, _) = start_daemon(opts, sink_url.as_deref())?;
    for round in 0..opts.kills {
        let target = rng.u64(1..=opts.acks_per_round_max.max(1));
        // Drawn only when asked for, so that a seed's schedule without clean stops is the one
        // it always was.
        let clean_stop = opts.clean_stops_percent > 0 && rng.u8(..100) < opts.clean_stops_percent;
        let refused_before = not_ready_answers(&ledger);
        let ingest = running.ingest.clone();
        let got = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let mut short = false;
        // The kill lands while the clients are mid-request: they keep sending until the daemon
        // is gone, and the kill comes as soon as the round's acknowledgement target is reached.
        std::thread::scope(|scope| {
            for c in 0..opts.clients {
                let seed = rng.u64(..) ^ c as u64;
                let (ingest, ledger, got, stop) = (&ingest, &ledger, &got, &stop);
                scope.spawn(move || client(ingest, seed, ledger, got, stop));
            }
            let waited = Instant::now();
            while got.load(Ordering::Relaxed) < target && waited.elapsed() < WAIT_MAX {
                // A daemon that died by itself will not bring the round to its target.
                if matches!(running.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if clean_stop {
                if let Some(failed) = stop_cleanly(&mut running.child) {
                    report.daemon_exits.push(format!("round {round}: {failed}"));
                }
                stop.store(true, Ordering::Relaxed);
                return;
            }
            let _ = running.child.kill();
            // The status says who ended the daemon: anything but our SIGKILL (an exit, an
            // abort, a kill from elsewhere) is a death the drill would otherwise count as one
            // of its kills, restarting it like any other round.
            match running.child.wait() {
                Ok(status) if status.signal() == Some(libc_sigkill()) => {
                    if got.load(Ordering::Relaxed) < target {
                        short = true;
                        tracing::warn!(
                            round,
                            target,
                            acknowledged = got.load(Ordering::Relaxed),
                            "the round's acknowledgements did not come in time; killed anyway"
                        );
                    }
                }
                Ok(status) => report.daemon_exits.push(format!("round {round}: {status}")),
                Err(e) => report
                    .daemon_exits
                    .push(format!("round {round}: cannot wait for the daemon: {e}")),
            }
            stop.store(true, Ordering::Relaxed);
        });
        if clean_stop {
            report.clean_stops += 1;
            let refused = not_ready_answers(&ledger) - refused_before;
            report.refused_while_stopping += refused;
            let mut answers = ledger.answers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = answers.get_mut(NOT_READY_ANSWER) {
                *n -= refused;
                if *n == 0 {
                    answers.remove(NOT_READY_ANSWER);
                }
            }
            drop(answers);
            report.clean_stops_unmarked += u64::from(!clean_close_marked(&opts.data_dir));
        } else {
            report.kills += 1;
        }
        report.rounds_short += u64::from(short);
        let after = if clean_stop {
            format!("after clean stop {}", report.clean_stops)
        } else {
            format!("after kill {}", report.kills)
        };
        if report.spool_chain_error.is_none() {
            if let Err(e) = crate::chain::verify_spool(&opts.data_dir) {
                report.spool_chain_error = Some(format!("{after}: {e}"));
            }
        }
        if report.spool_damage.is_none() {
            report.spool_damage =
                spool_damage(&opts.data_dir.join("spool")).map(|e| format!("{after}: {e}"));
        }
        if !clean_stop && pending_envelopes(&opts.data_dir.join("spool")).is_ok_and(|n| n > 0) {
            report.kills_leaving_pending += 1;
        }
        match kill_window(&opts.data_dir.join("spool")) {
            // A clean stop writes nothing it does not finish: any bytes after the data are
            // damage.
            Ok(left) if clean_stop && left.torn_tail && report.spool_damage.is_none() => {
                report.spool_damage = Some(format!(
                    "{after}: bytes after the data of the newest segment"
                ));
            }
            Ok(_) if clean_stop => {}
            Ok(left) => {
                report.kills_after_seal_before_tombstone += u64::from(left.sealed_untombstoned > 0);
                report.kills_before_seal += u64::from(left.unsealed > 0);
                report.kills_mid_write += u64::from(left.torn_tail);
            }
            Err(_) => {}
        }
        let (r, ready) = start_daemon(opts, sink_url.as_deref())?;
        report.ready_after_restart_ms.push(ready.as_millis() as u64);
        running = r;
        tracing::info!(round, target, "drill round done");
    }
    let acked = ledger.acked.into_inner().unwrap_or_else(|p| p.into_inner());
    report.acknowledged = acked.len() as u64;
    report.answers = ledger
        .answers
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    report.cut_off_requests = ledger.cut_off_requests.into_inner();
    report.resent_batches = ledger.resent_batches.into_inner();
    report.resent_duplicates = ledger.resent_duplicates.into_inner();

    let collect = |recorder: &Option<Recorder>| -> Result<Vec<String>, DrillError> {
        Ok(match recorder {
            Some(r) => r.records.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            None => read_file_sink(&opts.data_dir.join("out"))?,
        })
    };
    let started = Instant::now();
    let mut delivered = collect(&recorder)?;
    loop {
        let ids: std::collections::HashSet<String> =
            delivered.iter().filter_map(|l| record_id(l)).collect();
        if acked.keys().all(|a| ids.contains(a)) || started.elapsed() > WAIT_MAX {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        delivered = collect(&recorder)?;
    }
    report.workers_left_behind_last_run = metric(
        &running.metrics,
        "spoolgate_forward_workers_left_behind_total",
    )
    .unwrap_or(0.0) as u64;
    if let Some(r) = &recorder {
        report.refused_batches = r.refused.load(Ordering::Relaxed);
    }
    // Written but unacknowledged envelopes (a kill cut off their answer, and their re-send was
    // a duplicate or never came) are delivered too; wait for the daemon's own count of what is
    // pending to reach 0, so that everything in the spool should be tombstoned at the stop.
    let drained = Instant::now();
    loop {
        let pending = metric(&running.metrics, "spoolgate_spool_pending_records");
        if pending == Some(0.0) {
            break;
        }
        if drained.elapsed() > WAIT_MAX {
            report.drain_error = Some(format!(
                "the last daemon did not drain within {} s: spoolgate_spool_pending_records \
                 read {pending:?}",
                WAIT_MAX.as_secs()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &running.child.id().to_string()])
        .status();
    let stopping = Instant::now();
    report.final_exit_error = loop {
        match running.child.try_wait()? {
            Some(status) if status.success() => break None,
            Some(status) => break Some(format!("the last daemon stopped with {status}")),
            None if stopping.elapsed() > WAIT_MAX => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                break Some(format!(
                    "the last daemon did not stop within {} s of SIGTERM",
                    WAIT_MAX.as_secs()
                ));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    match pending_envelopes(&opts.data_dir.join("spool")) {
        Ok(n) => report.pending_after_shutdown = Some(n),
        Err(e) => report.pending_inspect_error = Some(e.to_string()),
    }
    let delivered = collect(&recorder)?;

    let mut by_id: HashMap<String, Vec<&String>> = HashMap::new();
    for line in &delivered {
        if let Some(id) = record_id(line) {
            by_id.entry(id).or_default().push(line);
        }
    }
    report.delivered_total = delivered.len() as u64;
    report.delivered_unique = by_id.len() as u64;
    for copies in by_id.values() {
        report.duplicates += copies.len() as u64 - 1;
        if copies
            .iter()
            .any(|c| canonical_json(c) != canonical_json(copies[0]))
        {
            report.non_identical_duplicates += 1;
        }
    }
    for (id, (tenant, text)) in &acked {
        let Some(copies) = by_id.get(id) else {
            report.lost += 1;
            report.lost_ids.push(id.clone());
            continue;
        };
        // The drill's rules and the default PII policy (`tag`) leave the text as it was sent.
        let v: serde_json::Value = serde_json::from_str(copies[0]).unwrap_or_default();
        let e = &v["envelope"];
        if e["source"] != "drill" || e["tenant"] != tenant.as_str() || e["text"] != text.as_str() {
            report.content_mismatches += 1;
            report.first_content_mismatch.get_or_insert_with(|| {
                format!("{id}: sent tenant {tenant:?} text {text:?}, delivered {e}")
            });
        }
    }
    let joined = delivered.join("\n");
    match crate::chain::verify_jsonl(std::io::Cursor::new(joined.as_bytes())) {
        Ok(summary) => report.streams = summary.streams as u64,
        Err(e) => report.chain_error = Some(e.to_string()),
    }
    Ok(report)
}

/// One metric of the daemon at `addr`, read from `/metrics`.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let (status, body) = http(addr, "GET", "/metrics", "text/plain", b"").ok()?;
    if status != 200 {
        return None;
    }
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What a kill left in the spool in `dir`: envelopes sealed and not tombstoned, envelopes not
/// yet sealed (neither counts tombstoned ones), and whether the newest segment with data ends
/// in a torn write. Memory: three sets of positions, for a drill's small spool.
struct KillWindow {
    sealed_untombstoned: usize,
    unsealed: usize,
    torn_tail: bool,
}

fn kill_window(dir: &Path) -> Result<KillWindow, crate::spool::SpoolError> {
    use crate::spool::{Position, RecordKind};
    use std::collections::HashSet;
    let (mut envelopes, mut sealed, mut done) = (
        HashSet::<Position>::new(),
        HashSet::<Position>::new(),
        HashSet::<Position>::new(),
    );
    crate::spool::for_each_frame(dir, |position, kind, payload| {
        match RecordKind(kind) {
            RecordKind::ENVELOPE => {
                envelopes.insert(position);
            }
            RecordKind::SEALED => {
                if let Ok(batch) = crate::chain::SealedBatch::decode(payload) {
                    sealed.extend(batch.entries.iter().map(|e| e.position));
                }
            }
            RecordKind::TOMBSTONE => {
                if let Ok(t) = crate::chain::Tombstone::decode(payload) {
                    done.extend(t.positions);
                }
            }
            _ => {}
        }
        Ok::<(), crate::spool::SpoolError>(())
    })?;
    let torn_tail = crate::spool::inspect(dir)?
        .segments
        .iter()
        .rev()
        .find(|s| s.data_end > crate::spool::format::HEADER_LEN)
        .is_some_and(|s| s.tail_garbage_bytes > 0);
    Ok(KillWindow {
        sealed_untombstoned: sealed.difference(&done).count(),
        unsealed: envelopes
            .iter()
            .filter(|p| !sealed.contains(p) && !done.contains(p))
            .count(),
        torn_tail,
    })
}

/// Envelopes in the spool in `dir` that no tombstone names, as `spoolgate inspect` counts them.
fn pending_envelopes(dir: &Path) -> Result<u64, crate::spool::SpoolError> {
    Ok(crate::forward::ledger::pending_by_segment(dir)?
        .values()
        .sum())
}

/// What `spoolgate inspect` finds wrong with the spool in `dir`: a damaged range or a missing
/// segment; a header that does not read, or bytes after the data that are not a torn tail,
/// in a segment other than the newest (and the active one before a prepared newest): a kill
/// can leave those only at the end of the spool.
fn spool_damage(dir: &Path) -> Option<String> {
    let report = match crate::spool::inspect(dir) {
        Ok(r) => r,
        Err(e) => return Some(format!("inspect failed: {e}")),
    };
    if let Some([first, last]) = report.missing_segments.first() {
        return Some(format!("segments {first}..={last} are missing"));
    }
    if let Some(d) = report.segments.iter().find_map(|s| s.damaged.first()) {
        return Some(format!(
            "segment {} is damaged at offset {} ({} bytes)",
            d.segment, d.offset, d.len_bytes
        ));
    }
    let count = report.segments.len();
    report.segments.iter().enumerate().find_map(|(n, s)| {
        let older_than_active = n + 2 < count;
        match &s.header {
            Err(e) if n + 1 < count => Some(format!("segment {}: header: {e}", s.id)),
            _ if older_than_active && s.tail_garbage_bytes > 0 => Some(format!(
                "segment {}: {} bytes that are not records after offset {}",
                s.id, s.tail_garbage_bytes, s.data_end
            )),
            _ => None,
        }
    })
}

fn record_id(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(v["envelope"]["id"].as_str()?.to_string())
}

/// Re-serialises through a sorted map so two encodings of the same record compare equal.
fn canonical_json(line: &str) -> String {
    serde_json::from_str::<BTreeMap<String, serde_json::Value>>(line)
        .map(|m| serde_json::to_string(&m).unwrap_or_default())
        .unwrap_or_else(|_| line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean_report() -> DrillReport {
        DrillReport {
            acknowledged: 10,
            pending_after_shutdown: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn a_drill_fails_on_a_self_exit_a_server_error_an_untombstoned_envelope_or_a_short_round() {
        assert_eq!(clean_report().failures(), Vec::<String>::new());
        let mut r = clean_report();
        r.daemon_exits.push("round 3: signal: 6 (SIGABRT)".into());
        assert!(!r.passed());
        let mut r = clean_report();
        r.answers.insert("503 poisoned".into(), 1);
        assert!(!r.passed());
        r.answers.clear();
        r.answers.insert("429 backpressure/quota".into(), 5);
        assert!(r.passed(), "{:?}", r.failures());
        for pending in [None, Some(3)] {
            let mut r = clean_report();
            r.pending_after_shutdown = pending;
            assert!(!r.passed());
        }
        let mut r = clean_report();
        r.rounds_short = 1;
        assert!(!r.passed());
    }

    #[test]
    fn on_a_full_disk_short_rounds_pass_but_a_disk_that_never_filled_fails() {
        let mut r = clean_report();
        r.full_disk = true;
        r.rounds_short = 4;
        r.answers.insert("429 backpressure/quota".into(), 5);
        assert!(!r.passed(), "no refusal says the disk filled");
        r.answers.insert("429 backpressure/enospc".into(), 2);
        assert!(r.passed(), "{:?}", r.failures());
    }

    #[test]
    fn a_start_without_an_address_file_is_found_in_its_own_lines_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("data.log");
        let earlier = "2026-12-02T18:00:00Z  INFO spoolgate::daemon: spoolgate starting ingest=127.0.0.1:1 metrics=127.0.0.1:2 data_dir=d\n";
        std::fs::write(&log, earlier).unwrap();
        let from = earlier.len() as u64;
        assert_eq!(addresses_from_log(&log, from), None);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"2026-12-02T18:01:00Z  INFO spoolgate::daemon: spoolgate starting ingest=127.0.0.1:3 metrics=127.0.0.1:4 data_dir=d\n").unwrap();
        // An address file is coming: the log is not the source yet.
        assert_eq!(addresses_from_log(&log, from), None);
        std::io::Write::write_all(&mut f, b"2026-12-02T18:01:00Z ERROR spoolgate::daemon: the data filesystem is full: starting without an address file error=...\n").unwrap();
        assert_eq!(
            addresses_from_log(&log, from),
            Some(("127.0.0.1:3".into(), "127.0.0.1:4".into()))
        );
    }
}
