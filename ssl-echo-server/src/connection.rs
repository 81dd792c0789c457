//! One client connection: its socket, its rustls session (none in `--plain` mode) and the echo
//! between them, advanced one readiness event at a time. Memory is bounded: at most
//! [`PENDING_LIMIT`] bytes of our own plus rustls's buffers (its send buffer is capped at
//! [`TLS_BUFFER_LIMIT`], and it holds at most one record of received plaintext because we stop
//! reading the socket while earlier plaintext is still waiting). A client that never reads therefore
//! stops being read from, and TCP flow control pushes back on it.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use rustls::ServerConnection;
use tracing::{debug, info};

use crate::stats::WorkerCounters;

/// Plaintext a connection may hold that neither rustls nor the socket has accepted yet.
pub const PENDING_LIMIT: usize = 64 * 1024;
/// rustls's cap on TLS bytes queued for sending (its `set_buffer_limit`).
pub const TLS_BUFFER_LIMIT: usize = 64 * 1024;
/// Bytes read per readiness event before yielding to other connections; the connection is then
/// queued to continue, because an edge-triggered poll would not report it again.
pub const READ_BUDGET: usize = 256 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// TLS handshake not finished; the handshake deadline applies.
    Handshaking { deadline: Instant },
    /// Echoing application data.
    Echoing,
    /// The client finished sending (close_notify or FIN): flush what is owed, say goodbye, close.
    Draining,
    /// Done; the worker deregisters and frees it.
    Closed,
}

/// What the worker should do after a readiness event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait for the next readiness event.
    Wait,
    /// The read budget ran out with work left: call [`Connection::ready`] again soon.
    Continue,
    /// The connection is closed: deregister and free it.
    Close,
}

/// A client connection and its echo state.
pub struct Connection {
    pub socket: TcpStream,
    /// Serial number, so a stale timer entry never hits a later connection in the same slab slot.
    pub id: u64,
    tls: Option<Box<ServerConnection>>,
    state: State,
    /// Plaintext read but not yet accepted for sending. Freed when empty, so idle connections hold
    /// no buffer of their own.
    pending: Vec<u8>,
    /// The peer ended its side: FIN for plain, close_notify or FIN for TLS.
    peer_done: bool,
    /// TCP EOF seen on the socket (TLS mode; in plain mode `peer_done` says it).
    tcp_eof: bool,
    close_notify_sent: bool,
    bytes_in: u64,
}

