//! `spoolgate bench`: a closed-loop HTTP load generator for the ingest API.
//!
//! Each of `connections` tasks holds one keep-alive HTTP/1.1 connection (a minimal client:
//! pre-built requests out, status and body length in) and sends its next request as soon as
//! the previous one is answered, so the offered load is whatever the daemon
//! sustains at that concurrency; with `rate` the connections pace themselves to a total rate
//! instead (to show whether the backlog stays flat at that rate). A request carries one JSON envelope or a msgpack batch of
//! `batch` envelopes; one text in three (by default) carries PII, so the gate has work to do.
//!
//! With `metrics` set it also samples `spoolgate_spool_pending_records` during the run (to
//! show whether the backlog stays flat) and, after the load stops, waits for the backlog to
//! drain, which turns "acknowledged per second" into "delivered and tombstoned per second".
//!
//! Latency is recorded for 202 answers only: a 429 or an error is answered without the fsync a
//! 202 waits for, so counting it would make a run that met backpressure look faster. Every other
//! status is counted by code, and transport errors apart from them, so a report can flag the run.
//!
//! Bounds: latency samples are kept up to `SAMPLES_MAX` per run (later ones are counted but not
//! kept), bodies are pre-built (`BODIES` of them) so generating load costs little CPU, and every
//! request has a timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::envelope::Priority;

/// Latency samples kept per run.
pub const SAMPLES_MAX: usize = 20_000_000;

/// Fraction of generated texts carrying PII unless `--pii-fraction` says otherwise: issue #4's
/// end-to-end benchmark has a third of the texts with PII.
pub const PII_FRACTION_DEFAULT: f64 = 1.0 / 3.0;
/// Distinct pre-built request bodies cycled through by every connection.
const BODIES: usize = 256;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `host:port` of the ingest listener.
    pub ingest: String,
    /// `host:port` of the metrics listener, to sample the backlog and wait for it to drain.
    pub metrics: Option<String>,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub text_bytes: usize,
    /// Envelopes per request; 1 sends a JSON object, more send a msgpack array.
    pub batch: usize,
    /// Fraction of texts that carry PII, in 0..=1.
    pub pii_fraction: f64,
    /// Envelopes cycle through this many tenants (`bench-0`, `bench-1`, ...), so the chain
    /// has this many streams spread over the slots, as behind a multi-tenant ingest service.
    pub streams: usize,
    pub wait_drained: bool,
    /// Pace the load to this many envelopes per second in total (spread over the
    /// connections); `None` sends as fast as answers come back.
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub connections: usize,
    pub streams: usize,
    pub batch: usize,
    pub text_bytes: usize,
    pub duration_s: f64,
    pub requests_ok: u64,
    /// Envelopes acknowledged over the whole run, warm-up included: what the daemon's CPU
    /// time over the run (and, with `wait_drained`, its drain) was spent on.
    pub envelopes_acknowledged_total: u64,
    /// Answers other than 202 in the measured window: 429s, then every other status (the sum of
    /// `other_statuses`). None of them is in the latency percentiles.
    pub requests_429: u64,
    pub requests_other: u64,
    /// The statuses counted in `requests_other`, by code.
    pub other_statuses: BTreeMap<u16, u64>,
    /// Requests in the measured window that got no answer (connection refused, reset or closed,
    /// a malformed response, or no answer within the request timeout).
    pub transport_errors: u64,
    pub requests_per_s: f64,
    pub envelopes_per_s: f64,
    /// The paced rate asked for (`rate`), to compare with `envelopes_per_s`: a closed loop that
    /// cannot keep up with its schedule sends less than asked, and the backlog it shows is then
    /// that of a lower rate.
    pub rate_target_envelopes_per_s: Option<f64>,
    /// Percentiles of the latency of 202 answers in the measured window.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_p999_ms: f64,
    pub latency_max_ms: f64,
    /// Backlog samples (`spoolgate_spool_pending_records`) taken once a second during the run.
    pub pending_samples: Vec<f64>,
    /// Seconds from the end of the load until the backlog was empty (with `wait_drained`).
    pub drain_s: Option<f64>,
    /// Envelopes acknowledged / (load time + drain time): delivered and tombstoned per second.
    pub end_to_end_envelopes_per_s: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error: {0}")]
    Http(String),
    #[error("metrics: {0}")]
    Metrics(String),
}

