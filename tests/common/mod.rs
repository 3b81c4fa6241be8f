//! Test harness: runs the real `spoolgate` binary in a scratch data directory, talks plain
//! HTTP/1.1 to it, and kills or stops it.
//!
//! Synchronisation is always on a condition (the address file appearing with the child's pid,
//! `/readyz` answering 200, a metric reaching a value, a file existing), polled with a bounded
//! deadline; nothing waits for a fixed time and hopes.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous bound for anything the daemon does in tests; hitting it means a bug, not slowness.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spoolgate")
}

/// Polls `cond` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on a fresh connection and reads the whole response.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    if raw.is_empty() {
        // Told apart from a malformed response: the server closed the connection without
        // answering, which a caller may treat as it treats a reset.
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before any byte of a response",
        ));
    }
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header terminator"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

static LOG_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub struct Daemon {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub ingest: String,
    pub metrics: String,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    /// The daemon's stderr, outside the data directory (which may be a deliberately full disk).
    pub log_file: PathBuf,
    /// Keeps the scratch directory alive as long as the daemon value.
    pub _scratch: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts a daemon in a fresh scratch directory with `args` after `serve`.
    pub fn start(args: &[&str]) -> Daemon {
        let scratch = tempfile::tempdir().expect("scratch dir");
        let data_dir = scratch.path().join("data");
        let mut d = Daemon::start_in(&data_dir, args, &[]);
        d._scratch = Some(scratch);
        d
    }

    /// Starts a daemon on `data_dir` (which may hold a previous run's spool).
    pub fn start_in(data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon {
            child: None,
            data_dir: data_dir.to_path_buf(),
            ingest: String::new(),
            metrics: String::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_file: std::env::temp_dir().join(format!(
                "spoolgate-test-{}-{}.log",
                std::process::id(),
                LOG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )),
            _scratch: None,
        };
        d.spawn();
        d.wait_ready();
        d
    }

    /// Spawns the process and waits until it has bound its listeners (not until ready).
    pub fn spawn(&mut self) {
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let addr_file = self.data_dir.join("spoolgate.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn spoolgate");
        let pid = child.id();
        self.child = Some(child);
        let (ingest, metrics) = wait_for("the address file", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "spoolgate exited during start-up with {status}; log:\n{}",
                    self.log()
                );
            }
            let text = std::fs::read_to_string(&addr_file).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            if v["pid"].as_u64()? != u64::from(pid) {
                return None;
            }
            Some((
                v["ingest"].as_str()?.to_string(),
                v["metrics"].as_str()?.to_string(),
            ))
        });
        self.ingest = ingest;
        self.metrics = metrics;
    }

    pub fn wait_ready(&mut self) {
        let metrics = self.metrics.clone();
        wait_for("/readyz to answer 200", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("spoolgate exited with {status}; log:\n{}", self.log());
            }
            let r = request(&metrics, "GET", "/readyz", &[], b"").ok()?;
            (r.status == 200).then_some(())
        });
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_file.clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn post(&self, content_type: &str, body: &[u8]) -> Response {
        request(
            &self.ingest,
            "POST",
            "/v1/envelopes",
            &[("Content-Type", content_type)],
            body,
        )
        .expect("ingest request")
    }

    pub fn post_json(&self, body: &serde_json::Value) -> Response {
        self.post("application/json", body.to_string().as_bytes())
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.metrics, "GET", path, &[], b"").expect("metrics request")
    }

    /// The value of one sample of the exposition, e.g. `spoolgate_ingest_envelopes_accepted_total`
    /// or `spoolgate_ingest_rejected_total{reason="quota"}`. Absent samples read as 0.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").text();
        metric_in(&text, sample)
    }

    pub fn wait_metric(&self, sample: &str, pred: impl Fn(f64) -> bool) -> f64 {
        wait_for(&format!("metric {sample}"), || {
            let v = self.metric(sample);
            pred(v).then_some(v)
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        c.wait().expect("wait")
    }

    /// Restarts on the same data directory after a kill or a stop.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
        self.wait_ready();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log_file);
        } else {
            eprintln!("daemon log kept at {}", self.log_file.display());
        }
    }
}

/// A small tmpfs mounted for the life of the value (the tests run as root, as CI does).
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: these tests need root (CI runs as root)"
        );
        Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    /// Writes zeros into `name` until the filesystem is full; returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        let mut f = std::fs::File::create(self.path.join(name)).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(_) => break,
            }
        }
        // Fill the last partial page too, byte by byte in shrinking steps.
        let mut step = 4096usize;
        while step > 0 {
            match f.write(&chunk[..step]) {
                Ok(n) if n > 0 => written += n as u64,
                _ => step /= 2,
            }
        }
        let _ = f.sync_all();
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

