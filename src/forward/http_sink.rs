//! The HTTP sink: POSTs each batch, as a JSON array or a msgpack array of forward records, to a
//! configured URL. 2xx = delivered. 408, 429, 5xx and transport errors are retryable (with the
//! server's `Retry-After` seconds, if any); any other status is a permanent rejection, reported
//! with up to [`REASON_BYTES_MAX`] bytes of the response body. The worker sends a batch refused
//! with 413 again in halves before it dead-letters anything (see `forward::worker`).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use super::sink::{DeliverFuture, Sink, SinkError};
use crate::chain::SharedRecord;
use crate::config::WireFormat;

/// Bytes of a rejecting response's body kept as the dead-letter reason.
pub const REASON_BYTES_MAX: usize = 2048;

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
        let url: hyper::Uri = url
            .parse()
            .map_err(|e| format!("invalid url {url:?}: {e}"))?;
        let headers = headers
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    HeaderName::from_bytes(k.as_bytes())
                        .map_err(|e| format!("header {k:?}: {e}"))?,
                    HeaderValue::from_str(&v).map_err(|e| format!("header {k:?}: {e}"))?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
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
        let resp = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => {
                return Err(SinkError::Retryable {
                    reason: format!("no response within {} ms", self.timeout.as_millis()),
                    retry_after: None,
                })
            }
            Ok(Err(e)) => {
                return Err(SinkError::Retryable {
                    reason: format!("request failed: {e}"),
                    retry_after: None,
                })
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
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = tokio::time::timeout(
            self.timeout,
            Limited::new(resp.into_body(), 64 * 1024).collect(),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|c| c.to_bytes())
        .unwrap_or_default();
        let reason =
            String::from_utf8_lossy(&body[..body.len().min(REASON_BYTES_MAX)]).into_owned();
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