const WORDS: &[&str] = &[
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
    "invoice",
    "payment",
    "status",
    "pending",
    "network",
    "latency",
    "queue",
    "deploy",
];
const PII: &[&str] = &[
    "Contact jane.doe@example.com about it. ",
    "Call +1 415 555 0132 before noon. ",
    "Card 4111 1111 1111 1111 was charged twice. ",
    "The host 192.168.10.42 stopped answering. ",
];

fn text(n: usize, bytes: usize, pii: bool) -> String {
    let mut t = String::with_capacity(bytes + 64);
    let mut k = n as u64;
    while t.len() < bytes {
        if pii && t.len() > bytes / 2 {
            t.push_str(PII[n % PII.len()]);
            return finish(t, bytes);
        }
        k = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        t.push_str(WORDS[(k >> 33) as usize % WORDS.len()]);
        t.push_str(if (k >> 20) % 9 == 0 { ". " } else { " " });
    }
    finish(t, bytes)
}

fn finish(mut t: String, bytes: usize) -> String {
    while t.len() < bytes {
        t.push('.');
    }
    t.truncate(bytes);
    t
}

#[derive(Serialize)]
struct ClientEnvelope<'a> {
    source: &'a str,
    tenant: String,
    text: String,
    priority: Priority,
}

/// Pre-built request bodies and their content type.
fn bodies(opts: &LoadOptions) -> (Vec<Bytes>, &'static str) {
    let mut n = 0usize;
    let mut next_envelope = || {
        n += 1;
        let pii =
            (n as f64 * opts.pii_fraction).floor() > ((n - 1) as f64 * opts.pii_fraction).floor();
        ClientEnvelope {
            source: "bench",
            tenant: format!("bench-{}", n % opts.streams.max(1)),
            text: text(n, opts.text_bytes, pii),
            priority: Priority::Normal,
        }
    };
    if opts.batch <= 1 {
        let b = (0..BODIES)
            .map(|_| Bytes::from(serde_json::to_vec(&next_envelope()).unwrap_or_default()))
            .collect();
        (b, "application/json")
    } else {
        let b = (0..BODIES)
            .map(|_| {
                let batch: Vec<ClientEnvelope> = (0..opts.batch).map(|_| next_envelope()).collect();
                Bytes::from(rmp_serde::to_vec_named(&batch).unwrap_or_default())
            })
            .collect();
        (b, "application/msgpack")
    }
}

/// What every connection checks after each answer: whether answers count yet, and whether to
/// stop.
struct Flags {
    measuring: AtomicBool,
    stop: AtomicBool,
}

/// What one connection saw; the run adds up those of every connection.
#[derive(Debug, Default)]
struct ConnStats {
    /// Latencies of the 202s in the measured window, up to `keep` of them.
    latencies: Vec<Duration>,
    keep: usize,
    /// 202s in the measured window.
    ok: u64,
    /// Every 202, warm-up and the last answers after the measured window included.
    ok_all: u64,
    too_many: u64,
    other: BTreeMap<u16, u64>,
    transport: u64,
}

impl ConnStats {
    fn new(keep: usize) -> ConnStats {
        ConnStats {
            keep,
            ..ConnStats::default()
        }
    }

    /// Counts one answer; only a 202 in the measured window adds a latency sample.
    fn answered(&mut self, status: u16, elapsed: Duration, measuring: bool) {
        if status == 202 {
            self.ok_all += 1;
        }
        if !measuring {
            return;
        }
        match status {
            202 => {
                self.ok += 1;
                if self.latencies.len() < self.keep {
                    self.latencies.push(elapsed);
                }
            }
            429 => self.too_many += 1,
            other => *self.other.entry(other).or_default() += 1,
        }
    }

