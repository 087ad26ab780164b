//! TLS for the gRPC listeners (`enable_grpc_ssl=true`), with the same `private_key_file` and
//! `certificate_file` as the HTTPS listeners, as TorchServe does.
//!
//! The handshake is done here (tokio-rustls, ALPN `h2`), not by tonic's own TLS feature, so the
//! key handling (PEM only, short legacy RSA keys on TLS 1.2 with a warning) is src/api/tls.rs's,
//! shared with HTTPS, and no second TLS stack is compiled in. Each handshake runs in a task of its
//! own under `http_header_timeout`, so a client that connects and sends nothing holds no other
//! connection up; at most [`MAX_HANDSHAKES`] run at once, and connections past that are closed.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Handshakes in progress at most (per listener).
pub const MAX_HANDSHAKES: usize = 256;

/// A TLS connection, as tonic serves it.
pub struct TlsIo {
    stream: TlsStream<TcpStream>,
    local: Option<SocketAddr>,
    peer: SocketAddr,
}

impl Connected for TlsIo {
    type ConnectInfo = TcpConnectInfo;

    /// The same connect info as a cleartext connection: `Request::remote_addr` works alike.
    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        }
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The TLS connections of `listener`, handshaken, as the stream tonic's
/// `serve_with_incoming_shutdown` takes. The accept loop ends once the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    what: &'static str,
) -> impl Stream<Item = Result<TlsIo, io::Error>> {
    let (tx, rx) = mpsc::channel::<Result<TlsIo, io::Error>>(64);
    let local = listener.local_addr().ok();
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!("gRPC {what} listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(
                    "gRPC {what}: {MAX_HANDSHAKES} TLS handshakes in progress; closed the connection from {peer}"
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsIo { stream, local, peer })).await;
                    }
                    Ok(Err(e)) => tracing::debug!("gRPC {what}: TLS handshake with {peer} failed: {e}"),
                    Err(_) => tracing::debug!(
                        "gRPC {what}: TLS handshake with {peer} did not finish within {} s (http_header_timeout)",
                        handshake_timeout.as_secs()
                    ),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
