//! The HTTP/1.1 connection layer shared by the ingest and metrics listeners: a bounded number of
//! connections, timeouts that keep a slow or hostile client from pinning the daemon, and
//! graceful shutdown.
//!
//! Bounds and timeouts:
//! - at most `connections_max` connections are served at once. When all slots are taken, the
//!   listener accepts one more connection and asks the connection that has been idle longest
//!   (between requests, or never sent one) to close; hyper closes an idle keep-alive connection
//!   at once, so a new client does not wait `idle_timeout` behind a pool of parked ones. A
//!   connection in the middle of a request is never chosen, nor one whose task has not yet
//!   read from its socket: its first request may already be waiting there, and under a flood
//!   of accepts a fresh connection can turn longest-idle before its task first runs. With none
//!   idle, the accepted connection waits for a free slot and further ones wait in the kernel's
//!   accept backlog, so at most `connections_max + 1` sockets are open;
//! - a client must send a request's whole header block within `header_read_timeout`
//!   (slowloris), enforced by hyper;
//! - a connection that makes no progress in either direction for `idle_timeout` is closed —
//!   this covers idle keep-alive connections and clients that never read their response. The
//!   clock does not run while a request is being handled: its body has `body_read_timeout`,
//!   and the spool's commit may take longer than `idle_timeout` on a slow disk. (hyper reads
//!   from the socket while the handler runs, to notice a client that hangs up; a timeout there
//!   once cut a request whose fdatasync was slow, and the client's retry found its id still
//!   being written and got 409);
//! - the request body must arrive within `body_read_timeout` (enforced by the handler, which
//!   knows the route).
//!
//! On shutdown the listener stops accepting, every connection finishes the request it is
//! serving (hyper's graceful shutdown closes idle keep-alive connections at once), and `serve`
//! returns when all are closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{Instant, Sleep};

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub connections_max: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// A stream that fails with `TimedOut` once neither reads nor writes made progress for
/// `timeout`.
struct IdleTimeout<T> {
    inner: T,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Told when the stream is first read from, which makes the connection evictable.
    state: Arc<ConnState>,
}

impl<T> IdleTimeout<T> {
    fn new(inner: T, timeout: Duration, state: Arc<ConnState>) -> Self {
        IdleTimeout {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            state,
        }
    }

    fn progressed(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }

    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        // A request being handled is not idle (see the module doc). The deadline restarts from
        // now, and is polled again (and so armed) once the connection is read or written after
        // its response.
        if self.state.busy.load(std::sync::atomic::Ordering::Acquire) > 0 {
            self.progressed();
            return Poll::Pending;
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if let Some(m) = &self.state.metrics {
                    m.timed_out_total.inc();
                }
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle timeout",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Only this task writes the flag, so a plain load keeps later reads free of a
        // read-modify-write.
        if !this
            .state
            .read_from
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            this.state
                .read_from
                .store(true, std::sync::atomic::Ordering::Release);
            this.state.evictable.notify_one();
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

pub type HttpResponse = Response<Full<Bytes>>;

/// What a listener counts about its connections.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: prometheus::IntGauge,
    /// Idle connections closed to make room for a new one at `connections_max`.
    pub evicted_total: prometheus::IntCounter,
    /// Connections closed because nothing moved for `idle_timeout`.
    pub timed_out_total: prometheus::IntCounter,
}

/// How often a listener at its connection limit looks again for an idle connection to close
/// while none is a candidate (every connection busy, or not yet read from and no first read
/// since).
const EVICTION_RETRY: Duration = Duration::from_millis(50);

/// One served connection, as the eviction policy sees it.
struct ConnState {
    /// Requests being handled on this connection (HTTP/1: 0 or 1).
    busy: std::sync::atomic::AtomicUsize,
    /// False from accept until the connection's task first reads from the socket; until then
    /// a request may be waiting unread, so the connection is not a candidate for eviction.
    read_from: std::sync::atomic::AtomicBool,
    /// When the connection last became idle (accepted, or finished a request).
    idle_since: Mutex<Instant>,
    /// Notified to ask the connection to close once its current request (if any) is answered.
    evict: Notify,
    /// The listener's [`Connections::evictable`]: notified when this connection is first read
    /// from, so a listener waiting for a candidate looks again at once. (A connection turning
    /// idle after a request is not announced: that is off the per-request path, and a listener
    /// finding every connection busy looks again after [`EVICTION_RETRY`].)
    evictable: Arc<Notify>,
    /// The listener's counters, if it keeps any.
    metrics: Option<ConnectionMetrics>,
}

/// The open connections of one listener; at most `connections_max` entries.
#[derive(Default)]
struct Connections {
    next_id: std::sync::atomic::AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// Notified when a connection is first read from and so becomes a candidate for eviction.
    evictable: Arc<Notify>,
    metrics: Option<ConnectionMetrics>,
}

impl Connections {
    fn register(&self) -> (u64, Arc<ConnState>) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let state = Arc::new(ConnState {
            busy: std::sync::atomic::AtomicUsize::new(0),
            read_from: std::sync::atomic::AtomicBool::new(false),
            evictable: self.evictable.clone(),
            metrics: self.metrics.clone(),
            idle_since: Mutex::new(Instant::now()),
            evict: Notify::new(),
        });
        self.lock().insert(id, state.clone());
        (id, state)
    }

    fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Asks the connection idle the longest to close. False when every connection is busy or
    /// has not been read from yet.
    fn evict_longest_idle(&self) -> bool {
        let open = self.lock();
        let victim = open
            .iter()
            .filter(|(_, c)| {
                c.busy.load(std::sync::atomic::Ordering::Acquire) == 0
                    && c.read_from.load(std::sync::atomic::Ordering::Acquire)
            })
            .min_by_key(|(id, c)| {
                (
                    *c.idle_since.lock().unwrap_or_else(|p| p.into_inner()),
                    **id,
                )
            });
        match victim {
            Some((id, c)) => {
                // notify_one stores a permit if the connection task is not waiting yet.
                c.evict.notify_one();
                let id = *id;
                drop(open);
                // Once asked, it no longer counts as a candidate.
                self.unregister(id);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves once `rx` reads true (or its sender is gone). The watch guard is dropped inside, so
/// the future stays `Send`.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Serves `listener` until `shutdown` turns true, then drains connections gracefully.
/// `metrics`, when given, counts open, evicted and timed-out connections.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
    metrics: Option<ConnectionMetrics>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let connections = Arc::new(Connections {
        metrics: metrics.clone(),
        ..Connections::default()
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    loop {
        let (stream, _peer) = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Every slot is taken: make room by closing the connection idle longest (see
                // the module doc). One eviction per accepted connection: the one asked closes
                // at once (or right after a request that raced the ask), so asking again while
                // waiting would close more connections than the one needed.
                let mut asked = false;
                let waited = loop {
                    if !asked && connections.evict_longest_idle() {
                        asked = true;
                        if let Some(m) = &metrics {
                            m.evicted_total.inc();
                        }
                    }
                    tokio::select! {
                        biased;
                        _ = stopped(&mut shutdown) => break None,
                        p = permits.clone().acquire_owned() => break p.ok(),
                        _ = connections.evictable.notified(), if !asked => {}
                        _ = tokio::time::sleep(EVICTION_RETRY) => {}
                    }
                };
                let Some(p) = waited else { break };
                p
            }
        };
        spawn_connection(
            stream,
            permit,
            &builder,
            &handler,
            limits,
            &connections,
            shutdown.clone(),
        );
    }
    drop(listener);
    // Every connection holds a permit until it has closed; having them all back means every
    // connection finished its request and closed.
    let _ = permits
        .acquire_many(u32::try_from(limits.connections_max).unwrap_or(u32::MAX))
        .await;
}

/// Serves one accepted connection on its own task until it closes, is evicted, or the listener
/// shuts down (then it finishes its current request and closes).
#[allow(clippy::too_many_arguments)]
fn spawn_connection<H, F>(
    stream: tokio::net::TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
    builder: &hyper::server::conn::http1::Builder,
    handler: &H,
    limits: ConnectionLimits,
    connections: &Arc<Connections>,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let (id, state) = connections.register();
    let io = TokioIo::new(IdleTimeout::new(stream, limits.idle_timeout, state.clone()));
    let handler = handler.clone();
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        let state = service_state.clone();
        async move {
            state.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let response = handler(req).await;
            *state.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            state.busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            Ok::<_, Infallible>(response)
        }
    });
    let conn = builder.serve_connection(io, service);
    let connections = connections.clone();
    tokio::spawn(async move {
        if let Some(m) = &state.metrics {
            m.open.inc();
        }
        let mut conn = std::pin::pin!(conn);
        // Connection errors (timeouts, resets, malformed requests) are the client's problem;
        // hyper has already answered what it could.
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = stopped(&mut shutdown) => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            _ = state.evict.notified() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
        connections.unregister(id);
        if let Some(m) = &state.metrics {
            m.open.dec();
        }
        drop(permit);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_connection_not_yet_read_from_is_never_evicted_even_when_idle_longest() {
        let connections = Connections::default();
        let (_, unread) = connections.register();
        let (read_id, read) = connections.register();
        read.read_from.store(true, Ordering::Release);
        assert!(connections.evict_longest_idle());
        // The newer connection, read from, was asked; the older unread one stays registered.
        assert!(!connections.lock().contains_key(&read_id));
        assert_eq!(connections.lock().len(), 1);
        assert!(!connections.evict_longest_idle());
        unread.read_from.store(true, Ordering::Release);
        assert!(connections.evict_longest_idle());
        assert!(connections.lock().is_empty());
    }

    #[test]
    fn a_busy_connection_is_never_evicted() {
        let connections = Connections::default();
        let (_, c) = connections.register();
        c.read_from.store(true, Ordering::Release);
        c.busy.fetch_add(1, Ordering::AcqRel);
        assert!(!connections.evict_longest_idle());
        c.busy.fetch_sub(1, Ordering::AcqRel);
        assert!(connections.evict_longest_idle());
    }
}