    fn failed(&mut self, measuring: bool) {
        if measuring {
            self.transport += 1;
        }
    }

    fn add(&mut self, other: ConnStats) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.ok_all += other.ok_all;
        self.too_many += other.too_many;
        for (status, n) in other.other {
            *self.other.entry(status).or_default() += n;
        }
        self.transport += other.transport;
    }
}

/// Every pre-built body as a complete HTTP/1.1 request, head included.
fn requests(bodies: &[Bytes], content_type: &str, host: &str) -> Vec<Bytes> {
    bodies
        .iter()
        .map(|body| {
            let head = format!(
                "POST /v1/envelopes HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let mut request = BytesMut::with_capacity(head.len() + body.len());
            request.extend_from_slice(head.as_bytes());
            request.extend_from_slice(body);
            request.freeze()
        })
        .collect()
}

/// Response heads longer than this are refused (the daemon's are ~150 bytes).
const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;

/// One keep-alive HTTP/1.1 connection that writes pre-built requests and reads the answers.
/// The load generator shares the machine with the daemon (as `redis-benchmark` shares it with
/// Redis in the same script), so it does no more per request than that: a general-purpose
/// client (hyper's, with its connection task) cost 4-5 µs of user CPU per request more.
struct Conn {
    stream: tokio::net::TcpStream,
    /// Bytes read and not yet consumed; at most one response head plus its body.
    buf: BytesMut,
}

/// What a response head says: its length, the status, the body's length, and whether the
/// server closes the connection after it.
fn parse_head(buf: &[u8]) -> std::io::Result<Option<(usize, u16, usize, bool)>> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > RESPONSE_HEAD_BYTES_MAX => {
            return Err(invalid("response head too long".into()))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(format!("bad response head: {e}"))),
    };
    let mut body_len = None;
    let mut close = false;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let body_len = body_len.ok_or_else(|| invalid("response without Content-Length".into()))?;
    Ok(Some((
        head_len,
        response.code.unwrap_or(0),
        body_len,
        close,
    )))
}

impl Conn {
    async fn connect(addr: &str) -> std::io::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(4096),
        })
    }

    /// Reads more into `buf`; an orderly close mid-response is an error.
    async fn fill(&mut self) -> std::io::Result<()> {
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Sends one request and reads its response: the status, and whether the connection
    /// stays open.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, bool)> {
        self.stream.write_all(request).await?;
        let (head_len, status, body_len, close) = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            self.fill().await?;
        };
        while self.buf.len() < head_len + body_len {
            self.fill().await?;
        }
        let _ = self.buf.split_to(head_len + body_len);
        Ok((status, !close))
    }
}

async fn connection(
    opts: Arc<LoadOptions>,
    requests: Arc<Vec<Bytes>>,
    flags: Arc<Flags>,
    first: usize,
) -> Result<ConnStats, LoadError> {
    let mut stats = ConnStats::new(SAMPLES_MAX / opts.connections.max(1));
    let mut conn: Option<Conn> = None;
    let mut i = first;
    // With a rate, each connection sends on its own schedule and never catches up a backlog
    // of missed sends in a burst (a slow answer simply delays the schedule).
    let interval = opts
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(opts.connections as f64 * opts.batch.max(1) as f64 / r));
    let mut next_send = tokio::time::Instant::now();
    while !flags.stop.load(Ordering::Relaxed) {
        if let Some(every) = interval {
            tokio::time::sleep_until(next_send).await;
            next_send = (next_send + every).max(tokio::time::Instant::now());
        }
        if conn.is_none() {
            conn =
                Some(
                    Conn::connect(&opts.ingest)
                        .await
                        .map_err(|source| LoadError::Connect {
                            addr: opts.ingest.clone(),
                            source,
                        })?,
                );
        }
        let Some(c) = conn.as_mut() else { continue };
        let request = &requests[i % requests.len()];
        i += 1;
        let started = Instant::now();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, c.exchange(request)).await;
        let elapsed = started.elapsed();
        let measuring = flags.measuring.load(Ordering::Relaxed);
        match outcome {
            Ok(Ok((status, keep_alive))) => {
                if !keep_alive {
                    conn = None;
                }
                stats.answered(status, elapsed, measuring);
            }
            _ => {
                stats.failed(measuring);
                conn = None;
            }
        }
    }
    Ok(stats)
}

