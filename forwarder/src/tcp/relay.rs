//! One forwarded connection's whole life, as a state machine: accepted, connecting to a backend
//! (falling over to the next one on refusal or timeout), relaying both directions, closed. The
//! worker only hands it readiness events and timer expiries through [`Relay::ready`] and acts on
//! the [`Next`] it returns; every way a connection ends comes back as [`Next::Close`] and goes
//! through [`Relay::close`], which frees and counts. With the sockmap data path an established
//! pair is handed to the kernel ([`Phase::InKernel`]): the relay then only hears of hang-ups and
//! errors, and counts from the sockets' kernel counters.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::access_log::{AccessLog, Record};
use crate::balance::{self, next_backend, pick_backend, Refusal, ServedPool};
use crate::control::ConnectionInfo;
use crate::stats::per_ip::Admit;
use crate::stats::{now_ms, Shared, ERR_TIMEOUT};
use crate::tcp::direction::{Direction, Progress, PumpError, Resources};
use crate::tcp::kernel_direction::{socket_counts, KernelDirection};
use crate::tcp::proxy::{self, HeaderError};
use crate::tcp::sockmap::{self, Joined};

/// First wait before looking again at a FIN whose bytes the kernel is still passing on; doubled
/// on each look up to [`FIN_POLL_MAX`] (a stalled sink may hold them for long).
const FIN_POLL_FIRST: Duration = Duration::from_millis(1);
const FIN_POLL_MAX: Duration = Duration::from_millis(100);

/// What a relay needs from its worker while it handles one event.
pub struct Context<'a> {
    /// The worker's index: its row of open-connection counts.
    pub worker: usize,
    pub registry: &'a Registry,
    pub shared: &'a Shared,
    pub res: &'a mut Resources,
    /// How long one backend connect may take before the next backend is tried.
    pub connect_timeout: Duration,
    pub now: Instant,
    /// Where finished connections are logged (`--access-log`), if anywhere.
    pub access_log: Option<&'a AccessLog>,
}

/// What the worker does after a relay handled an event.
#[derive(Debug)]
pub enum Next {
    /// Nothing until the next event.
    Wait,
    /// A direction stopped at its fair share with more to move: call [`Relay::pump_again`] soon,
    /// without waiting for an event (edge-triggered readiness will not report it again).
    Again(Sides),
    /// A backend connect started: call [`Relay::timer_expired`] at `deadline`.
    Timer(Instant),
    /// The connection is over: call [`Relay::close`].
    Close(Ending),
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ending {
    /// Both FINs passed on and every byte delivered.
    Finished,
    /// A read or write failed (a peer reset, mostly); the other side is reset too.
    Failed(PumpError),
    /// No backend of the pool answered.
    NoBackend,
    /// A socket could not be opened or registered (often: out of descriptors).
    NoSocket(io::Error),
    /// Idle longer than the idle timeout.
    Idle,
    /// Closed on request (the web page's close button).
    Closed,
    /// Refused by the pool's access list before any backend was tried.
    Denied,
    /// Every backend of the pool held its `max_conns`.
    Full,
    /// The client's address held the pool's `max_conns_per_ip`.
    PerIpFull,
    /// `accept_proxy`: no valid PROXY header arrived within the connect timeout.
    BadHeader(HeaderError),
}

impl Ending {
    /// The access log's word for it.
    fn word(&self, first_fin: Option<Side>) -> &'static str {
        match self {
            Ending::Finished if first_fin == Some(Side::Backend) => "backend_fin",
            Ending::Finished => "client_fin",
            Ending::Failed(_) => "reset",
            Ending::NoBackend | Ending::NoSocket(_) => "no_backend",
            Ending::Idle => "idle_timeout",
            Ending::Closed => "closed",
            Ending::Denied => "denied",
            Ending::Full | Ending::PerIpFull => "limit",
            Ending::BadHeader(_) => "bad_proxy_header",
        }
    }

    /// Whether both sockets are closed with RST rather than FIN: a failure on one side is passed
    /// on to the other, and a refused client must not think its request was answered.
    fn resets(&self) -> bool {
        !matches!(self, Ending::Finished | Ending::Idle)
    }
}

/// Which socket of a relay an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// What an event reported about one socket.
#[derive(Debug, Clone, Copy)]
pub enum Wake {
    Io {
        readable: bool,
        writable: bool,
    },
    /// Error or hang-up: look at everything.
    Error,
}

impl From<&mio::event::Event> for Wake {
    fn from(e: &mio::event::Event) -> Self {
        if e.is_error() || e.is_read_closed() || e.is_write_closed() {
            Wake::Error
        } else {
            Wake::Io {
                readable: e.is_readable(),
                writable: e.is_writable(),
            }
        }
    }
}

/// Which directions of a relay to pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sides {
    /// client → backend
    pub up: bool,
    /// backend → client
    pub down: bool,
    /// Read until EAGAIN even after a short read (the socket's state is not known).
    pub until_eagain: bool,
}

impl Sides {
    pub const BOTH: Sides = Sides {
        up: true,
        down: true,
        until_eagain: true,
    };
}

