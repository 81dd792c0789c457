//! UDP forwarding in one worker: an `SO_REUSEPORT` socket per UDP pool (the kernel hashes a
//! client's 4-tuple to one worker, so a client's session lives where its datagrams arrive), and a
//! session per client address holding one socket connected to the client's backend. The kernel
//! matches replies to the session by the connected socket, and an ICMP port-unreachable from the
//! backend shows up on it as `ECONNREFUSED` (passive health). [`sessions`] is the table without
//! sockets, [`sys`] the pktinfo system calls.

pub mod sessions;
pub mod sys;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use crate::balance::{self, next_backend, pick_backend, ServedPool};
use crate::control::{BackendSpec, ConnectionInfo, SessionFigures, ID_WORKER_SHIFT};
use crate::listeners::Listeners;
use crate::rate::throttle::{Throttle, Way};
use crate::rules::Proto;
use crate::stats::{now_ms, Shared};
use crate::tokens::{self, Owner};
use sessions::SessionTable;
use sys::{Outgoing, RecvBatch, SendBatch};

/// Datagrams one socket moves per readiness event before the others get a turn.
const READ_BUDGET: usize = 64;
/// Datagrams per recvmmsg/sendmmsg: one system call for up to this many.
const BATCH: usize = 16;
/// A receive slot: larger than the largest UDP payload (65,507 B over IPv4, 65,527 B over
/// IPv6), so a datagram is never cut. A worker holds BATCH of them (1 MiB).
const DATAGRAM_BUFFER: usize = 65_536;
/// Socket buffers of a listening socket: room for a burst from many clients at once.
const PORT_SOCKET_BUFFER: usize = 4 << 20;
/// Socket buffers of a session's socket toward its backend.
const SESSION_SOCKET_BUFFER: usize = 1 << 20;
/// After SIGTERM, how long replies in flight may still arrive.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Session ids carry this bit, so they never collide with the worker's TCP connection ids.
const SESSION_ID_BIT: u64 = 1 << 47;

/// What a worker tells its UDP side at start.
#[derive(Debug, Clone)]
pub struct UdpConfig {
    pub worker: usize,
    /// Sessions idle this long end.
    pub idle_timeout: Duration,
    /// Sessions this worker holds (one descriptor each) before it evicts the oldest idle one.
    pub max_sessions: usize,
}

/// Datagrams and bytes one way.
#[derive(Debug, Default, Clone, Copy)]
struct Flow {
    datagrams: u64,
    bytes: u64,
}

/// The burst of a UDP session's limits, as time at the rate: a datagram cannot wait for its
/// bucket the way a TCP read can, and datagrams that queued while the worker was busy elsewhere
/// arrive here as one burst; 100 ms of them pass, so only the excess over the rate is dropped.
const UDP_BURST_NS: u64 = 100_000_000;

/// One client address's session: its connected socket toward the backend.
struct Session {
    id: u64,
    socket: UdpSocket,
    pool: Rc<ServedPool>,
    /// Index of the backend in `pool.backends`.
    backend: usize,
    /// The local address the client sent to, to reply from (pktinfo ports only).
    local: Option<IpAddr>,
    created: Instant,
    up: Flow,
    down: Flow,
    /// The pool's bandwidth limits as this session answers to them (None while it has none).
    throttle: Option<Box<Throttle>>,
}

impl Session {
    fn slot(&self) -> usize {
        self.pool.spec.backends[self.backend].slot
    }

    /// Whether a datagram of `len` bytes going `way` is within the pool's limits (charged when
    /// it is); one load of the pool's slot when the pool has none.
    fn within_rate(&mut self, shared: &Shared, way: Way, len: usize, client: IpAddr) -> bool {
        let slot = self.pool.spec.slot;
        if !Throttle::pool_limited(shared, slot) {
            return true;
        }
        let t = self
            .throttle
            .get_or_insert_with(|| Box::new(Throttle::new(slot, client, UDP_BURST_NS)));
        t.admit_datagram(shared, way, crate::rate::now_ns(), len as u64)
    }
}

