//! The accept loop and HTTP/1 connections of every listener, with the limits TorchServe's Netty
//! front end lacks: a connection cap, a request-head timeout, a body idle timeout, a keep-alive
//! idle timeout, a head size cap; errors the HTTP layer makes itself answer in TorchServe's JSON.
//!
//! Why not `axum::serve`: it accepts without bound, sets no timer (a client sending one header
//! byte a second holds its connection forever), and answers malformed requests with empty bodies.
//! Running hyper's http1 connection ourselves is the smallest way to get all of that; the router
//! is unchanged.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::api::error::{ApiError, ErrorKind};
use crate::config::HttpLimits;
use crate::logging::access;
use crate::metrics::Metrics;
use crate::worker::policy::later;

/// What one listener runs under.
#[derive(Clone)]
pub struct Listener {
    pub limits: HttpLimits,
    /// Open connections allowed (resolved `http_max_connections`).
    pub max_connections: usize,
    /// Bytes of an unread request body read and dropped so that an early error answer reaches
    /// the client (`max_request_size`).
    pub drain_limit: usize,
    pub metrics: Arc<Metrics>,
    /// Set on an `https://` listener: every connection does a TLS handshake first.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The default connection cap: a fifth of the open-file limit for each of the three listeners
/// (plus a quarter of that for answering refused connections) leaves over a quarter of the
/// descriptors to workers, archives and logs. At most 10 000, at least 16.
pub fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur as usize
    } else {
        1024
    };
    (soft / 5).clamp(16, 10_000)
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does at start): the soft
/// default of 1024 on many systems is lower than a busy server needs and costs nothing to lift.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    conf: Listener,
    mut stop: watch::Receiver<bool>,
) {
    let conf = Arc::new(conf);
    let slots = Arc::new(Semaphore::new(conf.max_connections));
    // Connections over the cap get a 503 from a small, separately capped set of tasks (they hold
    // a descriptor each for a moment); beyond that the 503 is written only if the socket takes
    // it at once, and the connection closed.
    let refusers = Arc::new(Semaphore::new((conf.max_connections / 4).clamp(1, 64)));
    // Every connection task holds a sender; when all are gone, every connection has ended.
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut last_accept_warning: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: retry shortly rather than spin; the
                // connection cap is what keeps this from happening in the first place.
                if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!("cannot accept a connection: {e}");
                    last_accept_warning = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (stream, peer) = stream;
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let conf = conf.clone();
                let router = router.clone();
                let stop = stop.clone();
                let alive = alive_tx.clone();
                tokio::spawn(async move {
                    connection(stream, peer, router, conf, stop).await;
                    drop(permit);
                    drop(alive);
                });
            }
            Err(_) if conf.tls.is_some() => {
                // A plain-text 503 means nothing to a TLS client, and a handshake just to refuse
                // costs the CPU the cap protects: the connection is closed unanswered.
                drop(stream);
            }
            Err(_) => {
                conf.metrics.host.count_response(503);
                let max = conf.max_connections;
                match refusers.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(async move {
                            refuse(stream, max).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let _ = stream.try_write(&too_many(max));
                    }
                }
            }
        }
    }
    drop(alive_tx);
    let _ = alive_rx.recv().await;
}

/// The 503 of a connection over the cap.
fn too_many(max: usize) -> Vec<u8> {
    json_error(&ApiError::new(
        ErrorKind::ServiceUnavailable,
        format!(
            "too many open connections on this listener (http_max_connections={max}); retry later"
        ),
    ))
}

/// Answers a connection over the cap with a 503 it can read, then closes it. Reads (and drops)
/// what the client has sent first: closing a socket with unread data resets it, and the client
/// would see ECONNRESET instead of the answer. A client that sent its request is let go after a
/// short pause; none is held longer than a second.
async fn refuse(mut stream: TcpStream, max: usize) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&too_many(max)).await;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < 64 * 1024 {
            match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => total += n,
                _ => break,
            }
        }
    })
    .await;
}

