//! Opening one connection: TCP connect, then (unless `--plain`) the TLS handshake, each timed
//! separately with the monotonic clock and each bounded by the timeout.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::RunConfig;
use crate::failure::{Failure, Phase};
use crate::tls::{self, Negotiated};

/// Plain TCP or TLS over TCP, chosen once per run.
#[derive(Clone)]
pub enum Connector {
    Plain,
    Tls {
        connector: TlsConnector,
        server_name: ServerName<'static>,
    },
}

/// An open connection of either kind.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection that made it through phase 1, with its timings.
pub struct Established {
    pub stream: Stream,
    /// The connection's own address (as the server or forwarder sees it, unless NATed).
    pub local: SocketAddr,
    pub connect: Duration,
    pub handshake: Option<Duration>,
    /// What the TLS handshake settled on (`None` for plain TCP).
    pub negotiated: Option<Negotiated>,
}

/// A connection that did not: the failure and whatever was measured before it.
pub struct NotEstablished {
    pub failure: Failure,
    pub local_port: Option<u16>,
    pub connect: Option<Duration>,
}

impl Connector {
    /// Builds the connector for `config`: reads the CA file (a clear error if it is missing or
    /// holds no certificate), applies the TLS options, and checks the server name.
    pub fn new(config: &RunConfig) -> anyhow::Result<Connector> {
        let Some(ca) = &config.ca else {
            return Ok(Connector::Plain);
        };
        let tls = tls::client_config(ca, &config.tls_options)
            .context("setting up TLS (or use --plain)")?;
        let server_name = ServerName::try_from(config.server_name.clone()).with_context(|| {
            format!(
                "--server-name {:?} is neither a DNS name nor an IP address",
                config.server_name
            )
        })?;
        Ok(Connector::Tls {
            connector: TlsConnector::from(Arc::new(tls)),
            server_name,
        })
    }

    /// Connects to `addr` (from `source`, if given) and completes the handshake, each step
    /// within `timeout`.
    pub async fn open(
        &self,
        addr: SocketAddr,
        source: Option<IpAddr>,
        timeout: Duration,
    ) -> Result<Established, NotEstablished> {
        let timeout_ms = timeout.as_millis() as u64;
        let started = Instant::now();
        let tcp = match tokio::time::timeout(timeout, connect_from(addr, source)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(not_established(Failure::io(Phase::Connect, &e), None)),
            Err(_) => {
                return Err(not_established(
                    Failure::timeout(Phase::Connect, timeout_ms),
                    None,
                ))
            }
        };
        let connect = started.elapsed();
        // tokio's timeout polls the step before its timer, so a starved process can finish a step
        // long after its limit; the limit is what the report promises (and what the echo server's
        // own handshake deadline is set against), so a late step is a timeout all the same.
        if connect > timeout {
            return Err(not_established(
                Failure::timeout(Phase::Connect, timeout_ms),
                Some(connect),
            ));
        }
        // Small request/response messages: without NODELAY, Nagle plus delayed ACKs add up to
        // 40 ms to an echo whenever a write is split.
        let _ = tcp.set_nodelay(true);
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let local_port = local.port();
        let (connector, server_name) = match self {
            Connector::Plain => {
                return Ok(Established {
                    stream: Stream::Plain(tcp),
                    local,
                    connect,
                    handshake: None,
                    negotiated: None,
                })
            }
            Connector::Tls {
                connector,
                server_name,
            } => (connector, server_name.clone()),
        };
        let shaking = Instant::now();
        let failed = |failure| NotEstablished {
            failure,
            local_port: Some(local_port),
            connect: Some(connect),
        };
        match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
            Ok(Ok(_late)) if shaking.elapsed() > timeout => {
                Err(failed(Failure::timeout(Phase::Handshake, timeout_ms)))
            }
            Ok(Ok(stream)) => {
                let handshake = shaking.elapsed();
                Ok(Established {
                    negotiated: Some(tls::negotiated(stream.get_ref().1)),
                    stream: Stream::Tls(Box::new(stream)),
                    local,
                    connect,
                    handshake: Some(handshake),
                })
            }
            Ok(Err(e)) => Err(failed(Failure::io(Phase::Handshake, &e))),
            Err(_) => Err(failed(Failure::timeout(Phase::Handshake, timeout_ms))),
        }
    }
}

/// Connects, first binding to `source` when given. The local port is left to `connect` (Linux's
/// IP_BIND_ADDRESS_NO_PORT): a bind with port 0 would pick the port at once, unique per address
/// over every destination, instead of per destination, and run out of ports sooner.
async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("IP_BIND_ADDRESS_NO_PORT: {}", io::Error::last_os_error());
    }
    socket
        .bind(SocketAddr::new(ip, 0))
        .map_err(|e| io::Error::new(e.kind(), format!("binding to --source-ip {ip}: {e}")))?;
    socket.connect(addr).await
}

fn not_established(failure: Failure, connect: Option<Duration>) -> NotEstablished {
    NotEstablished {
        failure,
        local_port: None,
        connect,
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