/// Where a connection is in its life.
enum Phase {
    /// Accepted; no backend chosen yet.
    Accepted,
    /// `accept_proxy`: waiting for the PROXY header that names the client.
    ReadingHeader {
        deadline: Instant,
    },
    /// Waiting for the backend's non-blocking connect. `tried` holds the pool indices tried so
    /// far (the last one is in progress).
    Connecting {
        backend: TcpStream,
        deadline: Instant,
        tried: Vec<usize>,
    },
    Relaying {
        backend: TcpStream,
    },
    /// The kernel moves the bytes (sockmap): the worker hears only of hang-ups and errors.
    InKernel {
        backend: TcpStream,
        /// The pair's map entries, removed on close.
        joined: Joined,
        /// client → backend
        up: KernelDirection,
        /// backend → client
        down: KernelDirection,
        /// Next wait before looking at a FIN still held back by bytes in flight.
        fin_poll: Duration,
        /// When the pending FIN look is due (one timer at a time, however many events come).
        fin_due: Option<Instant>,
    },
}

/// One client connection and its backend.
pub struct Relay {
    /// Unique across workers (worker index in the top bits), for the page and the logs.
    id: u64,
    /// The slab key: the client's token is `2 * key`, the backend's `2 * key + 1`.
    key: usize,
    client: TcpStream,
    /// The client: the peer, or the one a PROXY header named (`accept_proxy`).
    client_addr: SocketAddr,
    /// The address the client reached, when a PROXY header named it (else the socket's own).
    reached: Option<SocketAddr>,
    /// The pool as it was when the connection arrived (a reload does not move it).
    pool: Rc<ServedPool>,
    /// Index into `pool.backends` of the backend in use or being connected.
    backend_index: usize,
    /// `backend_index` holds a place in the backend's open count (taken by the balancer).
    reserved: bool,
    /// Length of the PROXY header sent ahead of the client's bytes (0 = none).
    header_len: u64,
    /// Length of the PROXY header read from the client (`accept_proxy`; 0 = none): the kernel
    /// counts it among the client's bytes, the page must not.
    header_in: u64,
    /// Bytes of that header not yet taken off the up count.
    header_uncounted: u64,
    /// The client's address is counted against `max_conns_per_ip` (release it at the end).
    per_ip_counted: bool,
    /// Which side sent the first FIN (the access log says who ended the connection).
    first_fin: Option<Side>,
    phase: Phase,
    /// client → backend
    up: Direction,
    /// backend → client
    down: Direction,
    started: Instant,
    last_active: Instant,
}

