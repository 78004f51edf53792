//! The connections the gRPC server accepts: plain TCP, or TLS (with the client certificate's
//! identity, for mTLS), tuned for many small responses.
//!
//! Two things tonic does not do for a listener it is handed (`serve_with_incoming`):
//!
//! - **TCP_NODELAY.** tonic applies its own `tcp_nodelay` only to listeners it binds itself.
//!   Without it a response written in two segments waits for the peer's delayed ACK (Nagle), tens
//!   of milliseconds on Linux, which shows in the tail latencies.
//! - **Coalesced writes.** On a socket that does vectored writes, h2 writes every DATA frame of
//!   256 bytes or more straight from the message buffer, and must flush (one `writev`, one TCP
//!   segment) before it can queue the next frame. Typical idmap responses (a ResolveSession answer
//!   is a few hundred bytes, a user less) sit just above that line, so under load every response
//!   costs a syscall of its own, more than a Health/Check answer does. On a
//!   socket that does not advertise vectored writes h2 copies frames under 1 KiB into its 16 KiB
//!   write buffer instead, where the frames of concurrent responses share one write. Copying 1 KiB
//!   costs far less than a syscall and a segment. Over TLS the same holds one layer up: each write
//!   is a TLS record and a syscall.
//!
//! TLS handshakes run on tasks of their own, so a client that connects and then says nothing
//! holds up no one else's connection; a handshake not done within [`HANDSHAKE_TIMEOUT`] is
//! dropped.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpIncoming};

use crate::tls::{PeerCertificate, ServerTls};

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; past it, connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;

/// The accepted connections of `listener`, over TLS when `tls` is set.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> BoxStream<'static, io::Result<Connection>> {
    match tls {
        None => TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(|accepted| accepted.map(Connection::plain))
            .boxed(),
        Some(tls) => tls_incoming(listener, tls).map(Ok).boxed(),
    }
}

fn tls_incoming(listener: TcpListener, tls: Arc<ServerTls>) -> impl Stream<Item = Connection> {
    let (ready, mut connections) = mpsc::channel::<Connection>(MAX_HANDSHAKES);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            // The server dropped the stream (it is shutting down): stop accepting, which closes
            // the port.
            let permit = tokio::select! {
                _ = ready.closed() => return,
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (tcp, remote_addr) = tokio::select! {
                _ = ready.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: give the process a moment to close some.
                        tracing::warn!(error = %e, "cannot accept a gRPC connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
            let acceptor = tls.grpc_acceptor();
            let ready = ready.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        let peer = PeerCertificate::of(stream.get_ref().1).map(Arc::new);
                        let connection = Connection {
                            io: Io::Tls(Box::new(stream)),
                            info: ConnectionInfo {
                                remote_addr: Some(remote_addr),
                                peer,
                            },
                        };
                        let _ = ready.send(connection).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, %remote_addr, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(%remote_addr, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    futures_util::stream::poll_fn(move |cx| connections.poll_recv(cx))
}

/// What is known of a connection's other end, in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate's identity, over mTLS.
    pub peer: Option<Arc<PeerCertificate>>,
}

/// An accepted connection that does not advertise vectored writes (see the module docs).
#[derive(Debug)]
pub struct Connection {
    io: Io,
    info: ConnectionInfo,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection {
    fn plain(tcp: TcpStream) -> Self {
        Self {
            info: ConnectionInfo {
                remote_addr: tcp.peer_addr().ok(),
                peer: None,
            },
            io: Io::Plain(tcp),
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}
