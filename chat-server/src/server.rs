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
            let timeout = if !self.pending_reads.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.accept_paused_until
                    .map(|until| until.saturating_duration_since(Instant::now()))
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
            return;
        }
        entry.insert(Connection::new(
            socket,
            peer,
            self.config.max_line_bytes,
            self.config.max_queue_bytes,
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
            "shutting down: told {clients} connected clients; {} connections accepted, {} joined, {} messages, {} lines refused, {} slow clients dropped, {} refused as server full",
            self.stats.accepted, rs.joined, rs.messages, rs.refused_lines, self.stats.dropped_slow, self.stats.refused_full
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
