//! Bounds on the page's own connections: at most [`MAX_CONNECTIONS`] at once, and each closed
//! after [`IDLE`] without progress. The supervisor process shares its open-file limit with the
//! page, and it needs descriptors to restart workers; idle or stalled browsers must not take
//! them all (the HTTP server has no read timeout of its own).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// A connection that neither reads nor writes for this long is closed. The page polls every
/// second, so only abandoned or deliberately slow clients reach it.
pub const IDLE: Duration = Duration::from_secs(60);

/// A listener that hands out at most `MAX_CONNECTIONS` connections at a time.
pub struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
}

impl CappedListener {
    pub fn new(inner: TcpListener, max: usize, idle: Duration) -> CappedListener {
        CappedListener {
            inner,
            slots: Arc::new(Semaphore::new(max)),
            idle,
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Capped;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Capped, SocketAddr) {
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => return (Capped::new(stream, permit, self.idle), addr),
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
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Capped {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, idle: Duration) -> Capped {
        Capped {
            stream,
            _permit: permit,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
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
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "web page connection idle for too long",
            )),
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
        let mut listener = CappedListener::new(inner, 4, Duration::from_millis(300));
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
    async fn connections_beyond_the_cap_wait_for_a_slot() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut listener = CappedListener::new(inner, 1, IDLE);
        let addr = listener.local_addr().unwrap();
        let (_c1, s1) = pair(&mut listener).await;
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(
            waited.is_err(),
            "a second connection was served beyond the cap"
        );
        drop(s1);
        let served = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        assert!(served.is_ok(), "the freed slot was not reused");
    }
}
