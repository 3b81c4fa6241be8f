//! Ingest: the HTTP front end on loopback.
//!
//! `POST /v1/envelopes` takes one envelope or a batch (JSON object or array, NDJSON, msgpack
//! map or array). The request is checked in this order, and the first failure answers:
//!
//! | check                                   | status | body `error`          |
//! |-----------------------------------------|--------|-----------------------|
//! | route and method                        | 404/405| `not_found`/`method_not_allowed` |
//! | recovery finished                       | 503    | `not_ready`           |
//! | spool not poisoned                      | 503    | `poisoned`            |
//! | bearer token (when tokens configured)   | 401/403| `unauthorized`/`forbidden` |
//! | content type                            | 415    | `unsupported_media_type` |
//! | Content-Length / body size              | 413    | `body_too_large`      |
//! | room in `ingest.inflight_bytes_max`      | 429    | `backpressure`, reason `inflight_bytes` |
//! | body arrives within the timeout         | 408    | `body_timeout`        |
//! | what parsing it builds fits the budget  | 413/429| `too_many_values`, or `backpressure` reason `inflight_bytes` |
//! | every item valid (see `parse`)          | 400/413| `invalid_envelope`, ... with `index` |
//! | the request's records fit one segment   | 413    | `request_too_large`   |
//! | backpressure watermarks                 | 429    | `backpressure` with `reason` |
//! | no concurrent request with the same id  | 409    | `id_in_flight` with `index` |
//! | streams known or below `streams_max`    | 422    | `stream_limit` with `index` |
//! | spool append (fdatasync'd per `spool.durability`) | 429 on ENOSPC, 503 `poisoned` on I/O failure, `busy` without a file descriptor, `unavailable` while closing |
//!
//! Only then `202 Accepted`, with each envelope's `id`, `slot` and spool `position`. A batch is
//! all-or-nothing and judged by its lowest priority. Nothing of a refused request is written.

pub mod backpressure;
pub mod dedup;
pub mod dedup_file;
mod fast_parse;
pub mod ids;
pub mod inflight;
mod msgpack_items;
pub mod parse;
pub mod server;
pub mod streams;
pub mod values;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::config::Config;
use crate::envelope::Priority;
use crate::metrics::Metrics;
use crate::spool::{RecordKind, Spool, SpoolError};
use backpressure::{Backpressure, Refusal};
use dedup::{Dedup, Reservation};
use parse::{ContentType, ParseLimits};
use server::HttpResponse;
use streams::KnownStreams;

/// Everything the ingest handlers share. `spool` is set once recovery has finished; until then
/// every ingest request is answered 503 and `/readyz` fails.
pub struct IngestState {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub spool: OnceLock<Spool>,
    /// Shared with the spool's commit hooks, which complete reservations (`dedup::Completion`).
    pub dedup: Arc<Dedup>,
    /// Streams admitted so far, bounded by `ingest.streams_max`.
    pub streams: Arc<KnownStreams>,
    pub backpressure: Backpressure,
    /// Request bodies held in memory, bounded by `ingest.inflight_bytes_max`.
    pub inflight: Arc<inflight::InflightBudget>,
    /// Set when shutdown starts: new requests get 503 while in-flight ones finish.
    pub draining: std::sync::atomic::AtomicBool,
    /// Appends refused for a full filesystem since the last one that succeeded. A full disk
    /// refuses every request, thousands a second, and the log may live on that same disk: so
    /// only the first refusal of a run is logged, and the next success logs how many there were
    /// (every one is counted in `spoolgate_ingest_rejected_total{reason="enospc"}`).
    pub enospc_refusals: std::sync::atomic::AtomicU64,
    /// The disk reserve (set by the daemon): while it is spent, ingest is refused unless its
    /// space is free again above the hard watermark.
    pub reserve: OnceLock<Arc<crate::compaction::reserve::Reserve>>,
}

