//! One worker process: a mio event loop that owns a SO_REUSEPORT listener and a slab of
//! [`Connection`]s addressed by `Token`, accepts up to its share of the open-file limit, enforces
//! the handshake deadline, and keeps its counters in its slot of the shared mapping.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tracing::{debug, info, warn};

use crate::connection::{Connection, Next, State};
use crate::shared::SharedStats;
use crate::stats::WorkerCounters;

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// How often the worker checks that its supervisor still runs (besides PR_SET_PDEATHSIG).
const PARENT_CHECK_EVERY: Duration = Duration::from_millis(500);
/// How long accepting pauses after EMFILE/ENFILE, instead of spinning on a listener that stays
/// readable while no descriptor is free.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Plaintext read per step; one TLS record's worth.
const SCRATCH_BYTES: usize = 16 * 1024;

/// What a worker needs to run.
pub struct WorkerConfig {
    pub index: usize,
    pub listen: SocketAddr,
    /// `None` in plain mode.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
}

/// The event loop's state.
pub struct Worker {
    cfg: WorkerConfig,
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Connection>,
    counters: WorkerCounters,
    next_id: u64,
    /// Accepting is paused until then (EMFILE); `None` when accepting normally.
    accept_paused_until: Option<Instant>,
    /// Set when the EMFILE warning was logged, cleared by the next successful accept.
    accept_error_logged: bool,
    /// At `max_connections`: accept again when one closes.
    at_capacity: bool,
    /// Handshake deadlines in accept order. The timeout is one constant, so the queue is sorted.
    deadlines: VecDeque<(Instant, usize, u64)>,
    /// Connections whose read budget ran out with work left: (slab key, id).
    again: VecDeque<(usize, u64)>,
    scratch: Vec<u8>,
}