/// A whole HTTP/1.1 error response in TorchServe's JSON shape, closing the connection.
fn json_error(e: &ApiError) -> Vec<u8> {
    let body = e.json();
    let status = e.status;
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// State one connection shares between its IO and its requests.
#[derive(Default)]
struct Shared {
    /// Requests whose response has not been written out yet.
    in_flight: AtomicUsize,
    /// The unread rest of the current request's body, for `handle` to drain.
    leftover: Mutex<Option<Incoming>>,
}

/// Counts a request as in flight until dropped (with its response body, once written).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    router: axum::Router,
    conf: Arc<Listener>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(acceptor) = conf.tls.clone() else {
        return serve_connection(stream, peer, router, conf, stop).await;
    };
    // The handshake holds the connection's slot and must finish within http_header_timeout, as
    // a request head must: a client that opens TLS and stalls cannot hold a slot for longer.
    let handshake = tokio::select! {
        r = tokio::time::timeout(conf.limits.header_timeout, acceptor.accept(stream)) => r,
        _ = stop.wait_for(|s| *s) => return,
    };
    match handshake {
        Ok(Ok(tls)) => serve_connection(tls, peer, router, conf, stop).await,
        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
        Err(_) => tracing::debug!(
            "TLS handshake with {peer} did not finish within {} s (http_header_timeout)",
            conf.limits.header_timeout.as_secs()
        ),
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    router: axum::Router,
    conf: Arc<Listener>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Shared::default());
    let io = Watched::new(stream, shared.clone(), &conf);
    let service = {
        let conf = conf.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            // Counted here, synchronously, so that the IO never sees a dispatched request as idle.
            let guard = InFlight::new(&shared);
            handle(req, peer, router.clone(), conf.clone(), guard)
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        // The head timeout is `Watched`'s (with the keep-alive one, on one timer per connection):
        // hyper's own re-arms a timer for every request.
        .header_read_timeout(None)
        .max_header_size(conf.limits.max_header_size)
        // One contiguous buffer per write: `Watched` recognises hyper's own error answers by
        // their first bytes (see there).
        .writev(false);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => {}
    }
    // Shutting down: finish the request in progress, accept no further one on this connection.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// One request, around the router: its id, the body limits, TorchServe's JSON for errors the
/// router answers without a body, the response count and the access log line. Done here rather
/// than as axum middleware, which boxes a future and clones the boxed service per request.
async fn handle(
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
    mut router: axum::Router,
    conf: Arc<Listener>,
    guard: InFlight,
) -> Result<Response<Body>, Infallible> {
    let seen = access::Seen::new(peer, req.method(), req.uri(), req.version());
    let shared = guard.0.clone();
    let mut req = req.map(|b| {
        Body::new(RequestBody {
            inner: Some(b),
            shared,
            idle: conf.limits.body_timeout,
            sleep: None,
            timed_out: false,
        })
    });
    let (id, mut response) = match access::request_id(req.headers()) {
        Ok(id) => {
            req.extensions_mut().insert(access::RequestId(id.clone()));
            let response = match tower_service::Service::call(&mut router, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            (id, response)
        }
        Err(refused) => {
            drop(req);
            (crate::logging::new_request_id(), refused.into_response())
        }
    };
    // The handler answered without reading the whole body (a 404, a 401, a 413...). Read the
    // rest first, up to max_request_size: closing with unread data makes the kernel reset the
    // connection, and a client still sending would get EPIPE instead of this answer.
    let rest = guard.0.leftover.lock().unwrap().take();
    if let Some(rest) = rest {
        if !drain(rest, conf.drain_limit, conf.limits.body_timeout).await {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    // Error answers the router makes itself (405 for a known path with another method) have no
    // body: give them TorchServe's JSON shape.
    let status = response.status();
    if status.as_u16() >= 400
        && !response.headers().contains_key(header::CONTENT_TYPE)
        && response.body().size_hint().exact() == Some(0)
    {
        let message = match status.as_u16() {
            405 => "Requested method is not allowed, please refer to API document.",
            _ => status.canonical_reason().unwrap_or("error"),
        };
        let code = status.as_u16();
        let mut r =
            ApiError::with_status(code, ErrorKind::for_status(code), message).into_response();
        for (name, value) in response.headers() {
            if name != header::CONTENT_LENGTH {
                r.headers_mut().insert(name.clone(), value.clone());
            }
        }
        response = r;
    }
    conf.metrics.host.count_response(status.as_u16());
    if status.as_u16() >= 400 {
        // TorchServe closes the connection after an error answer (see error.rs).
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    access::finish(seen, &id, &mut response);
    Ok(response.map(|body| {
        Body::new(ResponseBody {
            inner: body,
            _guard: guard,
        })
    }))
}

/// Reads and drops what is left of a request body, up to `limit` bytes. True when it ended.
async fn drain(mut body: Incoming, limit: usize, idle: Duration) -> bool {
    use http_body_util::BodyExt;
    let mut total = 0usize;
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    total += data.len();
                    if total > limit {
                        return false;
                    }
                }
            }
            Ok(None) => return true,
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

/// The request body a handler reads: a pause longer than `idle` between two pieces is an error
/// ([`BodyTimeout`]); a body dropped unread is handed back for draining.
struct RequestBody {
    inner: Option<Incoming>,
    /// The connection's: its `leftover` slot takes a body dropped unread (one request at a time
    /// on an HTTP/1 connection, so one slot serves them all).
    shared: Arc<Shared>,
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
}

/// The client paused longer than `http_body_timeout` while sending a request body.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body data for {0} s (http_body_timeout)")]
pub struct BodyTimeout(pub u64);

/// Whether a body error (anywhere in its source chain) is a [`BodyTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(None);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.sleep = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = this.idle;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if sleep.as_mut().poll(cx).is_ready() {
                    this.timed_out = true;
                    this.inner = None;
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(idle.as_secs())))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(body) = self.inner.take() {
            if !body.is_end_stream() {
                *self.shared.leftover.lock().unwrap() = Some(body);
            }
        }
    }
}