impl IngestState {
    pub fn new(config: Config, metrics: Arc<Metrics>) -> IngestState {
        let dedup = Arc::new(Dedup::new(
            Duration::from_secs(config.ingest.dedup_window_secs),
            config.ingest.dedup_entries_max,
        ));
        let backpressure = Backpressure::new(&config.spool);
        let streams = Arc::new(KnownStreams::new(config.ingest.streams_max));
        let inflight = inflight::InflightBudget::new(
            config.ingest.inflight_bytes_max,
            metrics.ingest_inflight_bytes.clone(),
        );
        IngestState {
            config,
            metrics,
            spool: OnceLock::new(),
            dedup,
            streams,
            backpressure,
            inflight,
            draining: std::sync::atomic::AtomicBool::new(false),
            enospc_refusals: std::sync::atomic::AtomicU64::new(0),
            reserve: OnceLock::new(),
        }
    }

    /// Ready = recovered, not poisoned, not draining, and below the hard watermarks.
    pub fn readiness(&self) -> Result<(), &'static str> {
        let Some(spool) = self.spool.get() else {
            return Err("recovering");
        };
        if spool.poison_reason().is_some() {
            return Err("poisoned");
        }
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("shutting down");
        }
        if !self.backpressure.below_hard_marks() {
            return Err("above a hard watermark");
        }
        // Ingest refuses every priority while the spent reserve's space is not free again, as
        // above a hard mark; an orchestrator should move traffic elsewhere meanwhile.
        if self.reserve_refusal().is_some() {
            return Err("disk reserve spent");
        }
        Ok(())
    }

    /// The refusal while the disk reserve is spent and its space is not free again
    /// (`compaction::reserve`), if that is so at the last sample.
    fn reserve_refusal(&self) -> Option<Refusal> {
        let free = self.backpressure.free_bytes();
        let reserve = self.reserve.get().filter(|r| r.refuses_ingest(free))?;
        Some(self.backpressure.reserve_spent(reserve.spent_floor_bytes()))
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn json_response(status: StatusCode, body: serde_json::Value) -> HttpResponse {
    bytes_response(status, body.to_string().into_bytes())
}

/// A response whose body is `body`, already JSON.
fn bytes_response(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> HttpResponse {
    json_response(status, json!({"error": code, "message": message.into()}))
}

/// Counts a 429 refusal by its reason and answers it.
fn refuse(state: &IngestState, r: &Refusal) -> HttpResponse {
    state
        .metrics
        .ingest_rejected_total
        .with_label_values(&[r.reason])
        .inc();
    let mut resp = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "error": "backpressure",
            "reason": r.reason,
            "limit": r.limit,
            "limit_bytes": r.limit_bytes,
            "current_bytes": r.current_bytes,
            "retry_after_secs": r.retry_after_secs,
            "message": format!("refused: {} (limit {}); retry after {} s", r.reason, r.limit, r.retry_after_secs),
        }),
    );
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(r.retry_after_secs));
    resp
}

/// Entry point for the ingest listener.
pub async fn handle(state: Arc<IngestState>, req: Request<Incoming>) -> HttpResponse {
    let started = Instant::now();
    let route = if req.uri().path() == "/v1/envelopes" {
        "/v1/envelopes"
    } else {
        "other"
    };
    let resp = route_request(&state, req).await;
    let m = &state.metrics;
    m.ingest_requests_total
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    m.ingest_request_duration_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn route_request(state: &IngestState, req: Request<Incoming>) -> HttpResponse {
    if req.uri().path() != "/v1/envelopes" {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route {}", req.uri().path()),
        );
    }
    if req.method() != Method::POST {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        );
        resp.headers_mut()
            .insert("allow", HeaderValue::from_static("POST"));
        return resp;
    }
    ingest(state, req).await
}

fn unavailable(state: &IngestState, reason: &'static str, message: String) -> HttpResponse {
    state
        .metrics
        .ingest_rejected_total
        .with_label_values(&[reason])
        .inc();
    error(StatusCode::SERVICE_UNAVAILABLE, reason, message)
}

