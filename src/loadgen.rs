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
//! Bounds: latency samples are kept up to `SAMPLES_MAX` per run (later ones are counted but not
//! kept), bodies are pre-built (`BODIES` of them) so generating load costs little CPU, and every
//! request has a timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    pub requests_429: u64,
    pub requests_other: u64,
    pub transport_errors: u64,
    pub requests_per_s: f64,
    pub envelopes_per_s: f64,
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

struct Counters {
    ok: AtomicU64,
    /// Every 202, warm-up and the last answers after the measured window included.
    ok_all: AtomicU64,
    too_many: AtomicU64,
    other: AtomicU64,
    transport: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
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
    counters: Arc<Counters>,
    first: usize,
) -> Result<Vec<Duration>, LoadError> {
    let mut latencies = Vec::new();
    let mut conn: Option<Conn> = None;
    let mut i = first;
    // With a rate, each connection sends on its own schedule and never catches up a backlog
    // of missed sends in a burst (a slow answer simply delays the schedule).
    let interval = opts
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(opts.connections as f64 * opts.batch.max(1) as f64 / r));
    let mut next_send = tokio::time::Instant::now();
    while !counters.stop.load(Ordering::Relaxed) {
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
        let measuring = counters.measuring.load(Ordering::Relaxed);
        match outcome {
            Ok(Ok((status, keep_alive))) => {
                if !keep_alive {
                    conn = None;
                }
                if status == 202 {
                    counters.ok_all.fetch_add(1, Ordering::Relaxed);
                }
                if measuring {
                    match status {
                        202 => counters.ok.fetch_add(1, Ordering::Relaxed),
                        429 => counters.too_many.fetch_add(1, Ordering::Relaxed),
                        _ => counters.other.fetch_add(1, Ordering::Relaxed),
                    };
                    if latencies.len() < SAMPLES_MAX / opts.connections.max(1) {
                        latencies.push(elapsed);
                    }
                }
            }
            _ => {
                if measuring {
                    counters.transport.fetch_add(1, Ordering::Relaxed);
                }
                conn = None;
            }
        }
    }
    Ok(latencies)
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
    let counters = Arc::new(Counters {
        ok: AtomicU64::new(0),
        ok_all: AtomicU64::new(0),
        too_many: AtomicU64::new(0),
        other: AtomicU64::new(0),
        transport: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let tasks: Vec<_> = (0..opts.connections)
        .map(|c| {
            tokio::spawn(connection(
                opts.clone(),
                requests.clone(),
                counters.clone(),
                c * 7,
            ))
        })
        .collect();
    tokio::time::sleep(opts.warmup).await;
    counters.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut pending_samples = Vec::new();
    while started.elapsed() < opts.duration {
        let left = opts.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        if let Some(url) = &opts.metrics {
            pending_samples.push(scrape(url, "spoolgate_spool_pending_records").await?);
        }
    }
    counters.measuring.store(false, Ordering::Relaxed);
    let measured = started.elapsed().as_secs_f64();
    counters.stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(l)) => latencies.extend(l),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(LoadError::Http(e.to_string())),
        }
    }
    latencies.sort();
    let ok = counters.ok.load(Ordering::Relaxed);
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
        envelopes_acknowledged_total: counters.ok_all.load(Ordering::Relaxed)
            * opts.batch.max(1) as u64,
        requests_429: counters.too_many.load(Ordering::Relaxed),
        requests_other: counters.other.load(Ordering::Relaxed),
        transport_errors: counters.transport.load(Ordering::Relaxed),
        requests_per_s: ok as f64 / measured,
        envelopes_per_s,
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
