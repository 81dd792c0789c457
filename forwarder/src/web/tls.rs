//! The page over HTTPS: the certificate pair read once at start, and a listener that hands the
//! HTTP server connections whose TLS handshake is done. Handshakes run in tasks of their own, so
//! one slow or stalled client never holds up the others; a client that speaks plain HTTP to the
//! port is told to use https:// and gets nothing else.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use testbed::tls::TlsConfigError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::limit::{Capped, CappedListener};
use super::shield::Reason;

/// The only protocol the page's HTTP server speaks (axum is built with HTTP/1 alone).
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Longest a client may take to finish its handshake; the connection holds a slot meanwhile.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the HTTP server (it takes them as fast as they come).
const READY_QUEUE: usize = 64;

/// Most bytes read of a plain-HTTP request before it is answered: enough for the request head a
/// browser sends, and the client is not left with unread data (which would make the kernel reset
/// the connection before our answer is read).
const PLAIN_REQUEST_LIMIT: usize = 8 * 1024;

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a plain-HTTP request to the HTTPS port gets instead of the page.
const PLAIN_HTTP_ANSWER: &str =
    "This page is served over HTTPS: open it with https:// instead of http://.\n";

/// The page's TLS settings: the certificate pair given at start, TLS 1.2 and 1.3 only, on the
/// ring provider every program uses. Read once; reloading the rules never touches it.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = testbed::tls::server_config(cert, key).map_err(|e| match e {
        TlsConfigError::Identity {
            cert,
            key,
            source: rustls::Error::InconsistentKeys(_),
        } => anyhow::anyhow!("{key}: this private key does not belong to the certificate {cert}"),
        // Only the top-level message: it already holds its cause, and the chain would repeat it.
        e => anyhow::anyhow!("{e}"),
    })?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// A listener whose connections are TLS sessions, for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<Capped>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `inner` (which bounds the connections, handshakes included) and
    /// handshaking with `config`. Must be called inside the page's runtime.
    pub fn new(mut inner: CappedListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        use axum::serve::Listener;
        let local = inner.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = inner.accept().await;
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                let shield = Arc::clone(inner.shield());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(acceptor, stream)).await
                    {
                        Ok(Ok(Some(tls))) => {
                            // A closed receiver means the server stopped: drop the connection.
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Ok(None)) => {
                            tracing::debug!("web page: {peer} spoke plain HTTP to the HTTPS port")
                        }
                        Ok(Err(e)) => tracing::debug!("web page: TLS handshake with {peer}: {e}"),
                        Err(_) => shield.record(peer.ip(), Reason::Handshake),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Capped>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accepting task never ends on its own (it loops forever); should it be gone,
            // the runtime is shutting down: wait for that instead of spinning.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The TLS session of one connection; `None` when the client spoke plain HTTP (it was told to
/// use https:// and the connection closed).
async fn handshake(
    acceptor: TlsAcceptor,
    mut stream: Capped,
) -> io::Result<Option<TlsStream<Capped>>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the handshake",
        ));
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        if first[0].is_ascii_uppercase() {
            answer_plain_http(&mut stream).await?;
            return Ok(None);
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "neither TLS nor HTTP",
        ));
    }
    acceptor.accept(stream).await.map(Some)
}

/// Reads the plain request's head and answers 400 with the https:// hint, nothing else.
async fn answer_plain_http(stream: &mut Capped) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < PLAIN_REQUEST_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{PLAIN_HTTP_ANSWER}",
        PLAIN_HTTP_ANSWER.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_mismatched_pair_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let one = certs::write_throwaway(&dir.path().join("one"), &[]).unwrap();
        let two = certs::write_throwaway(&dir.path().join("two"), &[]).unwrap();
        assert!(load(&one.server_cert, &one.server_key).is_ok());

        let missing = dir.path().join("nope.crt");
        let e = format!("{:#}", load(&missing, &one.server_key).unwrap_err());
        assert!(
            e.starts_with(&format!("{}: cannot read certificate", missing.display())),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load(&one.server_cert, &one.server_cert).unwrap_err()
        );
        assert!(
            e.starts_with(&format!(
                "{}: cannot read private key",
                one.server_cert.display()
            )),
            "{e}"
        );
        let e = format!("{:#}", load(&one.server_cert, &two.server_key).unwrap_err());
        assert_eq!(
            e,
            format!(
                "{}: this private key does not belong to the certificate {}",
                two.server_key.display(),
                one.server_cert.display()
            )
        );
    }
}