async fn ingest(state: &IngestState, req: Request<Incoming>) -> HttpResponse {
    let Some(spool) = state.spool.get() else {
        return unavailable(state, "not_ready", "recovery is still running".into());
    };
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return unavailable(state, "not_ready", "shutting down".into());
    }
    if let Some(reason) = spool.poison_reason() {
        return unavailable(state, "poisoned", format!("spool refuses writes: {reason}"));
    }
    let cfg = &state.config.ingest;

    let auth_tenant = if cfg.tokens.is_empty() {
        None
    } else {
        let header = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a bearer token is required",
            );
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return resp;
        };
        match cfg
            .tokens
            .iter()
            .find(|t| constant_time_eq(t.token.as_bytes(), token.as_bytes()))
        {
            Some(t) => Some(t.tenant.clone()),
            None => {
                return error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "the bearer token is not valid",
                )
            }
        }
    };

    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(content_type) = ContentType::parse(content_type) else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {content_type:?} is not one of application/json, application/x-ndjson, application/msgpack"
            ),
        );
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared {
        if len > cfg.body_bytes_max {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "body of {len} bytes exceeds ingest.body_bytes_max {}",
                    cfg.body_bytes_max
                ),
            );
        }
    }
    // Held until the response is ready: the body, the parsed envelopes and their frames live
    // until then. The spool request holds it too (in its commit hook), because the frames stay
    // queued for the writer when a client that hangs up drops this handler: the bound then
    // still covers them, until the writer has taken or refused them.
    let mut inflight = match state.inflight.take(declared.unwrap_or(cfg.body_bytes_max)) {
        Ok(bytes) => bytes,
        Err(refusal) => return refuse(state, &refusal),
    };
    let limited = Limited::new(req.into_body(), cfg.body_bytes_max as usize);
    let body = match tokio::time::timeout(
        Duration::from_millis(cfg.body_read_timeout_ms),
        limited.collect(),
    )
    .await
    {
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("body not received within {} ms", cfg.body_read_timeout_ms),
            )
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("body exceeds ingest.body_bytes_max {}", cfg.body_bytes_max),
            )
        }
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, "body_read_failed", e.to_string()),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    // A chunked body took `body_bytes_max`; now that its size is known it keeps only that, or
    // it would hold the rest until its response while other requests are refused for it, and
    // with `inflight_bytes_max` at `body_bytes_max` it could never take what decoding needs.
    inflight.shrink_to(body.len() as u64);
    let inflight = Arc::new(inflight);

    // What decoding builds is charged too, by its values and items, before anything is
    // decoded (see `values`).
    let decoded_bytes = values::decoded_bytes(content_type, &body);
    if decoded_bytes.saturating_add(body.len() as u64) > cfg.inflight_bytes_max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_values",
            format!(
                "the body holds so many values or envelopes that decoding it would take about \
                 {decoded_bytes} bytes, over ingest.inflight_bytes_max {}; send fewer or larger \
                 values or envelopes per request",
                cfg.inflight_bytes_max
            ),
        );
    }
    let _decoded = match state.inflight.take(decoded_bytes) {
        Ok(bytes) => bytes,
        Err(refusal) => return refuse(state, &refusal),
    };

    let limits = ParseLimits {
        batch_items_max: cfg.batch_items_max,
        envelope_bytes_max: cfg.envelope_bytes_max,
        unknown_fields: cfg.unknown_fields,
    };
    let mut parsed = match parse::parse_request(
        content_type,
        &body,
        &limits,
        auth_tenant.as_deref(),
        now_ms(),
    ) {
        Ok(p) => p,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let mut body = json!({"error": e.code(), "message": e.to_string()});
            if let Some(index) = e.index() {
                body["index"] = json!(index);
            }
            return json_response(status, body);
        }
    };

    // A request is written as one group in one segment (that is what makes it all-or-nothing
    // on disk), so one that cannot fit an empty segment is refused here rather than written
    // past the segment's bound.
    let request_bytes: u64 = parsed
        .iter()
        .map(|p| crate::spool::format::frame_len(p.stored_len))
        .sum();
    let request_bytes_max = spool.request_bytes_max();
    if request_bytes > request_bytes_max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "the request's {} envelopes take {request_bytes} bytes in the spool, more than one segment holds ({request_bytes_max} bytes: spool.segment_bytes_max less its header and rotation frame); send them in smaller batches",
                parsed.len()
            ),
        );
    }

    let lowest = parsed
        .iter()
        .map(|p| p.envelope.priority)
        .max()
        .unwrap_or(Priority::Normal);
    if let Err(refusal) = state.backpressure.check(lowest) {
        return refuse(state, &refusal);
    }
    if let Some(refusal) = state.reserve_refusal() {
        return refuse(state, &refusal);
    }

    // Only ids the client chose are looked up and remembered. A generated id is new by
    // construction and a retry of its request would get another one, so indexing it would buy
    // nothing and would let id-less traffic evict the ids of clients that rely on dedup.
    // A client that sends back an id spoolgate generated is treated alike: a restart cannot
    // tell it from a generated one (`ids`), so indexing it now would deduplicate it only until
    // then.
    let keys: Vec<Option<String>> = parsed
        .iter()
        .map(|p| {
            (!p.id_generated && !crate::ingest::ids::is_generated(&p.envelope.id))
                .then(|| dedup::key(p.envelope.tenant.as_deref(), &p.envelope.id))
        })
        .collect();
    let client_keys: Vec<String> = keys.iter().flatten().cloned().collect();
    let mut found = match state.dedup.reserve(&client_keys) {
        Ok(r) => r.into_iter(),
        Err(conflict) => {
            // The conflict's index is among the client-chosen ids; report the item's index.
            let index = keys
                .iter()
                .enumerate()
                .filter(|(_, k)| k.is_some())
                .nth(conflict.index)
                .map_or(conflict.index, |(i, _)| i);
            return json_response(
                StatusCode::CONFLICT,
                json!({
                    "error": "id_in_flight",
                    "index": index,
                    "message": format!("envelope at index {index}: its id is being written by a concurrent request; retry"),
                }),
            );
        }
    };
    let reservations: Vec<Reservation> = keys
        .iter()
        .map(|k| match k {
            Some(_) => found.next().expect("one reservation per client-chosen id"),
            None => Reservation::Reserved,
        })
        .collect();
    // Only envelopes that will be written can make a stream: a retry answered from the dedup
    // index writes nothing, so its streams (a retried id may come with another source) must not
    // count against the bound.
    let to_admit: Vec<usize> = (0..parsed.len())
        .filter(|&i| reservations[i] == Reservation::Reserved)
        .collect();
    let admission = match state
        .streams
        .admit(to_admit.iter().map(|&i| parsed[i].envelope.stream()))
    {
        Ok(admission) => admission,
        Err(limit) => {
            state.dedup.abort(
                keys.iter()
                    .zip(&reservations)
                    .filter(|(_, r)| **r == Reservation::Reserved)
                    .filter_map(|(k, _)| k.clone()),
            );
            state
                .metrics
                .ingest_rejected_total
                .with_label_values(&["streams"])
                .inc();
            let index = to_admit[limit.index];
            return json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "error": "stream_limit",
                    "index": index,
                    "message": format!(
                        "envelope at index {}: stream {:?} would be a new stream, and ingest.streams_max ({}) streams exist already",
                        index, limit.stream, limit.streams_max
                    ),
                }),
            );
        }
    };
    // The encoded bytes move into the records (nothing below needs them): no copy per envelope.
    let to_write: Vec<(RecordKind, Bytes)> = parsed
        .iter_mut()
        .zip(&reservations)
        .filter(|(_, r)| **r == Reservation::Reserved)
        .map(|(p, _)| (RecordKind::ENVELOPE, std::mem::take(&mut p.encoded)))
        .collect();
    let written = if to_write.is_empty() {
        Vec::new()
    } else {
        let reserved: Vec<Option<(String, u16)>> = keys
            .iter()
            .zip(&reservations)
            .zip(&parsed)
            .filter(|((_, r), _)| **r == Reservation::Reserved)
            .map(|((k, _), p)| k.clone().map(|k| (k, p.envelope.slot)))
            .collect();
        // The index learns the positions on the writer thread, before the records can be
        // forwarded and compacted: were it told here, after the await, a record could be
        // delivered and its segment deleted first, and its id would miss the dedup checkpoint.
        // Failing or dropped half-way, the completion releases the keys instead.
        let completion = dedup::Completion::new(state.dedup.clone(), reserved);
        let queued = inflight.clone();
        // The request's new streams are kept once its records are durable; a request the
        // spool refuses drops the hook unrun and gives them back (see `streams`).
        let hook: crate::spool::CommitHook =
            Box::new(move |positions: &[crate::spool::Position]| {
                completion.complete(positions);
                admission.commit();
                drop(queued);
            });
        match spool.append_then(to_write, hook).await {
            Ok(positions) => {
                // A plain load keeps the common case free of a read-modify-write.
                if state.enospc_refusals.load(Ordering::Relaxed) > 0 {
                    let refused = state.enospc_refusals.swap(0, Ordering::Relaxed);
                    if refused > 0 {
                        tracing::info!(
                            refused,
                            "appends succeed again after the filesystem was full"
                        );
                    }
                }
                positions
            }
            Err(e) => return append_error(state, e),
        }
    };
    let mut written_iter = written.iter();
    let mut items = Vec::with_capacity(parsed.len());
    let mut hits = 0u64;
    for (p, r) in parsed.iter().zip(&reservations) {
        let (position, slot, duplicate) = match r {
            Reservation::Reserved => {
                let position = *written_iter
                    .next()
                    .expect("one position per written record");
                (position, p.envelope.slot, false)
            }
            Reservation::Hit { position, slot } => {
                hits += 1;
                (*position, *slot, true)
            }
        };
        items.push(AcceptedItem {
            duplicate,
            id: &p.envelope.id,
            position: AcceptedPosition {
                offset: position.offset,
                segment: position.segment,
            },
            slot,
        });
    }
    state.metrics.ingest_dedup_hits_total.inc_by(hits);
    state
        .metrics
        .ingest_envelopes_accepted_total
        .inc_by(written.len() as u64);
    bytes_response(StatusCode::ACCEPTED, accepted_body(&items))
}

