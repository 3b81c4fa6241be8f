//! The HTTP sink: POSTs each batch, as a JSON array or a msgpack array of forward records, to a
//! configured URL. 2xx = delivered. 408, 429, 5xx and transport errors are retryable (with the
//! server's `Retry-After`, in seconds or as an HTTP date, if any); any other status is a
//! permanent rejection, reported with up to [`REASON_BYTES_MAX`] bytes of the response body.
//! The worker sends a batch refused with 413 again in halves before it dead-letters anything
//! (see `forward::worker`).
//!
//! Each attempt has one deadline, `timeout_ms`, for the response head and its body together,
//! so an attempt never takes longer than that; the configuration requires it to be shorter
//! than `forward.worker_deadline_ms`, past which a sink counts as stuck. Up to
//! [`BODY_READ_BYTES_MAX`] of a response body is read (so the connection can be reused), and
//! the reason keeps what was read even when the body is longer, cut off or too slow: a sink
//! that echoes a large rejected batch back must not leave an empty reason in the dead letter.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use super::sink::{DeliverFuture, Sink, SinkError};
use crate::chain::SharedRecord;
use crate::config::WireFormat;

/// Bytes of a rejecting response's body kept as the dead-letter reason.
pub const REASON_BYTES_MAX: usize = 2048;
/// Bytes of a response body read at most; the rest is left unread and the connection closed.
pub const BODY_READ_BYTES_MAX: usize = 64 * 1024;

/// Checks what [`HttpSink::new`] would refuse, for `config check` and the config's validation.
pub fn check_settings(url: &str, headers: &BTreeMap<String, String>) -> Result<(), String> {
    parse_settings(url, headers).map(|_| ())
}

fn parse_settings(
    url: &str,
    headers: &BTreeMap<String, String>,
) -> Result<(hyper::Uri, Vec<(HeaderName, HeaderValue)>), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("invalid url {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "invalid url {url:?}: must be http://host[:port]/path"
        ));
    }
    let headers = headers
        .iter()
        .map(|(k, v)| {
            Ok((
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header {k:?}: {e}"))?,
                HeaderValue::from_str(v).map_err(|e| format!("header {k:?}: {e}"))?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((uri, headers))
}

/// A `Retry-After` value: delay-seconds, or an HTTP date (RFC 9110 §10.2.3), as a delay from
/// `now` (zero for a date already past). `None` for anything else.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads up to [`BODY_READ_BYTES_MAX`] of a response body before `deadline`, and returns its
/// first [`REASON_BYTES_MAX`] bytes as text, with a note when the body was not read whole.
async fn read_reason(
    mut body: hyper::body::Incoming,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut read_bytes = 0usize;
    let reading = async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let room = REASON_BYTES_MAX.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                    read_bytes = read_bytes.saturating_add(data.len());
                    if read_bytes > BODY_READ_BYTES_MAX {
                        return Some(format!(
                            "body over {BODY_READ_BYTES_MAX} bytes, not read further"
                        ));
                    }
                }
                Err(e) => return Some(format!("body cut off: {e}")),
            }
        }
        None
    };
    let note = match tokio::time::timeout_at(deadline, reading).await {
        Ok(note) => note,
        Err(_) => Some(format!(
            "body not finished within {} ms",
            timeout.as_millis()
        )),
    };
    let mut reason = String::from_utf8_lossy(&kept).into_owned();
    if let Some(note) = note {
        reason.push_str(&format!(" [{note}]"));
    }
    reason
}