impl Relay {
    /// A relay for a just-accepted client; [`Relay::start`] begins its life.
    pub fn new(
        id: u64,
        key: usize,
        client: TcpStream,
        client_addr: SocketAddr,
        pool: Rc<ServedPool>,
        now: Instant,
    ) -> Relay {
        Relay {
            id,
            key,
            client,
            client_addr,
            reached: None,
            pool,
            backend_index: 0,
            reserved: false,
            header_len: 0,
            header_in: 0,
            header_uncounted: 0,
            first_fin: None,
            per_ip_counted: false,
            phase: Phase::Accepted,
            up: Direction::default(),
            down: Direction::default(),
            started: now,
            last_active: now,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client's address (the one a PROXY header named, with `accept_proxy`).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// Counts the client, checks the access list, registers it, and starts connecting to the
    /// pool's next backend; with `accept_proxy`, first waits for the PROXY header.
    pub fn start(&mut self, ctx: &mut Context) -> Next {
        ctx.shared
            .pool(self.pool.spec.slot)
            .accepted
            .fetch_add(1, Relaxed);
        let accept_proxy = self.pool.spec.options.accept_proxy;
        // Refused before registering: no system call is spent on a denied client.
        if !accept_proxy && !self.pool.acl.admits(self.client_addr.ip()) {
            return Next::Close(Ending::Denied);
        }
        let both = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = ctx
            .registry
            .register(&mut self.client, Token(self.key * 2), both)
        {
            return Next::Close(Ending::NoSocket(e));
        }
        if accept_proxy {
            let deadline = ctx.now + ctx.connect_timeout;
            self.phase = Phase::ReadingHeader { deadline };
            return match self.read_header(ctx) {
                Next::Wait => Next::Timer(deadline),
                next => next,
            };
        }
        self.route(ctx)
    }

    /// Counts the client against `max_conns_per_ip`, picks the first backend and connects.
    fn route(&mut self, ctx: &mut Context) -> Next {
        let client = self.client_addr.ip();
        let per_ip = self.pool.spec.options.max_conns_per_ip;
        if per_ip > 0 {
            match ctx
                .shared
                .admit_ip(ctx.worker, self.pool.spec.slot, client, per_ip)
            {
                Admit::Counted => self.per_ip_counted = true,
                Admit::Uncounted => {}
                Admit::Refused => return Next::Close(Ending::PerIpFull),
            }
        }
        match pick_backend(&self.pool, ctx.shared, ctx.worker, now_ms(), client) {
            Ok(index) => self.connect(index, Vec::new(), ctx),
            Err(Refusal::Full) => Next::Close(Ending::Full),
            Err(Refusal::NoBackend) => Next::Close(Ending::NoBackend),
        }
    }

    /// `accept_proxy`: looks at what the client sent so far (MSG_PEEK, so nothing is consumed
    /// until the header is whole), and once it is, takes exactly the header off the stream and
    /// carries on with the address it names.
    fn read_header(&mut self, ctx: &mut Context) -> Next {
        let mut buf = [0u8; proxy::MAX_HEADER];
        let seen = match self.client.peek(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
            Err(e) => return Next::Close(Ending::Failed(PumpError::Read(e))),
        };
        let header = match proxy::parse(&buf[..seen]) {
            Ok(Some(h)) => h,
            Ok(None) if seen > 0 => return Next::Wait,
            Ok(None) => return Next::Close(Ending::BadHeader(HeaderError::Closed)),
            Err(e) => return Next::Close(Ending::BadHeader(e)),
        };
        let mut taken = 0;
        while taken < header.len {
            match io::Read::read(&mut self.client, &mut buf[taken..header.len]) {
                Ok(0) => return Next::Close(Ending::BadHeader(HeaderError::Closed)),
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Next::Close(Ending::Failed(PumpError::Read(e))),
            }
        }
        self.header_in = header.len as u64;
        if let Some((client, reached)) = header.addrs {
            self.client_addr = client;
            self.reached = Some(reached);
        }
        self.phase = Phase::Accepted;
        if !self.pool.acl.admits(self.client_addr.ip()) {
            return Next::Close(Ending::Denied);
        }
        self.route(ctx)
    }

    /// Handles a readiness event on one of the relay's sockets.
    pub fn ready(&mut self, side: Side, wake: Wake, ctx: &mut Context) -> Next {
        self.last_active = ctx.now;
        match &self.phase {
            Phase::Accepted => Next::Wait,
            Phase::ReadingHeader { .. } if side == Side::Client => self.read_header(ctx),
            Phase::ReadingHeader { .. } => Next::Wait,
            // Client bytes wait in the kernel until the backend is up.
            Phase::Connecting { .. } if side == Side::Client => Next::Wait,
            Phase::Connecting { backend, .. } => {
                let writable = matches!(wake, Wake::Io { writable: true, .. });
                match connect_result(backend, writable) {
                    None => Next::Wait, // spurious wake-up, still connecting
                    Some(Ok(())) => self.connected(ctx),
                    Some(Err(e)) => {
                        let code = e.raw_os_error().unwrap_or(libc::ECONNREFUSED) as u64;
                        self.fail_over(code, &e.to_string(), ctx)
                    }
                }
            }
            Phase::Relaying { .. } => {
                let sides = self.sides_for(side, wake);
                self.pump(sides, ctx)
            }
            // Only hang-ups and errors are reported: look at both directions.
            Phase::InKernel { .. } => self.watch_kernel(ctx),
        }
    }

    /// Continues a direction that yielded its fair share.
    pub fn pump_again(&mut self, sides: Sides, ctx: &mut Context) -> Next {
        self.pump(sides, ctx)
    }

    /// A connect timer fired. Timers are never cancelled: one set for an earlier attempt finds a
    /// later deadline (or another phase) and is ignored.
    pub fn timer_expired(&mut self, ctx: &mut Context) -> Next {
        match &self.phase {
            Phase::Connecting { deadline, .. } if *deadline <= ctx.now => {
                self.fail_over(ERR_TIMEOUT, "connect timed out", ctx)
            }
            Phase::ReadingHeader { deadline } if *deadline <= ctx.now => {
                Next::Close(Ending::BadHeader(HeaderError::Timeout))
            }
            Phase::InKernel {
                fin_due: Some(due), ..
            } if *due <= ctx.now => self.watch_kernel(ctx),
            _ => Next::Wait,
        }
    }

    /// Once a second: a connection in the kernel reports no bytes, so its counts are read from
    /// the sockets here (two `TCP_INFO` calls), for the counters and the page. An error found on
    /// the way (it is read, and so cleared, by this look) ends the connection as a reset would.
    pub fn refresh(&mut self, ctx: &mut Context) -> Next {
        if !matches!(self.phase, Phase::InKernel { .. }) {
            return Next::Wait;
        }
        match self.count_kernel(false, ctx) {
            Ok(_) => Next::Wait,
            Err(e) => Next::Close(Ending::Failed(e)),
        }
    }

    /// True when nothing happened on the connection for `limit`. In the kernel no event reports
    /// bytes, so there the sockets' own clocks (`tcpi_last_data_recv`) must agree.
    pub fn idle_for(&self, limit: Duration, now: Instant) -> bool {
        if now.duration_since(self.last_active) < limit {
            return false;
        }
        match &self.phase {
            Phase::InKernel { backend, .. } => [self.client.as_raw_fd(), backend.as_raw_fd()]
                .iter()
                .all(|&fd| {
                    socket_counts(fd).map_or(true, |c| {
                        Duration::from_millis(c.last_data_recv_ms.into()) >= limit
                    })
                }),
            _ => true,
        }
    }

    /// The one way a connection ends: frees what the directions hold, closes both sockets (with
    /// RST when `ending` says so), and takes the connection off the counters.
    pub fn close(mut self, ending: &Ending, ctx: &mut Context) {
        self.up.discard(ctx.res);
        self.down.discard(ctx.res);
        if matches!(self.phase, Phase::InKernel { .. }) {
            // The last bytes' count (no FIN: a reset may be what goes out), then out of the map.
            let _ = self.count_kernel(false, ctx);
            if let (Phase::InKernel { joined, .. }, Some(map)) = (&self.phase, &ctx.res.sockmap) {
                map.leave(joined);
            }
        }
        let backend = match &self.phase {
            Phase::Connecting { backend, .. }
            | Phase::Relaying { backend }
            | Phase::InKernel { backend, .. } => Some(backend),
            Phase::Accepted | Phase::ReadingHeader { .. } => None,
        };
        if ending.resets() {
            for s in std::iter::once(&self.client).chain(backend) {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
        }
        if self.reserved {
            balance::release(&self.pool, ctx.shared, ctx.worker, self.backend_index);
        }
        if self.per_ip_counted {
            ctx.shared
                .release_ip(ctx.worker, self.pool.spec.slot, self.client_addr.ip());
        }
        let pool = ctx.shared.pool(self.pool.spec.slot);
        match ending {
            Ending::NoBackend | Ending::NoSocket(_) => {
                pool.unrouted.fetch_add(1, Relaxed);
            }
            Ending::Denied => {
                pool.denied.fetch_add(1, Relaxed);
            }
            Ending::Full => {
                pool.full.fetch_add(1, Relaxed);
            }
            Ending::PerIpFull => {
                pool.per_ip_full.fetch_add(1, Relaxed);
            }
            Ending::BadHeader(_) => {
                pool.bad_header.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        if let Some(log) = ctx.access_log {
            self.log(log, ending, ctx);
        }
        let (up, down) = self.bytes();
        tracing::debug!(id = self.id, up, down, ?ending, "closed");
        // Dropping the sockets closes them, which also takes them out of the epoll set.
    }

    fn log(&self, log: &AccessLog, ending: &Ending, ctx: &Context) {
        let chosen = !matches!(
            ending,
            Ending::Denied | Ending::Full | Ending::PerIpFull | Ending::BadHeader(_)
        ) && !self.pool.spec.backends.is_empty();
        let backend = chosen.then(|| &self.pool.spec.backends[self.backend_index]);
        let record = Record {
            time: std::time::SystemTime::now(),
            client: self.client_addr,
            listen: self.pool.spec.listen,
            rule: backend.map(|b| b.name.as_str()),
            backend: backend.map(|b| b.addr),
            bytes_up: self.bytes().0,
            bytes_down: self.bytes().1,
            duration: ctx.now.saturating_duration_since(self.started),
            ending: ending.word(self.first_fin),
        };
        log.write(&record, ctx.shared);
    }

    /// One line of the web page's connection table.
    pub fn info(&self, worker: usize, now: Instant) -> ConnectionInfo {
        let b = &self.pool.spec.backends[self.backend_index];
        ConnectionInfo {
            id: self.id,
            worker,
            client: self.client_addr,
            listen: self.pool.spec.listen,
            proto: self.pool.spec.proto,
            rule: b.name.clone(),
            backend: b.addr,
            state: match self.phase {
                Phase::Accepted | Phase::ReadingHeader { .. } | Phase::Connecting { .. } => {
                    "connecting".into()
                }
                Phase::Relaying { .. } | Phase::InKernel { .. } => "relaying".into(),
            },
            bytes_up: self.bytes().0,
            bytes_down: self.bytes().1,
            age_ms: now.duration_since(self.started).as_millis() as u64,
            client_half_closed: self.source_done().0,
            backend_half_closed: self.source_done().1,
            udp: None,
        }
    }

    /// Bytes passed up and down: what the directions delivered (less the PROXY header we
    /// sent), or in the kernel, what the sockets counted when last looked at.
    fn bytes(&self) -> (u64, u64) {
        match &self.phase {
            Phase::InKernel { up, down, .. } => (up.bytes(), down.bytes()),
            _ => (
                self.up.bytes() - (self.header_len - self.header_uncounted),
                self.down.bytes(),
            ),
        }
    }

    /// Whether the client and the backend sent their FIN.
    fn source_done(&self) -> (bool, bool) {
        match &self.phase {
            Phase::InKernel { up, down, .. } => (up.source_done(), down.source_done()),
            _ => (self.up.source_done(), self.down.source_done()),
        }
    }

    // ---- connecting ------------------------------------------------------------------------

    /// Starts a non-blocking connect to backend `index`, whose place the balancer reserved;
    /// `tried` are the ones already tried.
    fn connect(&mut self, index: usize, mut tried: Vec<usize>, ctx: &mut Context) -> Next {
        self.backend_index = index;
        self.reserved = true;
        let addr = self.pool.spec.backends[index].addr;
        let mut backend = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot open a socket to {addr}: {e}");
                return Next::Close(Ending::NoSocket(e));
            }
        };
        let token = Token(self.key * 2 + 1);
        if let Err(e) =
            ctx.registry
                .register(&mut backend, token, Interest::READABLE | Interest::WRITABLE)
        {
            return Next::Close(Ending::NoSocket(e));
        }
        tracing::debug!(id = self.id, client = %self.client_addr, backend = %addr, "connecting");
        tried.push(index);
        self.backend_index = index;
        let deadline = ctx.now + ctx.connect_timeout;
        // The previous attempt's socket (if any) is dropped here, which deregisters it.
        self.phase = Phase::Connecting {
            backend,
            deadline,
            tried,
        };
        Next::Timer(deadline)
    }

    /// The backend answered: count the connection and move both directions once, since bytes
    /// may already wait on either side.
    fn connected(&mut self, ctx: &mut Context) -> Next {
        let Phase::Connecting { backend, .. } = std::mem::replace(&mut self.phase, Phase::Accepted)
        else {
            return Next::Wait;
        };
        let _ = backend.set_nodelay(true);
        let _ = socket2::SockRef::from(&backend).set_keepalive(true);
        let header = self.pool.spec.backends[self.backend_index]
            .options
            .send_proxy
            .map(|version| {
                let reached = self
                    .reached
                    .or_else(|| self.client.local_addr().ok())
                    .unwrap_or(self.pool.spec.listen);
                proxy::encode(version, self.client_addr, reached)
            });
        let slot = ctx.shared.backend(self.backend_slot());
        slot.total.fetch_add(1, Relaxed);
        if slot.record_success(now_ms()) {
            tracing::info!(backend = %self.backend_addr(), "backend up");
        }
        let mut header = header;
        let backend = match self.hand_to_kernel(backend, &mut header, ctx) {
            Ok(next) => return next,
            Err(backend) => backend,
        };
        self.phase = Phase::Relaying { backend };
        if let Some(header) = header {
            self.header_len = header.len() as u64;
            self.header_uncounted = self.header_len;
            // Goes out before any client byte: the up direction flushes what it holds first.
            self.up.preload(&header, ctx.res);
        }
        self.pump(Sides::BOTH, ctx)
    }

    /// With the sockmap data path: writes the PROXY header (taking it out of `header`) and puts
    /// the pair into the worker's map, so the kernel moves their bytes. Gives the backend back
    /// when the pair cannot join (no map, or a socket already past ESTABLISHED): the relay then
    /// moves the bytes itself, and nothing was read or lost.
    fn hand_to_kernel(
        &mut self,
        mut backend: TcpStream,
        header: &mut Option<Vec<u8>>,
        ctx: &mut Context,
    ) -> Result<Next, TcpStream> {
        let Some(map) = ctx.res.sockmap.as_ref() else {
            return Err(backend);
        };
        let mut header_sent = 0;
        if let Some(bytes) = header.take() {
            // A fresh connection's send buffer takes a PROXY header (at most 232 bytes) whole.
            match backend.write(&bytes) {
                Ok(n) if n == bytes.len() => header_sent = n as u64,
                Ok(_) => {
                    let short = io::Error::new(io::ErrorKind::WriteZero, "PROXY header cut short");
                    return Ok(Next::Close(Ending::Failed(PumpError::Write(short))));
                }
                Err(e) => return Ok(Next::Close(Ending::Failed(PumpError::Write(e)))),
            }
        }
        if self.header_in > 0 && queued_to_read(&self.client) != Some(0) {
            // The kernel hands the verdict whole skbs and ignores what was read of one: the
            // PROXY header we took would go out again with the bytes that shared its skb.
            tracing::debug!(
                id = self.id,
                "bytes came with the PROXY header; relaying in user space"
            );
            return Err(backend);
        }
        let joined = match map.join(self.client.as_raw_fd(), backend.as_raw_fd()) {
            Ok(joined) => joined,
            Err(e) => {
                tracing::debug!(
                    id = self.id,
                    "not joining the sockmap ({e}); relaying in user space"
                );
                return Err(backend);
            }
        };
        for (socket, token) in [
            (self.client.as_raw_fd(), Token(self.key * 2)),
            (backend.as_raw_fd(), Token(self.key * 2 + 1)),
        ] {
            if let Err(e) = sockmap::watch_hangups_only(ctx.registry, socket, token) {
                // Still registered for everything: spurious wake-ups only, bytes still move.
                tracing::debug!(id = self.id, "re-arming for hang-ups only: {e}");
            }
        }
        ctx.shared
            .backend(self.backend_slot())
            .in_kernel
            .fetch_add(1, Relaxed);
        self.phase = Phase::InKernel {
            backend,
            joined,
            // Sequence numbers already queued on each sink: the SYN of the connect we made
            // (acknowledged by the backend's SYN-ACK; an accepted socket counts none), and the
            // PROXY header written above.
            up: KernelDirection::new(self.header_in, 1 + header_sent),
            down: KernelDirection::new(0, 0),
            fin_poll: FIN_POLL_FIRST,
            fin_due: None,
        };
        // A FIN (or everything) may have come already; no event would say so again.
        Ok(self.watch_kernel(ctx))
    }

    /// The backend being connected failed: mark it, then try the next backend of the pool, or
    /// give up when every backend was tried.
    fn fail_over(&mut self, code: u64, why: &str, ctx: &mut Context) -> Next {
        let Phase::Connecting { tried, .. } = &mut self.phase else {
            return Next::Wait;
        };
        let tried = std::mem::take(tried);
        let failed = &self.pool.spec.backends[self.backend_index];
        if ctx
            .shared
            .backend(failed.slot)
            .record_failure(code, now_ms())
        {
            tracing::warn!(backend = %failed.addr, name = %failed.name, "backend down: {why}");
        }
        balance::release(&self.pool, ctx.shared, ctx.worker, self.backend_index);
        self.reserved = false;
        let client = self.client_addr.ip();
        match next_backend(&self.pool, ctx.shared, ctx.worker, now_ms(), client, &tried) {
            Ok(index) => self.connect(index, tried, ctx),
            Err(Refusal::Full) => Next::Close(Ending::Full),
            Err(Refusal::NoBackend) => {
                tracing::debug!(
                    id = self.id,
                    "no backend of {} reachable",
                    self.pool.spec.listen
                );
                Next::Close(Ending::NoBackend)
            }
        }
    }

    // ---- relaying --------------------------------------------------------------------------

    /// A socket's readability drives the direction it is the source of, its writability the
    /// direction it is the sink of; errors and hang-ups wake both. This saves a read that would
    /// only return EAGAIN on every event.
    fn sides_for(&mut self, side: Side, wake: Wake) -> Sides {
        match (side, wake) {
            (Side::Client, Wake::Error) => {
                self.up.source_closing();
                Sides::BOTH
            }
            (Side::Backend, Wake::Error) => {
                self.down.source_closing();
                Sides::BOTH
            }
            // Room in a sink matters only to a direction holding bytes for it; a writable edge
            // after every ACK would otherwise cost a read that returns EAGAIN.
            (Side::Client, Wake::Io { readable, writable }) => Sides {
                up: readable,
                down: writable && self.down.holds_bytes(),
                until_eagain: false,
            },
            (Side::Backend, Wake::Io { readable, writable }) => Sides {
                up: writable && self.up.holds_bytes(),
                down: readable,
                until_eagain: false,
            },
        }
    }

    fn pump(&mut self, sides: Sides, ctx: &mut Context) -> Next {
        let Phase::Relaying { backend } = &mut self.phase else {
            return Next::Wait;
        };
        let mut up = Progress::default();
        let mut down = Progress::default();
        let mut result = Ok(());
        if sides.up {
            let other = self.down.finished();
            result = self
                .up
                .pump(
                    &mut self.client,
                    backend,
                    ctx.res,
                    sides.until_eagain,
                    other,
                )
                .map(|p| up = p);
        }
        if sides.down && result.is_ok() {
            let other = self.up.finished();
            result = self
                .down
                .pump(
                    backend,
                    &mut self.client,
                    ctx.res,
                    sides.until_eagain,
                    other,
                )
                .map(|p| down = p);
        }
        if self.first_fin.is_none() {
            if self.up.source_done() {
                self.first_fin = Some(Side::Client);
            } else if self.down.source_done() {
                self.first_fin = Some(Side::Backend);
            }
        }
        if self.header_uncounted > 0 {
            // The PROXY header is not the client's traffic.
            let header = up.moved.min(self.header_uncounted);
            up.moved -= header;
            self.header_uncounted -= header;
        }
        let slot = ctx.shared.backend(self.backend_slot());
        if up.moved > 0 {
            slot.bytes_up.fetch_add(up.moved, Relaxed);
            if up.spliced > 0 {
                slot.spliced_up.fetch_add(up.spliced, Relaxed);
            }
        }
        if down.moved > 0 {
            slot.bytes_down.fetch_add(down.moved, Relaxed);
            if down.spliced > 0 {
                slot.spliced_down.fetch_add(down.spliced, Relaxed);
            }
        }
        if let Err(e) = result {
            return Next::Close(Ending::Failed(e));
        }
        if self.up.finished() && self.down.finished() {
            Next::Close(Ending::Finished)
        } else if up.yielded || down.yielded {
            Next::Again(Sides {
                up: up.yielded,
                down: down.yielded,
                until_eagain: true,
            })
        } else {
            Next::Wait
        }
    }

    /// In the kernel: after a hang-up, an error or a FIN timer, looks at both directions,
    /// counts what passed, and passes on FINs whose bytes have left.
    fn watch_kernel(&mut self, ctx: &mut Context) -> Next {
        let fin_waiting = match self.count_kernel(true, ctx) {
            Ok(waiting) => waiting,
            Err(e) => return Next::Close(Ending::Failed(e)),
        };
        if self.first_fin.is_none() {
            let (client, backend) = self.source_done();
            if client {
                self.first_fin = Some(Side::Client);
            } else if backend {
                self.first_fin = Some(Side::Backend);
            }
        }
        let Phase::InKernel {
            up,
            down,
            fin_poll,
            fin_due,
            ..
        } = &mut self.phase
        else {
            return Next::Wait;
        };
        if up.finished() && down.finished() {
            return Next::Close(Ending::Finished);
        }
        match fin_due {
            // A look is already due later: its timer will come.
            Some(due) if *due > ctx.now && fin_waiting => Next::Wait,
            _ if fin_waiting => {
                let due = ctx.now + *fin_poll;
                *fin_poll = (*fin_poll * 2).min(FIN_POLL_MAX);
                *fin_due = Some(due);
                Next::Timer(due)
            }
            _ => {
                *fin_due = None;
                Next::Wait
            }
        }
    }

    /// Steps both kernel directions (passing FINs on unless closing) and adds what they passed
    /// to the backend's counters. Returns whether a FIN waits for bytes still in flight.
    fn count_kernel(&mut self, pass_fin: bool, ctx: &mut Context) -> Result<bool, PumpError> {
        let slot = ctx.shared.backend(self.backend_slot());
        let Phase::InKernel {
            backend, up, down, ..
        } = &mut self.phase
        else {
            return Ok(false);
        };
        let mut waiting = false;
        let up_step = up.step(&self.client, backend, pass_fin);
        if let Ok(p) = &up_step {
            slot.bytes_up.fetch_add(p.moved, Relaxed);
            waiting |= p.fin_waiting;
        }
        let down_step = down.step(backend, &self.client, pass_fin);
        if let Ok(p) = &down_step {
            slot.bytes_down.fetch_add(p.moved, Relaxed);
            waiting |= p.fin_waiting;
        }
        up_step.and(down_step).map(|_| waiting)
    }

    /// The backend slot counting this connection.
    fn backend_slot(&self) -> usize {
        self.pool.spec.backends[self.backend_index].slot
    }

    fn backend_addr(&self) -> SocketAddr {
        self.pool.spec.backends[self.backend_index].addr
    }
}

/// Bytes waiting in the socket's receive queue (`FIONREAD`); None if it cannot be asked.
fn queued_to_read(stream: &TcpStream) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int.
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    (r == 0).then_some(n.max(0) as usize)
}

/// The outcome of a non-blocking connect after an event on the socket: None while it is still in
/// progress. An edge-triggered writable event without a pending error means connected; anything
/// else is checked with getpeername.
fn connect_result(stream: &TcpStream, writable: bool) -> Option<io::Result<()>> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => return Some(Err(e)),
        Ok(None) if writable => return Some(Ok(())),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => Some(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
        Err(e) => Some(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    //! The relay's transitions driven without a worker: real loopback sockets, a mio poll of the
    //! test's own, and a clock the test may move forward.

    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};

    use mio::{Events, Poll};

    use super::*;
    use crate::control::{BackendSpec, PoolSpec};
    use crate::tcp::buffers::{BufferPool, PipePool};

    const WAIT: Duration = Duration::from_secs(10);

    /// A relay, the user's end of its client connection, and what the relay last asked for.
    struct Harness {
        poll: Poll,
        events: Events,
        shared: Shared,
        res: Resources,
        relay: Option<Relay>,
        user: std::net::TcpStream,
        timer: Option<Instant>,
        again: Option<Sides>,
        ending: Option<Ending>,
    }

    impl Harness {
        /// A relay for a fresh client connection to a pool of `backends`, started.
        fn start(backends: &[SocketAddr], splice: bool) -> Harness {
            let front = TcpListener::bind("127.0.0.1:0").unwrap();
            let user = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
            let (accepted, client_addr) = front.accept().unwrap();
            accepted.set_nonblocking(true).unwrap();
            let pool = PoolSpec {
                listen: front.local_addr().unwrap(),
                proto: Default::default(),
                slot: 0,
                options: Default::default(),
                backends: backends
                    .iter()
                    .enumerate()
                    .map(|(i, &addr)| BackendSpec {
                        name: format!("b{i}"),
                        addr,
                        slot: i,
                        options: Default::default(),
                        line: 0,
                    })
                    .collect(),
            };
            let client = TcpStream::from_std(accepted);
            let mut h = Harness {
                poll: Poll::new().unwrap(),
                events: Events::with_capacity(64),
                shared: Shared::create().unwrap(),
                res: Resources {
                    buffers: BufferPool::new(4),
                    pipes: PipePool::new(4),
                    splice,
                    sockmap: None,
                },
                relay: Some(Relay::new(
                    1,
                    0,
                    client,
                    client_addr,
                    Rc::new(ServedPool::new(pool, &[], &[])),
                    Instant::now(),
                )),
                user,
                timer: None,
                again: None,
                ending: None,
            };
            h.step(Instant::now(), |r, ctx| r.start(ctx));
            h
        }

        fn step(&mut self, now: Instant, f: impl FnOnce(&mut Relay, &mut Context) -> Next) {
            let Some(relay) = self.relay.as_mut() else {
                return;
            };
            let mut ctx = Context {
                worker: 0,
                registry: self.poll.registry(),
                shared: &self.shared,
                res: &mut self.res,
                connect_timeout: Duration::from_secs(3),
                now,
                access_log: None,
            };
            match f(relay, &mut ctx) {
                Next::Wait => {}
                Next::Again(sides) => self.again = Some(sides),
                Next::Timer(deadline) => self.timer = Some(deadline),
                Next::Close(ending) => {
                    let relay = self.relay.take().unwrap();
                    relay.close(&ending, &mut ctx);
                    self.ending = Some(ending);
                }
            }
        }

        /// Hands the relay the events of one poll (and a pending fair-share continuation).
        fn turn(&mut self) {
            if let Some(sides) = self.again.take() {
                self.step(Instant::now(), |r, ctx| r.pump_again(sides, ctx));
            }
            self.poll
                .poll(&mut self.events, Some(Duration::from_millis(20)))
                .unwrap();
            let woken: Vec<(Side, Wake)> = self
                .events
                .iter()
                .map(|e| {
                    let side = if e.token().0 % 2 == 1 {
                        Side::Backend
                    } else {
                        Side::Client
                    };
                    (side, Wake::from(e))
                })
                .collect();
            for (side, wake) in woken {
                self.step(Instant::now(), |r, ctx| r.ready(side, wake, ctx));
            }
        }

        /// Turns until `done` holds (false after the deadline).
        fn turn_until(&mut self, mut done: impl FnMut(&mut Harness) -> bool) -> bool {
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if done(self) {
                    return true;
                }
                self.turn();
            }
            done(self)
        }

        fn relaying(&self) -> bool {
            matches!(
                self.relay.as_ref().map(|r| &r.phase),
                Some(Phase::Relaying { .. })
            )
        }
    }

    /// A backend that accepts in the background and hands its one connection over.
    fn backend() -> (SocketAddr, std::sync::mpsc::Receiver<std::net::TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok((s, _)) = listener.accept() {
                let _ = tx.send(s);
            }
        });
        (addr, rx)
    }

    /// A loopback port nothing listens on: connects to it are refused.
    fn refused_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// Reads from a blocking stream while the relay turns, until `n` bytes or EOF.
    fn read_while_turning(h: &mut Harness, from: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
        from.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let done = h.turn_until(|_| loop {
            match from.read(&mut buf) {
                Ok(0) => return true,
                Ok(k) => {
                    got.extend_from_slice(&buf[..k]);
                    if got.len() >= n {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        });
        assert!(done, "read {} of {n} bytes before the deadline", got.len());
        got
    }

    #[test]
    fn refused_connect_falls_over_to_the_next_backend() {
        let (good, accepted) = backend();
        let mut h = Harness::start(&[refused_port(), good], false);
        assert!(h.turn_until(|h| h.relaying()), "never connected");
        assert_eq!(h.relay.as_ref().unwrap().backend_index, 1);
        assert_eq!(h.shared.backend(0).connect_failures.load(Relaxed), 1);
        assert_eq!(h.shared.active(1), 1);
        let mut server = accepted.recv_timeout(WAIT).unwrap();
        h.user.write_all(b"hello").unwrap();
        assert_eq!(read_while_turning(&mut h, &mut server, 5), b"hello");
    }

    #[test]
    fn connect_timeout_tries_the_next_backend_and_then_gives_up() {
        let (good, _accepted) = backend();
        let mut h = Harness::start(&[good, refused_port()], false);
        let first = h.timer.take().expect("a connect arms a timer");
        // The deadline passes before the connect's event is looked at.
        h.step(first, |r, ctx| r.timer_expired(ctx));
        assert_eq!(h.shared.backend(0).connect_failures.load(Relaxed), 1);
        let second = h
            .timer
            .take()
            .expect("the next backend's connect arms a timer");
        assert!(second > first);
        // The first attempt's timer firing again is stale and ignored.
        h.step(first, |r, ctx| r.timer_expired(ctx));
        assert!(h.ending.is_none());
        // The second backend refuses: nothing left to try.
        assert!(h.turn_until(|h| h.ending.is_some()));
        assert!(matches!(h.ending, Some(Ending::NoBackend)));
        assert_eq!(h.shared.pool(0).unrouted.load(Relaxed), 1);
        assert_eq!(h.shared.active(0), 0);
    }

    #[test]
    fn fin_is_passed_on_each_way_while_the_other_direction_flows() {
        let (addr, accepted) = backend();
        let mut h = Harness::start(&[addr], false);
        assert!(h.turn_until(|h| h.relaying()));
        let mut server = accepted.recv_timeout(WAIT).unwrap();
        h.user.write_all(b"request").unwrap();
        h.user.shutdown(Shutdown::Write).unwrap();
        // The backend sees the bytes, then EOF (read_while_turning stops at EOF).
        assert_eq!(
            read_while_turning(&mut h, &mut server, usize::MAX),
            b"request"
        );
        assert!(h.relay.as_ref().unwrap().up.finished());
        server.set_nonblocking(false).unwrap();
        server.write_all(b"late reply").unwrap();
        let mut user = h.user.try_clone().unwrap();
        assert_eq!(read_while_turning(&mut h, &mut user, 10), b"late reply");
        assert!(h.ending.is_none(), "one direction is still open");
        server.shutdown(Shutdown::Write).unwrap();
        assert!(h.turn_until(|h| h.ending.is_some()));
        assert!(matches!(h.ending, Some(Ending::Finished)));
        assert_eq!(h.shared.active(0), 0);
        assert_eq!(h.shared.backend(0).bytes_up.load(Relaxed), 7);
        assert_eq!(h.shared.backend(0).bytes_down.load(Relaxed), 10);
    }

    #[test]
    fn a_reset_from_the_backend_resets_the_client() {
        let (addr, accepted) = backend();
        let mut h = Harness::start(&[addr], false);
        assert!(h.turn_until(|h| h.relaying()));
        let server = accepted.recv_timeout(WAIT).unwrap();
        h.user.write_all(b"x").unwrap();
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        assert!(h.turn_until(|h| h.ending.is_some()));
        assert!(matches!(h.ending, Some(Ending::Failed(_))));
        h.user
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let err = h.user.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn a_full_sink_holds_one_batch_then_drains_exactly() {
        for splice in [false, true] {
            let (addr, accepted) = backend();
            let mut h = Harness::start(&[addr], splice);
            assert!(h.turn_until(|h| h.relaying()));
            let mut server = accepted.recv_timeout(WAIT).unwrap();
            // The user does not read: 16 MiB from the backend fill every buffer on the way.
            let total = 16 << 20;
            let writer = std::thread::spawn(move || {
                let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
                server.write_all(&data).unwrap();
                server
            });
            let full = h.turn_until(|h| {
                h.relay.as_ref().is_some_and(|r| r.down.holds_bytes())
                    && h.shared.backend(0).bytes_down.load(Relaxed) > 0
            });
            assert!(full, "the client's socket never filled (splice {splice})");
            for _ in 0..20 {
                h.turn(); // still full: nothing more is read from the backend
            }
            let held = h.shared.backend(0).bytes_down.load(Relaxed);
            assert!(held < total as u64, "everything moved without a reader");
            let mut user = h.user.try_clone().unwrap();
            let got = read_while_turning(&mut h, &mut user, total);
            assert_eq!(got.len(), total);
            let spliced = h.shared.backend(0).spliced_down.load(Relaxed);
            if splice {
                assert!(
                    spliced > total as u64 / 2,
                    "bulk went through splice: {spliced}"
                );
            } else {
                assert_eq!(spliced, 0, "--no-splice copies");
            }
            assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            drop(writer.join().unwrap());
            assert!(h.turn_until(|h| h.relay.as_ref().is_some_and(|r| !r.down.holds_bytes())));
        }
    }

    #[test]
    fn idle_for_counts_from_the_last_event() {
        let (addr, _accepted) = backend();
        let mut h = Harness::start(&[addr], false);
        assert!(h.turn_until(|h| h.relaying()));
        let relay = h.relay.as_ref().unwrap();
        let last = relay.last_active;
        let limit = Duration::from_secs(30);
        assert!(!relay.idle_for(limit, last + limit - Duration::from_millis(1)));
        assert!(relay.idle_for(limit, last + limit));
    }
}