/// The 202 body, written directly: the bytes serde_json writes for [`Accepted`] (a test holds
/// them equal), without its per-byte escaping of every id, which was ~3% of batch ingest's CPU.
/// Keys are in the order a `serde_json::Value` map sorts them, as the body was first built.
fn accepted_body(items: &[AcceptedItem]) -> Vec<u8> {
    use crate::forward::json::{write_str, write_u64};
    // About 90 bytes per item besides its id.
    let ids: usize = items.iter().map(|i| i.id.len()).sum();
    let mut out = Vec::with_capacity(40 + items.len() * 90 + ids);
    out.extend_from_slice(b"{\"accepted\":");
    write_u64(&mut out, items.len() as u64);
    out.extend_from_slice(b",\"envelopes\":[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"duplicate\":");
        out.extend_from_slice(if item.duplicate { b"true" } else { b"false" });
        out.extend_from_slice(b",\"id\":");
        write_str(&mut out, item.id);
        out.extend_from_slice(b",\"position\":{\"offset\":");
        write_u64(&mut out, item.position.offset);
        out.extend_from_slice(b",\"segment\":");
        write_u64(&mut out, item.position.segment);
        out.extend_from_slice(b"},\"slot\":");
        write_u64(&mut out, u64::from(item.slot));
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// The 202 body's shape, as serde_json writes it: the oracle of [`accepted_body`].
#[cfg(test)]
#[derive(serde::Serialize)]
struct Accepted<'a> {
    accepted: usize,
    envelopes: &'a [AcceptedItem<'a>],
}