/// Why a session ended (for the debug log).
#[derive(Debug, Clone, Copy)]
enum Ending {
    Idle,
    Evicted,
    PortRemoved,
    Closed,
}

/// The UDP half of a worker.
pub struct Udp {
    config: UdpConfig,
    /// The listening sockets; each pool for new sessions (a session keeps the pool it started
    /// with across reloads).
    ports: Listeners<UdpSocket>,
    sessions: SessionTable<Session>,
    rx: RecvBatch,
    tx: SendBatch,
    /// Sockets that used their read budget and still have datagrams waiting (edge-triggered:
    /// no new event will come for them).
    again: Vec<Token>,
    epoch: Instant,
    next_id: u64,
    draining_since: Option<Instant>,
}

impl Udp {
    pub fn new(config: UdpConfig) -> Udp {
        let max = config.max_sessions;
        Udp {
            config,
            ports: Listeners::default(),
            sessions: SessionTable::new(max),
            rx: RecvBatch::new(BATCH, DATAGRAM_BUFFER),
            tx: SendBatch::default(),
            again: Vec::new(),
            epoch: Instant::now(),
            next_id: 0,
            draining_since: None,
        }
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// True when sockets wait to be read again without an event.
    pub fn has_again(&self) -> bool {
        !self.again.is_empty()
    }

    fn ms(&self, now: Instant) -> u64 {
        now.duration_since(self.epoch).as_millis() as u64
    }

    /// Handles readiness of one of this module's sockets.
    pub fn ready(&mut self, token: Token, shared: &Shared, registry: &Registry, now: Instant) {
        let more = match tokens::decode(token) {
            Owner::UdpSession(key) => self.backend_readable(key, shared, now),
            Owner::UdpPort(key) => self.client_readable(key, shared, registry, now),
            _ => false,
        };
        if more {
            self.again.push(token);
        }
    }

    /// Reads again the sockets that yielded.
    pub fn run_again(&mut self, shared: &Shared, registry: &Registry, now: Instant) {
        for token in std::mem::take(&mut self.again) {
            self.ready(token, shared, registry, now);
        }
    }

    // ---- client -> backend -----------------------------------------------------------------

    /// Reads datagrams from clients on port `key`, a batch per system call, and passes each to its
    /// session; true when the budget ran out first.
    fn client_readable(
        &mut self,
        key: usize,
        shared: &Shared,
        registry: &Registry,
        now: Instant,
    ) -> bool {
        if self.draining_since.is_some() {
            return false;
        }
        // Taken out of self for the loop, so sessions can be opened while its data is borrowed.
        let mut rx = std::mem::replace(&mut self.rx, RecvBatch::new(0, 0));
        let mut more = true;
        for _ in 0..READ_BUDGET / rx.slots() {
            let Some(port) = self.ports.get(key) else {
                more = false;
                break;
            };
            // Bound to the unspecified address: replies name their source address explicitly.
            let pktinfo = port.pool.spec.listen.ip().is_unspecified();
            let n = match rx.recv(port.socket.as_raw_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("udp receive on {}: {e}", port.pool.spec.listen);
                    continue;
                }
            };
            let now_ms = self.ms(now);
            // Runs of datagrams for one session go out in one sendmmsg.
            let mut run: Option<usize> = None;
            let mut outgoing: Vec<Outgoing> = Vec::with_capacity(n);
            for i in 0..n {
                let (got, data) = rx.get(i);
                let local = if pktinfo { got.to } else { None };
                let session = match self.sessions.find(key, got.from) {
                    Some(s) => Some(s),
                    None => {
                        // Making room may evict the session of the pending run (and hand its
                        // key to the new one): send the run first.
                        if let Some(prev) = run.take() {
                            self.send_up(prev, &outgoing, shared);
                            outgoing.clear();
                        }
                        self.open_session(key, got.from, local, shared, registry, now)
                    }
                };
                let Some(session) = session else {
                    continue; // refused or unroutable: counted where it was decided
                };
                self.sessions.touch(session, now_ms);
                if let Some(s) = self.sessions.get_mut(session) {
                    if let Some(local) = local {
                        // Answer from wherever the client sent its latest datagram.
                        s.local = Some(local);
                    }
                    if !s.within_rate(shared, Way::Up, data.len(), got.from.ip()) {
                        continue; // over a limit: dropped, counted in the pool's rate_drops
                    }
                }
                if run != Some(session) {
                    if let Some(prev) = run {
                        self.send_up(prev, &outgoing, shared);
                        outgoing.clear();
                    }
                    run = Some(session);
                }
                outgoing.push(Outgoing {
                    data,
                    to: None,
                    from: None,
                });
            }
            if let Some(prev) = run {
                self.send_up(prev, &outgoing, shared);
            }
            if n < rx.slots() {
                // The queue was empty when the kernel stopped filling the batch.
                more = false;
                break;
            }
        }
        self.rx = rx;
        more
    }