/// Reads one unlabelled sample from the `/metrics` of the listener at `addr` (`host:port`).
pub async fn scrape(addr: &str, name: &str) -> Result<f64, LoadError> {
    let target = addr.to_string();
    let (status, body) = tokio::task::spawn_blocking(move || {
        crate::drill::http(&target, "GET", "/metrics", "text/plain", b"")
    })
    .await
    .map_err(|e| LoadError::Metrics(e.to_string()))?
    .map_err(|e| LoadError::Metrics(format!("{addr}: {e}")))?;
    if status != 200 {
        return Err(LoadError::Metrics(format!(
            "{addr}/metrics answered {status}"
        )));
    }
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .ok_or_else(|| LoadError::Metrics(format!("{name} not found at {addr}")))
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// Runs the load and returns what it measured.
pub async fn run(opts: LoadOptions) -> Result<LoadReport, LoadError> {
    let (bodies, content_type) = bodies(&opts);
    let requests = Arc::new(requests(&bodies, content_type, &opts.ingest));
    let opts = Arc::new(opts);
    let flags = Arc::new(Flags {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let tasks: Vec<_> = (0..opts.connections)
        .map(|c| {
            tokio::spawn(connection(
                opts.clone(),
                requests.clone(),
                flags.clone(),
                c * 7,
            ))
        })
        .collect();
    tokio::time::sleep(opts.warmup).await;
    flags.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut pending_samples = Vec::new();
    while started.elapsed() < opts.duration {
        let left = opts.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        if let Some(url) = &opts.metrics {
            pending_samples.push(scrape(url, "spoolgate_spool_pending_records").await?);
        }
    }
    flags.measuring.store(false, Ordering::Relaxed);
    let measured = started.elapsed().as_secs_f64();
    flags.stop.store(true, Ordering::Relaxed);
    let mut stats = ConnStats::default();
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => stats.add(s),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(LoadError::Http(e.to_string())),
        }
    }
    let mut latencies = stats.latencies;
    latencies.sort();
    let ok = stats.ok;
    let envelopes_per_s = ok as f64 * opts.batch.max(1) as f64 / measured;

    let mut drain_s = None;
    let mut end_to_end = None;
    if let (true, Some(url)) = (opts.wait_drained, &opts.metrics) {
        let drain_started = Instant::now();
        loop {
            if scrape(url, "spoolgate_spool_pending_records").await? == 0.0 {
                break;
            }
            if drain_started.elapsed() > DRAIN_TIMEOUT {
                return Err(LoadError::Metrics("backlog did not drain in 600 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let d = drain_started.elapsed().as_secs_f64();
        drain_s = Some(d);
        // Everything acknowledged during warm-up and measurement is in the backlog that just
        // drained; only the measured part is counted, so this slightly understates the rate.
        end_to_end = Some(ok as f64 * opts.batch.max(1) as f64 / (measured + d));
    }

    Ok(LoadReport {
        connections: opts.connections,
        streams: opts.streams.max(1),
        batch: opts.batch.max(1),
        text_bytes: opts.text_bytes,
        duration_s: measured,
        requests_ok: ok,
        envelopes_acknowledged_total: stats.ok_all * opts.batch.max(1) as u64,
        requests_429: stats.too_many,
        requests_other: stats.other.values().sum(),
        other_statuses: stats.other,
        transport_errors: stats.transport,
        requests_per_s: ok as f64 / measured,
        envelopes_per_s,
        rate_target_envelopes_per_s: opts.rate.filter(|r| *r > 0.0),
        latency_p50_ms: percentile_ms(&latencies, 0.50),
        latency_p99_ms: percentile_ms(&latencies, 0.99),
        latency_p999_ms: percentile_ms(&latencies, 0.999),
        latency_max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        pending_samples,
        drain_s,
        end_to_end_envelopes_per_s: end_to_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_head_is_read_only_once_complete_and_gives_status_length_and_close() {
        let ok = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 12\r\ndate: x\r\n\r\n{\"accepted\"}";
        let head_len = ok.len() - 12;
        assert_eq!(parse_head(&ok[..head_len - 1]).unwrap(), None);
        assert_eq!(parse_head(ok).unwrap(), Some((head_len, 202, 12, false)));
        let closing =
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert_eq!(
            parse_head(closing).unwrap(),
            Some((closing.len(), 429, 0, true))
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn each_request_is_a_complete_http_request_around_its_body() {
        let r = requests(
            &[Bytes::from_static(b"{}")],
            "application/json",
            "127.0.0.1:1",
        );
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&r[0]).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("incomplete head"),
        };
        assert_eq!(req.method, Some("POST"));
        assert_eq!(req.path, Some("/v1/envelopes"));
        assert_eq!(&r[0][head_len..], b"{}");
        assert!(req
            .headers
            .iter()
            .any(|h| h.name == "content-length" && h.value == b"2"));
    }

    #[test]
    fn only_202s_in_the_measured_window_give_latency_samples_and_other_answers_are_counted_by_status(
    ) {
        let ms = Duration::from_millis;
        let mut a = ConnStats::new(10);
        a.answered(202, ms(9), false);
        a.answered(429, ms(9), false);
        a.failed(false);
        a.answered(202, ms(3), true);
        a.answered(429, ms(1), true);
        a.answered(503, ms(1), true);
        a.failed(true);
        let mut b = ConnStats::new(1);
        b.answered(202, ms(4), true);
        b.answered(202, ms(5), true);
        b.answered(503, ms(1), true);
        b.answered(400, ms(1), true);
        let mut total = ConnStats::default();
        total.add(a);
        total.add(b);
        assert_eq!(total.latencies, vec![ms(3), ms(4)]);
        assert_eq!((total.ok, total.ok_all), (3, 4));
        assert_eq!((total.too_many, total.transport), (1, 1));
        assert_eq!(total.other, BTreeMap::from([(400, 1), (503, 2)]));
    }

    #[test]
    fn texts_have_the_requested_length_and_pii_only_when_asked() {
        let plain = text(3, 512, false);
        let pii = text(3, 512, true);
        assert_eq!((plain.len(), pii.len()), (512, 512));
        assert!(!plain.contains("jane.doe") && !plain.contains("4111"));
        assert!(PII.iter().any(|p| pii.contains(p.trim())));
    }

    #[test]
    fn one_body_in_three_carries_pii_at_the_default_fraction() {
        let opts = LoadOptions {
            ingest: "127.0.0.1:1".into(),
            metrics: None,
            connections: 1,
            duration: Duration::ZERO,
            warmup: Duration::ZERO,
            text_bytes: 1024,
            batch: 1,
            pii_fraction: PII_FRACTION_DEFAULT,
            streams: 16,
            wait_drained: false,
            rate: None,
        };
        let (b, ct) = bodies(&opts);
        assert_eq!(ct, "application/json");
        let with_pii = b
            .iter()
            .filter(|b| {
                let s = std::str::from_utf8(b).unwrap_or("");
                PII.iter().any(|p| s.contains(p.trim()))
            })
            .count();
        assert_eq!(with_pii, BODIES / 3);
    }
}