#[derive(serde::Serialize)]
struct AcceptedItem<'a> {
    duplicate: bool,
    id: &'a str,
    position: AcceptedPosition,
    slot: u16,
}

#[derive(serde::Serialize)]
struct AcceptedPosition {
    offset: u64,
    segment: u64,
}

fn append_error(state: &IngestState, e: SpoolError) -> HttpResponse {
    match e {
        SpoolError::Full(detail) => {
            if state.enospc_refusals.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(%detail, "append refused: filesystem full; further refusals are only counted until an append succeeds");
            }
            refuse(state, &state.backpressure.enospc())
        }
        SpoolError::TooLarge { len, max } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "envelope_too_large",
            format!("an envelope takes {len} bytes stored in the spool (each byte 0xF7 of its encoding, which only numbers or binary values in `meta` produce, takes two), more than spool.record_bytes_max {max}"),
        ),
        SpoolError::Poisoned(reason) => {
            unavailable(state, "poisoned", format!("spool refuses writes: {reason}"))
        }
        SpoolError::Busy(reason) => {
            tracing::warn!(%reason, "append refused: no file descriptor for a new segment");
            let mut resp = unavailable(
                state,
                "busy",
                format!("spool cannot take writes now: {reason}"),
            );
            resp.headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        // Closing (shutdown) or an error the writer did not poison for: not the poison
        // `/readyz` reports, so not called that.
        other => unavailable(state, "unavailable", format!("spool write failed: {other}")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Entry point for the metrics/health listener.
pub async fn handle_admin(state: Arc<IngestState>, req: Request<Incoming>) -> HttpResponse {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            // An alert on readiness needs it as a series: a probe's answer is not scraped.
            state
                .metrics
                .ready
                .set(i64::from(state.readiness().is_ok()));
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "alive"})),
        (&Method::GET, "/readyz") => match state.readiness() {
            Ok(()) => json_response(StatusCode::OK, json!({"status": "ready"})),
            Err(why) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not_ready", "reason": why}),
            ),
        },
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "routes: /metrics, /healthz, /readyz",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_equal_bytes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn the_accepted_body_has_the_bytes_of_the_value_it_replaced() {
        let items = [
            AcceptedItem {
                duplicate: false,
                id: "01JD\"x",
                position: AcceptedPosition {
                    offset: 64,
                    segment: 3,
                },
                slot: 1023,
            },
            AcceptedItem {
                duplicate: true,
                id: "c2",
                position: AcceptedPosition {
                    offset: 4_294_967_296,
                    segment: 1,
                },
                slot: 0,
            },
        ];
        let typed = serde_json::to_string(&Accepted {
            accepted: 2,
            envelopes: &items,
        })
        .unwrap();
        let value = json!({"accepted": 2, "envelopes": [
            {"id": "01JD\"x", "slot": 1023, "position": {"segment": 3, "offset": 64}, "duplicate": false},
            {"id": "c2", "slot": 0, "position": {"segment": 1, "offset": 4_294_967_296u64}, "duplicate": true},
        ]});
        assert_eq!(typed, value.to_string());
        assert_eq!(String::from_utf8(accepted_body(&items)).unwrap(), typed);
    }

    proptest::proptest! {
        #[test]
        fn the_directly_written_accepted_body_is_serde_jsons(
            rows in proptest::collection::vec(
                (proptest::prelude::any::<bool>(), ".{0,40}", proptest::prelude::any::<u64>(),
                 proptest::prelude::any::<u64>(), proptest::prelude::any::<u16>()),
                0..6,
            ),
        ) {
            let items: Vec<AcceptedItem> = rows
                .iter()
                .map(|(duplicate, id, offset, segment, slot)| AcceptedItem {
                    duplicate: *duplicate,
                    id,
                    position: AcceptedPosition { offset: *offset, segment: *segment },
                    slot: *slot,
                })
                .collect();
            let oracle = serde_json::to_vec(&Accepted { accepted: items.len(), envelopes: &items })
                .unwrap();
            proptest::prop_assert_eq!(accepted_body(&items), oracle);
        }
    }
}