    /// Sends datagrams of one session to its backend; a full buffer drops (and counts) what did
    /// not fit, a port-unreachable moves the session to the next backend and tries once more.
    fn send_up(&mut self, key: usize, msgs: &[Outgoing], shared: &Shared) {
        let mut done = 0;
        for attempt in 0..2 {
            let Some(s) = self.sessions.get_mut(key) else {
                return;
            };
            let backend = shared.backend(s.slot());
            let (sent, err) = self.tx.send(s.socket.as_raw_fd(), &msgs[done..]);
            let bytes: usize = msgs[done..done + sent].iter().map(|m| m.data.len()).sum();
            s.up.datagrams += sent as u64;
            s.up.bytes += bytes as u64;
            backend.datagrams_up.fetch_add(sent as u64, Relaxed);
            backend.bytes_up.fetch_add(bytes as u64, Relaxed);
            done += sent;
            match err {
                None => return,
                // An ICMP port-unreachable for an earlier datagram: the backend is not there.
                Some(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) && attempt == 0 => {
                    self.refused(key, shared);
                }
                Some(e) => {
                    // Full buffer (EAGAIN, ENOBUFS) or anything else: these datagrams are lost.
                    tracing::trace!("udp send to backend: {e}");
                    backend
                        .drops_up
                        .fetch_add((msgs.len() - done) as u64, Relaxed);
                    return;
                }
            }
        }
        if let Some(s) = self.sessions.get(key) {
            shared
                .backend(s.slot())
                .drops_up
                .fetch_add((msgs.len() - done) as u64, Relaxed);
        }
    }

