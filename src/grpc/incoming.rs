//! The connections the gRPC server accepts, tuned for many small responses.
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
//!   costs far less than a syscall and a segment.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The accepted connections of `listener`.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Connection>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|accepted| accepted.map(Connection))
}

/// An accepted TCP connection that does not advertise vectored writes (see the module docs).
#[derive(Debug)]
pub struct Connection(TcpStream);

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}