impl Connection {
    /// A new connection; with `tls` it starts handshaking and must finish before `deadline`.
    pub fn new(
        socket: TcpStream,
        id: u64,
        tls: Option<Arc<rustls::ServerConfig>>,
        deadline: Instant,
    ) -> Result<Connection, rustls::Error> {
        let (tls, state) = match tls {
            Some(config) => {
                let mut session = ServerConnection::new(config)?;
                session.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
                (Some(Box::new(session)), State::Handshaking { deadline })
            }
            None => (None, State::Echoing),
        };
        Ok(Connection {
            socket,
            id,
            tls,
            state,
            pending: Vec::new(),
            peer_done: false,
            tcp_eof: false,
            close_notify_sent: false,
            bytes_in: 0,
        })
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Marks the connection closed (handshake timeout, shutdown); the caller frees it.
    pub fn abort(&mut self) {
        self.state = State::Closed;
    }

    /// Handles one readiness event (or a continuation): moves as many bytes as possible until
    /// nothing more can move without a new event, or the read budget is spent.
    pub fn ready(&mut self, scratch: &mut [u8], counters: &mut WorkerCounters) -> Next {
        if self.state == State::Closed {
            return Next::Close;
        }
        let next = if self.tls.is_some() {
            self.echo_tls(scratch, counters)
        } else {
            self.echo_plain(scratch, counters)
        };
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                self.fail(&e, counters);
                Next::Close
            }
        };
        if next == Next::Close {
            self.state = State::Closed;
        }
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = Vec::new();
        }
        next
    }

    fn fail(&mut self, e: &io::Error, counters: &mut WorkerCounters) {
        if let Some(reason) = client_cert_refusal(e) {
            counters.handshake_failures += 1;
            counters.client_cert_refused += 1;
            let peer = self
                .socket
                .peer_addr()
                .map_or("?".to_string(), |p| p.to_string());
            log_refusal(self.id, &peer, &reason);
            return;
        }
        if matches!(self.state, State::Handshaking { .. }) {
            // A client that connects and leaves without a byte (port scan, health check) is not
            // a failed handshake.
            if self.bytes_in > 0 {
                counters.handshake_failures += 1;
            }
            debug!(id = self.id, error = %e, "handshake failed");
        } else {
            counters.connection_errors += 1;
            debug!(id = self.id, error = %e, "connection ended by error");
        }
    }

    /// Plain mode: socket → `pending` (bounded) → socket.
    fn echo_plain(
        &mut self,
        scratch: &mut [u8],
        counters: &mut WorkerCounters,
    ) -> io::Result<Next> {
        let mut budget = READ_BUDGET;
        loop {
            let mut progress = self.flush_pending_plain(counters)?;
            if !self.peer_done && self.pending.len() < PENDING_LIMIT {
                if budget == 0 {
                    return Ok(Next::Continue);
                }
                let room = scratch.len().min(PENDING_LIMIT - self.pending.len());
                match self.socket.read(&mut scratch[..room]) {
                    Ok(0) => {
                        self.peer_done = true;
                        self.state = State::Draining;
                        progress = true;
                    }
                    Ok(n) => {
                        counters.messages_echoed += 1;
                        budget = budget.saturating_sub(n);
                        self.bytes_in += n as u64;
                        self.pending.extend_from_slice(&scratch[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(e),
                }
            }
            if self.peer_done && self.pending.is_empty() {
                // Everything echoed: pass the FIN on. Close errors are moot, the peer left.
                let _ = self.socket.shutdown(Shutdown::Write);
                return Ok(Next::Close);
            }
            if !progress {
                return Ok(Next::Wait);
            }
        }
    }

    fn flush_pending_plain(&mut self, counters: &mut WorkerCounters) -> io::Result<bool> {
        let mut progress = false;
        while !self.pending.is_empty() {
            match self.socket.write(&self.pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    counters.bytes_echoed += n as u64;
                    self.pending.drain(..n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    /// TLS mode: socket → rustls → plaintext → rustls writer → socket, with close_notify at the end.
    fn echo_tls(&mut self, scratch: &mut [u8], counters: &mut WorkerCounters) -> io::Result<Next> {
        let mut budget = READ_BUDGET;
        // Invariant: tls is Some in TLS mode (checked by the caller); taken out to borrow freely.
        let mut tls = self.tls.take().expect("TLS session in TLS mode");
        let result = (|| loop {
            let mut progress = false;

            // 1. Queued TLS records → socket.
            while tls.wants_write() {
                match tls.write_tls(&mut self.socket) {
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }

            // 2. Held-back plaintext → rustls (accepts less, or 0, when its send buffer is full).
            if !self.pending.is_empty() {
                let n = tls.writer().write(&self.pending)?;
                if n > 0 {
                    counters.bytes_echoed += n as u64;
                    self.pending.drain(..n);
                    progress = true;
                }
            }

            // 3. Received plaintext → rustls, only once nothing is held back.
            if self.pending.is_empty() && !self.peer_done {
                match tls.reader().read(scratch) {
                    Ok(0) => {
                        // close_notify received.
                        self.peer_done = true;
                        self.state = State::Draining;
                        progress = true;
                    }
                    Ok(n) => {
                        counters.messages_echoed += 1;
                        let accepted = tls.writer().write(&scratch[..n])?;
                        counters.bytes_echoed += accepted as u64;
                        self.pending.extend_from_slice(&scratch[accepted..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        // FIN without close_notify: echo what came, then close.
                        self.peer_done = true;
                        self.state = State::Draining;
                        progress = true;
                    }
                    Err(e) => return Err(e),
                }
            }

            // 4. Socket → rustls, while rustls wants more (it says no while plaintext waits).
            if !self.tcp_eof && tls.wants_read() {
                if budget == 0 {
                    return Ok(Next::Continue);
                }
                match tls.read_tls(&mut self.socket) {
                    Ok(0) => {
                        self.tcp_eof = true;
                        progress = true;
                    }
                    Ok(n) => {
                        budget = budget.saturating_sub(n);
                        self.bytes_in += n as u64;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(e),
                }
                if progress {
                    let was_handshaking = tls.is_handshaking();
                    if let Err(e) = tls.process_new_packets() {
                        // Send the alert rustls queued, best effort, then give up on this client.
                        while tls.wants_write() && tls.write_tls(&mut self.socket).is_ok() {}
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    if was_handshaking && !tls.is_handshaking() {
                        note_handshake(self.id, &tls, counters);
                        self.state = State::Echoing;
                    }
                }
            }

            if self.tcp_eof && tls.is_handshaking() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if self.peer_done && self.pending.is_empty() && !self.close_notify_sent {
                tls.send_close_notify();
                self.close_notify_sent = true;
                progress = true;
            }
            if self.close_notify_sent && !tls.wants_write() {
                let _ = self.socket.shutdown(Shutdown::Write);
                return Ok(Next::Close);
            }
            if !progress {
                return Ok(Next::Wait);
            }
        })();
        self.tls = Some(tls);
        result
    }
}

/// Counts a finished handshake by what it negotiated and logs it (debug: one line per connection).
fn note_handshake(id: u64, tls: &ServerConnection, counters: &mut WorkerCounters) {
    counters.handshakes_total += 1;
    let version = tls.protocol_version();
    match version {
        Some(rustls::ProtocolVersion::TLSv1_2) => counters.tls12_handshakes += 1,
        Some(rustls::ProtocolVersion::TLSv1_3) => counters.tls13_handshakes += 1,
        _ => {}
    }
    let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if resumed {
        counters.resumed_handshakes += 1;
    }
    debug!(
        id,
        version = ?version,
        suite = ?tls.negotiated_cipher_suite().map(|s| s.suite()),
        alpn = ?tls.alpn_protocol().map(String::from_utf8_lossy),
        resumed,
        "handshake done"
    );
}

/// Why the handshake refused the client's certificate, if that is what `e` (from
/// `process_new_packets`) says. With `--client-ca`, rustls reports a missing certificate as
/// `NoCertificatesPresented` and a bad one as `InvalidCertificate`; a server without client
/// authentication never verifies certificates, so neither arises otherwise.
fn client_cert_refusal(e: &io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::NoCertificatesPresented => Some("no client certificate".to_string()),
        rustls::Error::InvalidCertificate(why) => Some(format!("client certificate: {why:?}")),
        _ => None,
    }
}

/// When the last refusal line was written (seconds since the process's first refusal + 1, 0 =
/// never) and how many were left out since; a flood of refused clients writes one line a second.
static REFUSALS_LOGGED_AT: AtomicU64 = AtomicU64::new(0);
static REFUSALS_UNLOGGED: AtomicU64 = AtomicU64::new(0);

fn log_refusal(id: u64, peer: &str, reason: &str) {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_secs() + 1;
    let last = REFUSALS_LOGGED_AT.load(Ordering::Relaxed);
    if last != 0 && now == last {
        REFUSALS_UNLOGGED.fetch_add(1, Ordering::Relaxed);
        debug!(id, "client certificate refused from {peer}: {reason}");
        return;
    }
    REFUSALS_LOGGED_AT.store(now, Ordering::Relaxed);
    let unlogged = REFUSALS_UNLOGGED.swap(0, Ordering::Relaxed);
    if unlogged > 0 {
        info!(
            id,
            "client certificate refused from {peer}: {reason} ({unlogged} more in the last second)"
        );
    } else {
        info!(id, "client certificate refused from {peer}: {reason}");
    }
}