/// A response body that keeps its request counted as in flight until written out.
struct ResponseBody {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The TCP (or TLS) stream under hyper. It adds what hyper has no hook for, or does at a cost:
/// - the two timeouts of the wait for a request head: nothing at all has arrived for
///   `keep_alive` since the last byte (an idle keep-alive connection), or the head is not
///   complete `header_timeout` after the wait began. Both run on one timer per connection
///   that moves only when it fires, where hyper's own head timer and a per-wait idle timer were
///   each set and cleared for every request (a timer-wheel lock and an allocation each time,
///   visible in the request path's CPU);
/// - TorchServe's JSON body on the answers hyper writes itself for requests it cannot parse
///   (400 malformed, 414 URI too long, 431 head too large). hyper writes those as a bare head
///   with `content-length: 0` as the first bytes of a write (writev is off); the router never
///   answers an error without a body, so that shape identifies them.
struct Watched<S> {
    inner: S,
    shared: Arc<Shared>,
    keep_alive: Duration,
    header: Duration,
    /// The current wait for a request head: when it began and when a byte last arrived. None
    /// while a request is in flight (hyper then reads only to notice a closed connection).
    wait: Option<(Instant, Instant)>,
    /// Fires at or before the current wait's deadline; re-armed only when it fires early.
    timer: Pin<Box<Sleep>>,
    /// A replacement answer still to be written, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
    metrics: Arc<Metrics>,
}

impl<S> Watched<S> {
    fn new(inner: S, shared: Arc<Shared>, conf: &Listener) -> Watched<S> {
        let now = Instant::now();
        let keep_alive = conf.limits.keep_alive_timeout;
        Watched {
            inner,
            shared,
            keep_alive,
            header: conf.limits.header_timeout,
            wait: None,
            timer: Box::pin(tokio::time::sleep_until(later(now, keep_alive))),
            replacement: None,
            metrics: conf.metrics.clone(),
        }
    }

    /// Starts the wait for a head once no request is in flight (ends it while one is).
    fn note_wait(&mut self) {
        if self.shared.in_flight.load(Ordering::Acquire) > 0 {
            self.wait = None;
        } else if self.wait.is_none() {
            let now = Instant::now();
            self.wait = Some((now, now));
        }
    }

    /// Ready(error) once the wait for a head is over its deadline; otherwise makes sure the
    /// timer wakes the connection by then.
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some((began, last)) = self.wait else {
            return Poll::Pending;
        };
        let idle_end = later(last, self.keep_alive);
        let head_end = later(began, self.header);
        let deadline = idle_end.min(head_end);
        loop {
            if Instant::now() >= deadline {
                let why = if last == began && idle_end <= head_end {
                    "idle keep-alive connection closed (http_keep_alive_timeout)"
                } else {
                    "request head not complete within http_header_timeout"
                };
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, why));
            }
            if self.timer.deadline() > deadline {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // It fired for an earlier wait's deadline: move it to this one's.
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    /// Writes out a pending replacement; Ready(Ok) once none is left.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = self.replacement.as_mut() {
            if *done == bytes.len() {
                self.replacement = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// hyper's own error answer at the start of `buf`, as (status, head length).
fn hyper_error_head(buf: &[u8]) -> Option<(u16, usize)> {
    let rest = buf
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| buf.strip_prefix(b"HTTP/1.0 "))?;
    let status: u16 = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    if !matches!(status, 400 | 414 | 431) {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?.to_ascii_lowercase();
    (head.contains("\r\ncontent-length: 0\r\n") && !head.contains("content-type"))
        .then_some((status, end))
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.note_wait();
        let before = buf.filled().len();
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_read(cx, buf) {
            if buf.filled().len() > before {
                if let Some((_, last)) = this.wait.as_mut() {
                    *last = Instant::now();
                }
            }
            return Poll::Ready(r);
        }
        match this.poll_wait(cx) {
            Poll::Ready(e) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        if let Some((status, head)) = hyper_error_head(buf) {
            let message = match status {
                414 => "the request URI is too long".to_string(),
                431 => {
                    "the request line and headers are larger than http_max_header_size".to_string()
                }
                _ => "malformed HTTP request".to_string(),
            };
            this.metrics.host.count_response(status);
            this.replacement = Some((
                json_error(&ApiError::with_status(
                    status,
                    ErrorKind::for_status(status),
                    message,
                )),
                0,
            ));
            // hyper sees its head as written; the JSON answer goes out in its place.
            let _ = this.poll_replacement(cx)?;
            return Poll::Ready(Ok(head));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        // The last write of a response is where its request stops being in flight. hyper may
        // have polled the read side earlier in the same turn (and not again before the client
        // sends something), so the wait for the next head starts, and its timer is set, here:
        // otherwise an idle connection would never be woken to time out.
        if this.wait.is_none() {
            this.note_wait();
            if this.poll_wait(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_hyper_bare_error_heads() {
        let bare =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(hyper_error_head(bare), Some((431, bare.len())));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_error_head(ours), None);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_error_head(ok), None);
    }
}