pub fn metric_in(text: &str, sample: &str) -> f64 {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix(sample) {
            if let Some(v) = rest.strip_prefix(' ') {
                return v.trim().parse().unwrap_or(f64::NAN);
            }
        }
    }
    0.0
}

/// A JSON envelope with `n` in its id and text.
pub fn envelope(n: usize) -> serde_json::Value {
    serde_json::json!({"source": "test", "id": format!("e-{n}"), "text": format!("hello number {n}")})
}

/// An HTTP sink for tests: answers each POST with the status `respond(n)` chooses for the n-th
/// request (0-based), and records the records of every batch it answered 2xx.
/// [`TestSink::start_by_batch`] also shows `respond` the batch.
pub struct TestSink {
    pub url: String,
    pub delivered: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TestSink {
    pub fn start(respond: impl Fn(usize) -> (u16, String) + Send + Sync + 'static) -> TestSink {
        TestSink::start_by_batch(move |n, _| respond(n))
    }

    /// As [`TestSink::start`], with the request's forward records (the JSON array) as well.
    pub fn start_by_batch(
        respond: impl Fn(usize, &[serde_json::Value]) -> (u16, String) + Send + Sync + 'static,
    ) -> TestSink {
        use std::io::BufRead;
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/batch", listener.local_addr().unwrap());
        let delivered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let respond = std::sync::Arc::new(respond);
        let (d, r) = (delivered.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (d, r, respond) = (d.clone(), r.clone(), respond.clone());
                std::thread::spawn(move || {
                    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                    let mut out = conn;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end().to_string();
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
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        let n = r.fetch_add(1, Ordering::SeqCst);
                        let batch: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                        let (status, text) = respond(n, &batch);
                        if (200..300).contains(&status) {
                            d.lock().unwrap().extend(batch);
                        }
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{text}",
                            text.len()
                        );
                        if out.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TestSink {
            url,
            delivered,
            requests,
        }
    }

    pub fn delivered(&self) -> Vec<serde_json::Value> {
        self.delivered.lock().unwrap().clone()
    }

    /// A config file that makes this the default sink.
    pub fn config_file(&self, dir: &Path, extra: &str) -> PathBuf {
        let path = dir.join("sink.toml");
        std::fs::write(
            &path,
            format!(
                "[sinks.default]\ntype = \"http\"\nurl = \"{}\"\n{extra}",
                self.url
            ),
        )
        .unwrap();
        path
    }
}

/// Ids of the envelopes in a list of forward records.
pub fn ids(records: &[serde_json::Value]) -> std::collections::HashSet<String> {
    records
        .iter()
        .filter_map(|r| r["envelope"]["id"].as_str().map(str::to_string))
        .collect()
}

/// Every JSON line of the file sink under `data_dir/out`.
pub fn file_sink_records(data_dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir.join("out"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Settings for tests that need rotation and compaction quickly: 1 MiB segments and records of
/// up to 64 KiB, so a few dozen 30 KB envelopes fill a segment.
pub const SMALL_SEGMENTS: [&str; 8] = [
    "--set",
    "spool.segment_bytes_max=1048576",
    "--set",
    "spool.record_bytes_max=65536",
    "--set",
    "ingest.envelope_bytes_max=60000",
    "--set",
    "spool.commit_batch_bytes_max=65536",
];

/// The hex digits between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in spool-format.md, as
/// one string: hexdump lines lose their offset column, bare hash lines are kept whole. The
/// golden tests compare encoders with it; the reference reader test feeds it to the reader.
pub fn spec_hex(name: &str) -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/spool-format.md")).unwrap();
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let start = doc.find(&begin).unwrap_or_else(|| panic!("marker {begin}"));
    let stop = doc.find(&end).unwrap_or_else(|| panic!("marker {end}"));
    doc[start + begin.len()..stop]
        .lines()
        .filter(|l| !l.starts_with("```"))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            if words.len() > 1 {
                words[1..].to_vec()
            } else {
                words
            }
        })
        .collect::<Vec<_>>()
        .join("")
}

/// `bytes` as the offset-and-hex dump of spool-format.md's golden vectors, for a failure
/// message that can be pasted into the document.
pub fn hexdump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(n, c)| {
            let hex: Vec<String> = c.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}  {}\n", n * 16, hex.join(" "))
        })
        .collect()
}