/// An error with its chain of causes, `outer: inner: …`: hyper-util's client error says only
/// its kind ("client error (Connect)"), and what an operator needs (connection refused, reset,
/// a DNS failure) is in its sources.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        // Some layers repeat their source's text in their own.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// Whether a failed request's causes say the connection closed under it (reset, broken pipe,
/// or closed before the answer was complete), once it was connected.
fn closed_while_sending(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_closed() || h.is_body_write_aborted() {
                return true;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ) {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

pub struct HttpSink {
    name: String,
    url: hyper::Uri,
    format: WireFormat,
    timeout: Duration,
    headers: Vec<(HeaderName, HeaderValue)>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpSink {
    pub fn new(
        name: &str,
        url: &str,
        format: WireFormat,
        timeout: Duration,
        headers: BTreeMap<String, String>,
    ) -> Result<HttpSink, String> {
        let (url, headers) = parse_settings(url, &headers)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector);
        Ok(HttpSink {
            name: name.to_string(),
            url,
            format,
            timeout,
            headers,
            client,
        })
    }

    fn body(&self, batch: &[SharedRecord]) -> Result<(Bytes, &'static str), SinkError> {
        let encoded = match self.format {
            WireFormat::Json => {
                let mut out = Vec::with_capacity(batch.len() * 1536);
                super::json::write_records(&mut out, batch)
                    .map(|()| out)
                    .map_err(|e| e.to_string())
            }
            WireFormat::Msgpack => rmp_serde::to_vec_named(batch).map_err(|e| e.to_string()),
        };
        let ct = match self.format {
            WireFormat::Json => "application/json",
            WireFormat::Msgpack => "application/msgpack",
        };
        encoded
            .map(|b| (Bytes::from(b), ct))
            .map_err(|reason| SinkError::Rejected {
                status: 0,
                reason: format!("cannot encode batch: {reason}"),
            })
    }

    async fn post(&self, batch: &[SharedRecord]) -> Result<(), SinkError> {
        // The attempt's deadline covers encoding too: the worker's deadline does.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (body, ct) = self.body(batch)?;
        let mut req = Request::post(self.url.clone())
            .header(CONTENT_TYPE, ct)
            .body(Full::new(body))
            .map_err(|e| SinkError::Rejected {
                status: 0,
                reason: format!("cannot build request: {e}"),
            })?;
        for (k, v) in &self.headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let resp = match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Err(_) => {
                return Err(SinkError::Retryable {
                    reason: format!("no response within {} ms", self.timeout.as_millis()),
                    retry_after: None,
                })
            }
            Ok(Err(e)) => {
                let reason = format!("request failed: {}", with_causes(&e));
                return Err(if !e.is_connect() && closed_while_sending(&e) {
                    SinkError::CutOff { reason }
                } else {
                    SinkError::Retryable {
                        reason,
                        retry_after: None,
                    }
                });
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(REASON_BYTES_MAX).collect::<String>());
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        // A 2xx is delivered whatever its body holds; it is read only to reuse the connection.
        let reason = read_reason(resp.into_body(), deadline, self.timeout).await;
        match status {
            200..=299 => Ok(()),
            // Only a 4xx says the batch itself is refused. A redirect says where the sink
            // is, and spoolgate does not follow one (it would have to resend the batch to an
            // address nobody configured): it is retried, with the reason logged, until the URL
            // is fixed, rather than sending every batch to the dead-letter directory.
            300..=399 => Err(SinkError::Retryable {
                reason: format!(
                    "status {status}: the sink redirects ({location}); spoolgate does not \
                     follow redirects, so set the sink's url (sinks.<name>.url) to the final address",
                    location = location.as_deref().unwrap_or("no Location")
                ),
                retry_after,
            }),
            400..=499 if status != 408 && status != 429 => {
                Err(SinkError::Rejected { status, reason })
            }
            _ => Err(SinkError::Retryable {
                reason: format!("status {status}: {reason}"),
                retry_after,
            }),
        }
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [SharedRecord]) -> DeliverFuture<'a> {
        Box::pin(self.post(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers one request on a fresh port with `head` and then `body` (written in pieces, so a
    /// long body arrives as several frames), and closes. Returns the sink's URL.
    async fn answer_once(head: String, body: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            // The request is small (an empty batch); read until its head and body are in.
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.ends_with(b"[]") {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            conn.write_all(head.as_bytes()).await.unwrap();
            for piece in body.chunks(8192) {
                if conn.write_all(piece).await.is_err() {
                    return;
                }
            }
            let _ = conn.shutdown().await;
        });
        format!("http://{addr}/in")
    }

    fn sink(url: &str) -> HttpSink {
        HttpSink::new(
            "t",
            url,
            WireFormat::Json,
            Duration::from_secs(10),
            BTreeMap::new(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_rejection_whose_body_is_over_the_read_bound_keeps_its_first_bytes_as_the_reason() {
        let mut body = b"bad field x: ".to_vec();
        body.extend(std::iter::repeat_n(b'p', 100 * 1024));
        let head = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let url = answer_once(head, body).await;
        match sink(&url).deliver(&[]).await {
            Err(SinkError::Rejected { status, reason }) => {
                assert_eq!(status, 400);
                assert!(reason.starts_with("bad field x: ppp"), "{reason:.40}");
                assert!(
                    reason.ends_with(&format!(
                        "[body over {BODY_READ_BYTES_MAX} bytes, not read further]"
                    )),
                    "{}",
                    &reason[reason.len() - 60..]
                );
                assert!(reason.len() <= REASON_BYTES_MAX + 80);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_rejection_whose_body_is_cut_off_keeps_what_arrived_and_says_so() {
        // Content-Length promises more than is sent before the connection closes.
        let head = "HTTP/1.1 422 Unprocessable\r\ncontent-length: 5000\r\n\r\n".to_string();
        let url = answer_once(head, b"missing source".to_vec()).await;
        match sink(&url).deliver(&[]).await {
            Err(SinkError::Rejected { status, reason }) => {
                assert_eq!(status, 422);
                assert!(
                    reason.starts_with("missing source [body cut off"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// A batch of `n` records of `text_bytes` each, sealed in one stream.
    fn batch(n: usize, text_bytes: usize) -> Vec<SharedRecord> {
        let mut chains = crate::chain::Chains::new();
        (0..n)
            .map(|i| {
                std::sync::Arc::new(
                    chains
                        .seal(crate::envelope::Envelope {
                            id: format!("e{i}"),
                            source: "s".into(),
                            slot: crate::slots::slot_of("s"),
                            text: Some("x".repeat(text_bytes)),
                            ..Default::default()
                        })
                        .unwrap(),
                )
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sink_that_answers_413_and_closes_before_reading_a_large_body_is_too_large_or_a_cut_off(
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = conn
                        .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large")
                        .await;
                });
            }
        });
        // Whether the client reads the 413 before the reset is a race; either way the worker
        // sends the batch in halves. What must not happen is a plain retryable failure, which
        // would send the same batch again forever.
        for _ in 0..5 {
            match sink(&url).deliver(&batch(64, 64 * 1024)).await {
                Err(SinkError::Rejected { status: 413, .. }) => {}
                Err(SinkError::CutOff { reason }) => {
                    assert!(reason.contains("Connection reset by peer"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_retryable_and_says_it_was_refused() {
        // A port nobody listens on: bound, then released.
        let url = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/in", l.local_addr().unwrap())
        };
        match sink(&url).deliver(&[]).await {
            Err(SinkError::Retryable { reason, .. }) => {
                assert!(reason.contains("Connection refused"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_retry_after_given_as_an_http_date_is_honoured() {
        let at = SystemTime::now() + Duration::from_secs(120);
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: {}\r\ncontent-length: 4\r\n\r\n",
            httpdate::fmt_http_date(at)
        );
        let url = answer_once(head, b"busy".to_vec()).await;
        match sink(&url).deliver(&[]).await {
            Err(SinkError::Retryable {
                retry_after: Some(d),
                reason,
            }) => {
                // The date has a resolution of a second, and the request took a moment.
                assert!(
                    (Duration::from_secs(90)..=Duration::from_secs(120)).contains(&d),
                    "{d:?}"
                );
                assert_eq!(reason, "status 503: busy");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_is_seconds_or_a_date_and_anything_else_is_ignored() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date already past means now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
