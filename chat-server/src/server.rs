//! The single-threaded readiness loop: one mio `Poll` watches the listener, every client socket and
//! the shutdown signals. Client sockets are registered once for reading and writing
//! (edge-triggered), so a slow client costs nothing until the kernel says it can take more. Lines
//! for a client are queued and written at the end of each turn, so many lines go out in one write.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::Utc;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tracing::{debug, info, warn};

use crate::connection::Connection;
use crate::framing::Frame;
use crate::guard::{LineClock, PerAddress, Who};
use crate::protocol::{ErrorCode, LeaveReason, ServerLine};
use crate::room::{ClientId, Effect, Room};

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);

/// Bytes read from one client before the loop turns to the others; the rest waits for the next
/// turn, so one client flooding the server cannot starve everyone else.
const READ_BUDGET: usize = 64 * 1024;

/// How long to stop accepting when out of descriptors (the pending connections wait in the
/// backlog; a free slot appears when someone leaves).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Everything the server is told on the command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub history: usize,
    pub max_line_bytes: usize,
    pub max_queue_bytes: usize,
    pub max_clients: usize,
    /// Connections one client address may hold (0: no limit).
    pub max_per_address: usize,
    /// A line begun must end within this long.
    pub line_timeout: Duration,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot watch for SIGINT/SIGTERM: {0}")]
    Signals(io::Error),
    #[error("event loop failed: {0}")]
    Poll(io::Error),
}

/// Counters for the summary logged at shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServerStats {
    pub accepted: u64,
    pub dropped_slow: u64,
    pub refused_full: u64,
    pub refused_per_address: u64,
    pub cut_line_timeout: u64,
}

/// See the module comment.
pub struct Server {
    config: Config,
    poll: Poll,
    listener: TcpListener,
    signals: Signals,
    conns: Slab<Connection>,
    room: Room,
    /// Effects the room produced that are not carried out yet.
    effects: Vec<Effect>,
    frames: Vec<Frame>,
    /// Connections with queued lines, written at the end of the turn.
    dirty: Vec<ClientId>,
    /// Connections whose queue overflowed this turn, dropped once the turn's effects are done.
    overflowed: Vec<ClientId>,
    /// Connections that used up their read budget and have more to read.
    pending_reads: Vec<ClientId>,
    read_buf: Vec<u8>,
    accept_paused_until: Option<Instant>,
    stats: ServerStats,
    per_address: PerAddress,
    lines: LineClock,
    /// The next connection's [`Connection::serial`].
    next_serial: u64,
    /// Refusals and cuts are logged once per address per minute.
    throttle: testbed::throttle::LogThrottle,
}

