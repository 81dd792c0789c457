//! The page's own connections at the socket level: each needs a slot from the [`Shield`] (at
//! most `--web-per-address` per client address, `--web-max-connections` in all, a reserve for
//! trusted clients); the rest are accepted and closed at once, so they wait nowhere. Each
//! connection is also closed after [`IDLE`] without progress either way (a client that stops
//! reading its answer). The supervisor process shares its open-file limit with the page, and it
//! needs descriptors to restart workers; stalled browsers must not take them all.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use super::shield::{Reason, Shield, Ticket};

/// A connection that neither reads nor writes for this long is closed. The request phases have
/// shorter limits of their own ([`super::guard`]); this one bounds a client that stops reading.
pub const IDLE: Duration = Duration::from_secs(60);

/// A listener that hands out only the connections the [`Shield`] admits.
pub struct CappedListener {
    inner: TcpListener,
    shield: Arc<Shield>,
    idle: Duration,
}

impl CappedListener {
    pub fn new(inner: TcpListener, shield: Arc<Shield>, idle: Duration) -> CappedListener {
        CappedListener {
            inner,
            shield,
            idle,
        }
    }

    pub fn shield(&self) -> &Arc<Shield> {
        &self.shield
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Capped;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Capped, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match self.shield.admit(addr.ip()) {
                    Ok(ticket) => return (Capped::new(stream, ticket, self.idle), addr),
                    // Refused (counted and logged by the shield): closing now keeps the
                    // backlog free for others instead of letting it queue there.
                    Err(_) => drop(stream),
                },
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    tracing::warn!("web page: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// One connection of the page: holds its slot until dropped, times out when idle.
pub struct Capped {
    stream: TcpStream,
    ticket: Ticket,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Capped {
    fn new(stream: TcpStream, ticket: Ticket, idle: Duration) -> Capped {
        Capped {
            stream,
            ticket,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Counts this connection as cut for `reason` (the TLS handshake's limit lives in `tls`).
    pub fn record(&self, reason: Reason) {
        self.ticket.shield().record(self.ticket.ip(), reason);
    }

    /// Looks at the first bytes without consuming them (the HTTPS page tells TLS from plain
    /// HTTP by the first byte).
    pub async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.peek(buf).await
    }

    /// Pushes the deadline back after progress.
    fn progressed(&mut self) {
        let next = Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    /// While waiting: an error once the deadline has passed.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.ticket
                    .shield()
                    .record(self.ticket.ip(), Reason::Stalled);
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "web page connection made no progress for too long",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match Pin::new(&mut me.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                me.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => me.check_idle(cx).map(Err),
        }
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        match Pin::new(&mut me.stream).poll_write(cx, buf) {
            Poll::Ready(r) => {
                me.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => me.check_idle(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        match Pin::new(&mut me.stream).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                me.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => me.check_idle(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::shield::Limits;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(listener: &mut CappedListener) -> (TcpStream, Capped) {
        let addr = listener.local_addr().unwrap();
        let (client, (server, _)) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server)
    }

    #[tokio::test]
    async fn an_idle_connection_times_out_and_an_active_one_does_not() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shield = Shield::new(Limits::default());
        let mut listener = CappedListener::new(inner, shield, Duration::from_millis(300));
        let (mut client, mut server) = pair(&mut listener).await;
        let mut buf = [0u8; 4];
        // Progress every 100 ms keeps it open past the idle time.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"ping").await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
        }
        let started = std::time::Instant::now();
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn connections_beyond_the_per_address_cap_are_closed_at_once() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shield = Shield::new(Limits {
            web_per_address: 1,
            ..Limits::default()
        });
        let mut listener = CappedListener::new(inner, Arc::clone(&shield), IDLE);
        let addr = listener.local_addr().unwrap();
        let (_c1, s1) = pair(&mut listener).await;
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(
            waited.is_err(),
            "a second connection was served beyond the cap"
        );
        // The refused one was closed, not left waiting.
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), c2.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        assert_eq!(shield.figures().refused_per_address, 1);
        drop(s1);
        let (_c3, _s3) = pair(&mut listener).await;
        assert_eq!(shield.figures().open, 1);
    }
}