    /// Makes a session for a new client: a free place (evicting the least recently active
    /// session when full), a backend in round-robin order, a socket connected to it.
    fn open_session(
        &mut self,
        port: usize,
        client: SocketAddr,
        local: Option<IpAddr>,
        shared: &Shared,
        registry: &Registry,
        now: Instant,
    ) -> Option<usize> {
        let pool = Rc::clone(&self.ports[port].pool);
        if let Some(evicted) = self.sessions.make_room() {
            shared.pool(pool.spec.slot).evicted.fetch_add(1, Relaxed);
            if evicted.first_of_episode {
                tracing::warn!(
                    worker = self.config.worker,
                    sessions = self.sessions.capacity(),
                    "udp session table full: evicting the least recently active sessions"
                );
            }
            tracing::debug!(client = %evicted.client, "udp session evicted");
            self.end(evicted.value, Ending::Evicted, shared);
        }
        let counts = shared.pool(pool.spec.slot);
        if !pool.acl.admits(client.ip()) {
            counts.denied.fetch_add(1, Relaxed);
            return None;
        }
        let worker = self.config.worker;
        let index = match pick_backend(&pool, shared, worker, now_ms(), client.ip()) {
            Ok(index) => index,
            Err(balance::Refusal::Full) => {
                counts.full.fetch_add(1, Relaxed);
                return None;
            }
            Err(balance::Refusal::NoBackend) => {
                counts.unrouted.fetch_add(1, Relaxed);
                return None;
            }
        };
        // From here the backend's place is reserved: give it back if the session cannot be made.
        let backend = &pool.spec.backends[index];
        let socket = connected_socket(backend, client.ip()).and_then(|mut socket| {
            let key = self.sessions.vacant_key();
            registry.register(&mut socket, tokens::udp_session(key), Interest::READABLE)?;
            Ok(socket)
        });
        let socket = match socket {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%client, backend = %backend.addr, "no udp session socket: {e}");
                balance::release(&pool, shared, worker, index);
                counts.unrouted.fetch_add(1, Relaxed);
                return None;
            }
        };
        self.next_id += 1;
        let id = ((self.config.worker as u64) << ID_WORKER_SHIFT) | SESSION_ID_BIT | self.next_id;
        counts.accepted.fetch_add(1, Relaxed);
        shared.backend(backend.slot).total.fetch_add(1, Relaxed);
        tracing::debug!(id, %client, backend = %backend.addr, "udp session");
        let session = Session {
            id,
            socket,
            pool: Rc::clone(&pool),
            backend: index,
            local,
            created: now,
            up: Flow::default(),
            down: Flow::default(),
            throttle: None,
        };
        Some(self.sessions.insert(port, client, self.ms(now), session))
    }

    /// The session's backend answered with port unreachable: mark it down and point the
    /// session at the next backend of its pool (the same socket, connected anew).
    fn refused(&mut self, key: usize, shared: &Shared) {
        let worker = self.config.worker;
        let Some((_, client)) = self.sessions.client(key) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let failed = &s.pool.spec.backends[s.backend];
        if shared
            .backend(failed.slot)
            .record_failure(libc::ECONNREFUSED as u64, now_ms())
        {
            tracing::warn!(backend = %failed.addr, name = %failed.name, "backend down: udp port unreachable");
        }
        let Ok(next) = next_backend(&s.pool, shared, worker, now_ms(), client.ip(), &[s.backend])
        else {
            return;
        };
        let to = &s.pool.spec.backends[next];
        // The socket was bound for the failed backend's source, interface and mark: it can move
        // only to a backend that wants the same (else the session ends when it goes idle).
        if !crate::outbound::same_socket(&failed.options, &to.options)
            || s.socket.connect(to.addr).is_err()
        {
            balance::release(&s.pool, shared, worker, next);
            return;
        }
        // An error still pending from the old backend (a second port-unreachable) must not be
        // blamed on the new one: reading SO_ERROR clears it.
        let _ = s.socket.take_error();
        balance::release(&s.pool, shared, worker, s.backend);
        shared.backend(to.slot).total.fetch_add(1, Relaxed);
        tracing::debug!(id = s.id, from = %failed.addr, to = %to.addr, "udp session failed over");
        s.backend = next;
    }

    // ---- backend -> client -----------------------------------------------------------------

    /// Reads replies on session `key`'s socket, a batch per system call, and sends them to its
    /// client from the listening socket, a batch per system call; true when the budget ran out.
    fn backend_readable(&mut self, key: usize, shared: &Shared, now: Instant) -> bool {
        let mut moved = false;
        let mut more = true;
        for _ in 0..READ_BUDGET / self.rx.slots() {
            let Some((port, client)) = self.sessions.client(key) else {
                return false;
            };
            let Some(s) = self.sessions.get_mut(key) else {
                return false;
            };
            let n = match self.rx.recv(s.socket.as_raw_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    self.refused(key, shared);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(id = s.id, "udp receive from backend: {e}");
                    more = false;
                    break;
                }
            };
            let backend = shared.backend(s.slot());
            // A reply is the UDP backend's good check (its only one, with no probe datagram).
            if (backend.ever_ok.load(Relaxed) == 0 || backend.failures_in_row.load(Relaxed) > 0)
                && backend.record_success(now_ms())
            {
                tracing::info!(backend = %s.pool.spec.backends[s.backend].addr, "backend up");
            }
            let rx = &self.rx;
            let from = s.local;
            let outgoing: Vec<Outgoing> = (0..n)
                .map(|i| rx.get(i).1)
                .filter(|data| s.within_rate(shared, Way::Down, data.len(), client.ip()))
                .map(|data| Outgoing {
                    data,
                    to: Some(client),
                    from,
                })
                .collect();
            let n_read = n;
            let n = outgoing.len();
            let fd = self.ports[port].socket.as_raw_fd();
            let mut done = 0;
            while done < n {
                let (sent, err) = self.tx.send(fd, &outgoing[done..]);
                let bytes: usize = outgoing[done..done + sent]
                    .iter()
                    .map(|m| m.data.len())
                    .sum();
                s.down.datagrams += sent as u64;
                s.down.bytes += bytes as u64;
                backend.datagrams_down.fetch_add(sent as u64, Relaxed);
                backend.bytes_down.fetch_add(bytes as u64, Relaxed);
                done += sent;
                match err {
                    None => {}
                    Some(e)
                        if matches!(e.kind(), io::ErrorKind::WouldBlock)
                            || e.raw_os_error() == Some(libc::ENOBUFS) =>
                    {
                        // The client-facing buffer is full: the rest of this batch is lost.
                        backend.drops_down.fetch_add((n - done) as u64, Relaxed);
                        done = n;
                    }
                    Some(e) => {
                        // One datagram the kernel refused (say, a client gone): skip it.
                        tracing::trace!("udp send to client: {e}");
                        backend.drops_down.fetch_add(1, Relaxed);
                        done += 1;
                    }
                }
            }
            moved = true;
            if n_read < self.rx.slots() {
                more = false;
                break;
            }
        }
        if moved {
            let now_ms = self.ms(now);
            self.sessions.touch(key, now_ms);
        }
        more
    }

    // ---- session ends ----------------------------------------------------------------------

    /// The one way a session ends: off the open count, socket closed (which also takes it out of
    /// the epoll set).
    fn end(&self, s: Session, ending: Ending, shared: &Shared) {
        balance::release(&s.pool, shared, self.config.worker, s.backend);
        tracing::debug!(
            id = s.id,
            ?ending,
            up = s.up.datagrams,
            down = s.down.datagrams,
            "udp session ended"
        );
    }

    /// Ends the sessions idle past the timeout.
    pub fn expire(&mut self, shared: &Shared, now: Instant) {
        let idle_ms = self.config.idle_timeout.as_millis() as u64;
        for (_, _, s) in self.sessions.expire(self.ms(now), idle_ms) {
            self.end(s, Ending::Idle, shared);
        }
    }

    /// Ends session `id` if this worker has it.
    pub fn close(&mut self, id: u64, shared: &Shared) -> bool {
        let key = self
            .sessions
            .iter(0)
            .find(|(_, _, _, _, s)| s.id == id)
            .map(|(k, ..)| k);
        match key.and_then(|k| self.sessions.remove(k)) {
            Some((_, _, s)) => {
                self.end(s, Ending::Closed, shared);
                true
            }
            None => false,
        }
    }

    /// The live sessions, for the web page.
    pub fn connections(&self, now: Instant) -> Vec<ConnectionInfo> {
        let now_ms = self.ms(now);
        self.sessions
            .iter(now_ms)
            .map(|(_, port, client, idle_ms, s)| {
                let b = &s.pool.spec.backends[s.backend];
                ConnectionInfo {
                    id: s.id,
                    worker: self.config.worker,
                    client,
                    listen: self
                        .ports
                        .get(port)
                        .map_or(s.pool.spec.listen, |p| p.pool.spec.listen),
                    proto: Proto::Udp,
                    rule: b.name.clone(),
                    backend: b.addr,
                    state: "session".into(),
                    bytes_up: s.up.bytes,
                    bytes_down: s.down.bytes,
                    age_ms: now.duration_since(s.created).as_millis() as u64,
                    udp: Some(SessionFigures {
                        datagrams_up: s.up.datagrams,
                        datagrams_down: s.down.datagrams,
                        idle_ms,
                    }),
                    sni: None,
                    client_half_closed: false,
                    backend_half_closed: false,
                }
            })
            .collect()
    }

    // ---- rules and shutdown ----------------------------------------------------------------

    /// Makes the UDP ports match `pools` (UDP pools only): new ones are bound, removed ones
    /// closed with their sessions, changed ones serve new sessions with the new pool. Returns
    /// the ports that could not be bound.
    pub fn apply(
        &mut self,
        pools: Vec<ServedPool>,
        shared: &Shared,
        registry: &Registry,
    ) -> Vec<String> {
        let open = |addr: SocketAddr, key: usize| {
            let mut socket =
                reuseport_socket(addr).map_err(|e| format!("{addr}/udp: cannot listen: {e}"))?;
            registry
                .register(&mut socket, tokens::udp_port(key), Interest::READABLE)
                .map_err(|e| format!("{addr}/udp: {e}"))?;
            Ok(socket)
        };
        let mut closed = Vec::new();
        let (opened, errors) =
            self.ports
                .reconcile(pools, self.draining_since.is_none(), open, |key, port| {
                    closed.push((key, port))
                });
        for (key, mut port) in closed {
            for (_, _, s) in self.sessions.remove_port(key) {
                self.end(s, Ending::PortRemoved, shared);
            }
            let _ = registry.deregister(&mut port.socket);
            self.again.retain(|t| *t != tokens::udp_port(key));
            tracing::debug!(worker = self.config.worker, addr = %port.pool.spec.listen, "stopped listening (udp)");
        }
        // Datagrams may have queued between bind and register.
        self.again.extend(opened.into_iter().map(tokens::udp_port));
        errors
    }

    /// Stops reading clients (the kernel hands their datagrams to the other workers' sockets or
    /// drops them) but keeps the sockets, so replies still in flight reach their clients.
    pub fn start_drain(&mut self, registry: &Registry, now: Instant) {
        self.draining_since = Some(now);
        for port in self.ports.iter_mut() {
            let _ = registry.deregister(&mut port.socket);
        }
    }

    /// True once draining and every session ended or the grace for replies ran out.
    pub fn drained(&self, now: Instant) -> bool {
        match self.draining_since {
            Some(since) => self.sessions.is_empty() || now.duration_since(since) >= DRAIN_GRACE,
            None => false,
        }
    }
}

/// A non-blocking UDP socket on `addr` shared by every worker (`SO_REUSEPORT`), with large
/// buffers and, when bound to the unspecified address, destination addresses reported.
fn reuseport_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As for TCP: an IPv6 socket taking IPv4 too would collide with an IPv4 rule's port.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    sys::set_buffers(socket.as_raw_fd(), PORT_SOCKET_BUFFER);
    if addr.ip().is_unspecified() {
        sys::enable_pktinfo(socket.as_raw_fd(), addr.is_ipv6())?;
    }
    socket.bind(&addr.into())?;
    Ok(UdpSocket::from_std(socket.into()))
}

/// A non-blocking UDP socket connected to `backend` (an ephemeral local port, on the row's
/// outbound address, interface and mark).
fn connected_socket(backend: &BackendSpec, client: IpAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::from_std(crate::outbound::bind_udp(
        backend.addr,
        &backend.options,
        client,
    )?);
    // A burst of replies must not overflow the default (~200 KiB, ~90 datagrams of 1,400 B)
    // while the worker is busy elsewhere; a limit, not memory taken up front.
    sys::set_buffers(socket.as_raw_fd(), SESSION_SOCKET_BUFFER);
    socket.connect(backend.addr)?;
    Ok(socket)
}