impl Server {
    /// Binds the listener and sets up the poll; nothing is accepted until [`Server::run`].
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let listener = listen(config.listen).map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new().map_err(ServerError::Poll)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(ServerError::Poll)?;
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(ServerError::Signals)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(ServerError::Signals)?;
        Ok(Server {
            per_address: PerAddress::new(config.max_per_address),
            lines: LineClock::new(config.line_timeout),
            next_serial: 0,
            throttle: Default::default(),
            room: Room::new(config.history),
            config,
            poll,
            listener,
            signals,
            conns: Slab::new(),
            effects: Vec::new(),
            frames: Vec::new(),
            dirty: Vec::new(),
            overflowed: Vec::new(),
            pending_reads: Vec::new(),
            read_buf: vec![0; 16 * 1024],
            accept_paused_until: None,
            stats: ServerStats::default(),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until SIGINT or SIGTERM, then tells every client and returns.
    pub fn run(mut self) -> Result<ServerStats, ServerError> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = if !self.pending_reads.is_empty() {
                Some(Duration::ZERO)
            } else {
                let accept = self
                    .accept_paused_until
                    .map(|until| until.saturating_duration_since(now));
                match (accept, self.lines.next_in(now)) {
                    (Some(a), Some(l)) => Some(a.min(l)),
                    (a, l) => a.or(l),
                }
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Poll(e));
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => {
                        if self.accept_paused_until.is_none() {
                            self.accept_ready();
                        }
                    }
                    SIGNALS => {
                        if self.signals.pending().next().is_some() {
                            self.shut_down();
                            return Ok(self.stats);
                        }
                    }
                    Token(id) => {
                        if event.is_writable() {
                            self.flush_one(id);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_ready(id);
                        }
                    }
                }
            }
            for id in std::mem::take(&mut self.pending_reads) {
                self.read_ready(id);
            }
            self.expire_lines();
            if self
                .accept_paused_until
                .is_some_and(|until| Instant::now() >= until)
            {
                self.accept_paused_until = None;
                self.accept_ready();
            }
            self.flush_dirty();
        }
    }

    fn accept_ready(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((socket, peer)) => self.accepted(socket, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // EMFILE and friends: the connection stays in the backlog; try again shortly.
                    warn!(
                        "cannot accept ({e}) with {} clients connected; pausing accepts for {} ms",
                        self.conns.len(),
                        ACCEPT_PAUSE.as_millis()
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    fn accepted(&mut self, mut socket: TcpStream, peer: SocketAddr) {
        if self.conns.len() >= self.config.max_clients {
            self.stats.refused_full += 1;
            let line = ServerLine::Err {
                code: ErrorCode::ServerFull,
                text: format!(
                    "server is full ({} clients); try again later",
                    self.config.max_clients
                ),
            };
            // Best effort: a fresh socket's send buffer is empty, so this short write fits.
            let _ = socket.write_all(format!("{line}\n").as_bytes());
            debug!(%peer, "refused: server full");
            return;
        }
        if !self.per_address.admit(peer.ip()) {
            self.stats.refused_per_address += 1;
            let line = ServerLine::Err {
                code: ErrorCode::TooManyConnections,
                text: format!(
                    "your address already has {} connections here (--max-per-address)",
                    self.per_address.limit()
                ),
            };
            let _ = socket.write_all(format!("{line}\n").as_bytes());
            self.log_loss(
                peer,
                "refused: it already holds --max-per-address connections",
            );
            return;
        }
        // Chat is interactive: send each line at once rather than waiting to fill a segment.
        let _ = socket.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let id = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut socket,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!(%peer, "cannot watch new connection: {e}");
            self.per_address.release(peer.ip());
            return;
        }
        self.next_serial += 1;
        entry.insert(Connection::new(
            socket,
            peer,
            self.config.max_line_bytes,
            self.config.max_queue_bytes,
            self.next_serial,
        ));
        self.stats.accepted += 1;
        debug!(%peer, id, "connected");
        self.room.connect(id, &mut self.effects);
        self.apply_effects();
    }

    fn read_ready(&mut self, id: ClientId) {
        let mut budget = READ_BUDGET;
        loop {
            let Some(conn) = self.conns.get_mut(id) else {
                return;
            };
            match conn.socket.read(&mut self.read_buf) {
                Ok(0) => {
                    conn.splitter.finish_eof(&mut self.frames);
                    self.handle_frames(id);
                    self.close(id, LeaveReason::Closed);
                    self.apply_effects();
                    return;
                }
                Ok(n) => {
                    conn.splitter.push(&self.read_buf[..n], &mut self.frames);
                    Self::watch_line(&mut self.lines, conn, id);
                    self.handle_frames(id);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        self.pending_reads.push(id);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(peer = %conn.peer, "read failed: {e}");
                    self.close(id, LeaveReason::Error);
                    self.apply_effects();
                    return;
                }
            }
        }
    }

    /// Starts or stops the clock of a connection's unfinished line after a read.
    fn watch_line(lines: &mut LineClock, conn: &mut Connection, id: ClientId) {
        if !conn.splitter.has_partial() {
            conn.line_started = None;
            return;
        }
        if conn.line_started.is_none() {
            let now = Instant::now();
            conn.line_started = Some(now);
            if !conn.line_queued {
                conn.line_queued = true;
                lines.started(
                    Who {
                        id,
                        serial: conn.serial,
                    },
                    now,
                );
            }
        }
    }

    /// Closes the connections whose unfinished line is over `--line-timeout-ms`.
    fn expire_lines(&mut self) {
        if self.lines.is_empty() {
            return;
        }
        let conns = &mut self.conns;
        let late = self.lines.expired(Instant::now(), |who| {
            let conn = conns.get_mut(who.id).filter(|c| c.serial == who.serial)?;
            if conn.line_started.is_none() {
                conn.line_queued = false;
            }
            conn.line_started
        });
        for who in late {
            let Some(conn) = self.conns.get(who.id) else {
                continue;
            };
            let peer = conn.peer;
            self.stats.cut_line_timeout += 1;
            let line = ServerLine::Err {
                code: ErrorCode::LineTimeout,
                text: format!(
                    "a line must end within {} ms of its first byte (--line-timeout-ms); closing",
                    self.lines.limit().as_millis()
                ),
            }
            .to_string();
            self.queue(who.id, &line);
            self.log_loss(
                peer,
                "closed: it left a line unfinished past --line-timeout-ms",
            );
            self.close(who.id, LeaveReason::TimedOut);
            self.apply_effects();
        }
    }

    /// Logs a refused or cut client, at most once a minute per address.
    fn log_loss(&mut self, peer: SocketAddr, what: &str) {
        if let Some(unlogged) = self.throttle.note(peer.ip(), Instant::now()) {
            let since = if unlogged > 0 {
                format!(" ({unlogged} more from it since its last line)")
            } else {
                String::new()
            };
            warn!("client {peer} {what}{since}; its next ones are logged at most once a minute");
        }
    }

    fn handle_frames(&mut self, id: ClientId) {
        let mut frames = std::mem::take(&mut self.frames);
        for frame in frames.drain(..) {
            // An earlier line may have ended this connection (/quit, its own queue overflowed).
            if !self.conns.contains(id) {
                break;
            }
            self.room.frame(id, frame, Utc::now(), &mut self.effects);
            self.apply_effects();
        }
        self.frames = frames;
    }

    /// Carries out the room's effects, including the LEAVE lines caused by dropping clients whose
    /// queues overflowed on the way.
    fn apply_effects(&mut self) {
        while !self.effects.is_empty() {
            for effect in std::mem::take(&mut self.effects) {
                match effect {
                    Effect::To(id, line) => self.queue(id, &line),
                    Effect::All(line) => {
                        let Server {
                            room,
                            conns,
                            dirty,
                            overflowed,
                            ..
                        } = self;
                        for id in room.named() {
                            queue_line(conns, dirty, overflowed, id, &line);
                        }
                    }
                    Effect::Close(id) => self.remove(id),
                }
            }
            for id in std::mem::take(&mut self.overflowed) {
                if let Some(conn) = self.conns.get(id) {
                    warn!(
                        peer = %conn.peer,
                        nick = self.room.nick_of(id).unwrap_or("-"),
                        "dropping a client that stopped reading ({} bytes queued)",
                        conn.out.len()
                    );
                    self.stats.dropped_slow += 1;
                    self.close(id, LeaveReason::Dropped);
                }
            }
        }
    }

    fn queue(&mut self, id: ClientId, line: &str) {
        queue_line(
            &mut self.conns,
            &mut self.dirty,
            &mut self.overflowed,
            id,
            line,
        );
    }

    fn flush_one(&mut self, id: ClientId) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if let Err(e) = conn.out.flush(&mut conn.socket) {
            debug!(peer = %conn.peer, "write failed: {e}");
            self.close(id, LeaveReason::Error);
            self.apply_effects();
        }
    }

    fn flush_dirty(&mut self) {
        while !self.dirty.is_empty() {
            for id in std::mem::take(&mut self.dirty) {
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.dirty = false;
                    self.flush_one(id);
                }
            }
        }
    }

    /// Ends a connection the room may still know: the others hear that it left.
    fn close(&mut self, id: ClientId, reason: LeaveReason) {
        if !self.conns.contains(id) {
            return;
        }
        self.room.leave(id, reason, Utc::now(), &mut self.effects);
        self.remove(id);
    }

    /// Forgets a connection the room no longer knows, and closes its socket. What is still queued
    /// gets one last non-blocking write: a client that half-closed after its last line
    /// (`printf 'bob\n/who\n' | nc -N ...`) still reads the answers.
    fn remove(&mut self, id: ClientId) {
        if !self.conns.contains(id) {
            return;
        }
        let mut conn = self.conns.remove(id);
        self.per_address.release(conn.peer.ip());
        let _ = conn.out.flush(&mut conn.socket);
        let _ = self.poll.registry().deregister(&mut conn.socket);
        debug!(peer = %conn.peer, id, "disconnected");
    }

    fn shut_down(&mut self) {
        let clients = self.conns.len();
        let bye = ServerLine::Bye {
            text: "server shutting down".into(),
        }
        .to_string();
        for (_, conn) in self.conns.iter_mut() {
            if conn.out.push(&bye).is_ok() {
                let _ = conn.out.flush(&mut conn.socket);
            }
            let _ = conn.socket.shutdown(std::net::Shutdown::Write);
        }
        self.conns.clear();
        let rs = self.room.stats;
        info!(
            "shutting down: told {clients} connected clients; {} connections accepted, {} joined, {} messages, {} lines refused, {} slow clients dropped, {} refused as server full, {} refused for --max-per-address, {} cut for --line-timeout-ms",
            self.stats.accepted, rs.joined, rs.messages, rs.refused_lines, self.stats.dropped_slow, self.stats.refused_full,
            self.stats.refused_per_address, self.stats.cut_line_timeout
        );
    }
}

/// Queues `line` for `id`. A full queue is first handed to the kernel: only a client that really
/// stopped reading overflows.
fn queue_line(
    conns: &mut Slab<Connection>,
    dirty: &mut Vec<ClientId>,
    overflowed: &mut Vec<ClientId>,
    id: ClientId,
    line: &str,
) {
    let Some(conn) = conns.get_mut(id) else {
        return;
    };
    if conn.out.push(line).is_err() {
        let flushed = conn.out.flush(&mut conn.socket).is_ok();
        if !flushed || conn.out.push(line).is_err() {
            if !overflowed.contains(&id) {
                overflowed.push(id);
            }
            return;
        }
    }
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(id);
    }
}

/// A plain (not SO_REUSEPORT) listener: a second chat server on the same port must fail loudly,
/// not split the room in two. The backlog takes a burst of a thousand connects.
fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(testbed::listener::BACKLOG)?;
    Ok(socket.into())
}