impl Worker {
    /// Binds the listener and sets up the poll.
    pub fn new(cfg: WorkerConfig) -> anyhow::Result<Worker> {
        let std_listener = testbed::listener::reuseport_listener(cfg.listen)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let mut listener = TcpListener::from_std(std_listener);
        let poll = Poll::new().context("cannot create the event loop (epoll)")?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Worker {
            cfg,
            poll,
            listener,
            conns: Slab::with_capacity(1024),
            counters: WorkerCounters::default(),
            next_id: 0,
            accept_paused_until: None,
            accept_error_logged: false,
            at_capacity: false,
            deadlines: VecDeque::new(),
            again: VecDeque::new(),
            scratch: vec![0; SCRATCH_BYTES],
        })
    }

    /// Runs until SIGINT/SIGTERM, or until `parent_alive` says the supervisor is gone. Counters
    /// go to `shared` after every loop turn; they continue what earlier workers in this slot
    /// counted.
    pub fn run(
        &mut self,
        shared: &SharedStats,
        parent_alive: impl Fn() -> bool,
    ) -> anyhow::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM])
            .context("cannot install signal handlers")?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        let slot = self.cfg.index;
        self.counters = shared.read(slot);
        self.counters.connections_now = 0;
        shared.write(slot, &self.counters);
        // Tells the supervisor this worker listens.
        shared.set_pid(slot, u64::from(std::process::id()));
        let mut next_parent_check = Instant::now() + PARENT_CHECK_EVERY;
        info!(
            worker = self.cfg.index,
            pid = std::process::id(),
            "worker listening on {}",
            self.cfg.listen
        );
        loop {
            let timeout = self.poll_timeout(next_parent_check);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("poll failed");
            }
            let mut stop = false;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_ready(),
                    SIGNALS => {
                        if signals.pending().next().is_some() {
                            stop = true;
                        }
                    }
                    Token(key) => self.connection_ready(key),
                }
            }
            self.continue_queued();
            let now = Instant::now();
            self.expire_handshakes(now);
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.accept_paused_until = None;
                self.accept_ready();
            }
            shared.write(slot, &self.counters);
            if now >= next_parent_check {
                next_parent_check = now + PARENT_CHECK_EVERY;
                if !parent_alive() {
                    info!(worker = self.cfg.index, "supervisor gone; stopping");
                    return Ok(());
                }
            }
            if stop {
                // Exiting closes every connection.
                self.counters.connections_now = 0;
                shared.write(slot, &self.counters);
                info!(
                    worker = self.cfg.index,
                    connections_total = self.counters.connections_total,
                    "worker stopping"
                );
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self, next_parent_check: Instant) -> Duration {
        if !self.again.is_empty() {
            return Duration::ZERO;
        }
        let mut until = next_parent_check;
        if let Some(&(deadline, ..)) = self.deadlines.front() {
            until = until.min(deadline);
        }
        if let Some(t) = self.accept_paused_until {
            until = until.min(t);
        }
        until.saturating_duration_since(Instant::now())
    }

    /// Accepts until the backlog is empty, the capacity is reached, or descriptors run out.
    fn accept_ready(&mut self) {
        while self.accept_paused_until.is_none() {
            if self.conns.len() >= self.cfg.max_connections {
                if !self.at_capacity {
                    warn!(
                        worker = self.cfg.index,
                        "at capacity ({} connections); new ones wait in the backlog",
                        self.cfg.max_connections
                    );
                }
                self.at_capacity = true;
                return;
            }
            match self.listener.accept() {
                Ok((socket, peer)) => {
                    self.accept_error_logged = false;
                    self.add_connection(socket, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.counters.accept_errors += 1;
                    if !self.accept_error_logged {
                        warn!(
                            worker = self.cfg.index,
                            open = self.conns.len(),
                            "accept failed: {e}; pausing accepts for {} ms (logged once until an accept succeeds)",
                            ACCEPT_PAUSE.as_millis()
                        );
                        self.accept_error_logged = true;
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    fn add_connection(&mut self, mut socket: mio::net::TcpStream, peer: SocketAddr) {
        // Echo round trips are small writes; Nagle would hold each one back for an ACK.
        let _ = socket.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let id = self.next_id;
        self.next_id += 1;
        let deadline = Instant::now() + self.cfg.handshake_timeout;
        // Readable and writable once, edge-triggered: the connection reacts to either and never
        // needs re-registering (see Connection::ready, which loops until nothing can move).
        if let Err(e) = self.poll.registry().register(
            &mut socket,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("cannot register connection from {peer}: {e}");
            self.counters.accept_errors += 1;
            return;
        }
        match Connection::new(socket, id, self.cfg.tls.clone(), deadline) {
            Ok(conn) => {
                entry.insert(conn);
                self.counters.connections_total += 1;
                self.counters.connections_now += 1;
                if self.cfg.tls.is_some() {
                    self.deadlines.push_back((deadline, key, id));
                }
                debug!(id, %peer, "accepted");
            }
            Err(e) => {
                warn!("cannot start TLS for {peer}: {e}");
                self.counters.accept_errors += 1;
            }
        }
    }

    fn connection_ready(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return; // closed earlier in this batch of events
        };
        match conn.ready(&mut self.scratch, &mut self.counters) {
            Next::Wait => {}
            Next::Continue => self.again.push_back((key, conn.id)),
            Next::Close => self.close(key),
        }
    }

    /// Gives each connection that ran out of read budget one more turn.
    fn continue_queued(&mut self) {
        for _ in 0..self.again.len() {
            let Some((key, id)) = self.again.pop_front() else {
                break;
            };
            if self.conns.get(key).is_some_and(|c| c.id == id) {
                self.connection_ready(key);
            }
        }
    }

    /// Closes connections whose handshake is past its deadline.
    fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&(deadline, key, id)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.id == id && matches!(conn.state(), State::Handshaking { .. }) {
                debug!(id, "handshake timed out");
                self.counters.handshake_timeouts += 1;
                conn.abort();
                self.close(key);
            }
        }
    }

    /// The one way a connection ends: deregister, free, count, and accept again if we were full.
    fn close(&mut self, key: usize) {
        let mut conn = self.conns.remove(key);
        let _ = self.poll.registry().deregister(&mut conn.socket);
        self.counters.connections_now -= 1;
        debug!(id = conn.id, "closed");
        drop(conn);
        if self.at_capacity {
            self.at_capacity = false;
            self.accept_ready();
        }
    }
}
