//! One forwarded connection's whole life, as a state machine: accepted, reading a PROXY header
//! (`accept_proxy`, [`crate::tcp::proxy`]), connecting to a backend and falling over to the next
//! one on refusal or timeout ([`crate::tcp::connect`]), relaying both directions in user
//! space ([`crate::tcp::relaying`]), or handed to the kernel ([`crate::tcp::kernel`]), closed. This
//! file holds the [`Phase`] dispatch: the worker hands a relay readiness events and timer
//! expiries through [`Relay::ready`] and acts on the [`Next`] it returns; every way a connection
//! ends comes back as [`Next::Close`] and goes through [`Relay::close`], which frees and counts.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry};

use crate::access_log::{AccessLog, Record};
use crate::balance::{self, ServedPool};
use crate::control::ConnectionInfo;
use crate::rate::throttle::Throttle;
use crate::stats::{Shared, ERR_TIMEOUT};
use crate::tcp::connect::connect_result;
use crate::tcp::direction::{Direction, PumpError, Resources};
use crate::tcp::kernel::{socket_counts, KernelDirection};
use crate::tcp::proxy::HeaderError;
use crate::tcp::sockmap::Joined;
use crate::tokens;

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
    /// `sni=`: the name asked for has no row, and the pool has no default row.
    NoSniRoute,
    /// `sni=`: no readable ClientHello within the connect timeout (why: the text).
    BadHello(&'static str),
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
            Ending::NoSniRoute => "no_sni_route",
            Ending::BadHello(_) => "bad_tls_hello",
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
pub(super) enum Phase {
    /// Accepted; no backend chosen yet.
    Accepted,
    /// `accept_proxy`: waiting for the PROXY header that names the client.
    ReadingHeader {
        deadline: Instant,
    },
    /// `sni=`: waiting for the whole ClientHello, to pick the backends serving its name.
    ReadingHello {
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
    pub(super) id: u64,
    /// The slab key, which names both sockets' tokens ([`tokens::client`], [`tokens::backend`]).
    pub(super) key: usize,
    pub(super) client: TcpStream,
    /// The client: the peer, or the one a PROXY header named (`accept_proxy`).
    pub(super) client_addr: SocketAddr,
    /// The address the client reached, when a PROXY header named it (else the socket's own).
    pub(super) header_destination: Option<SocketAddr>,
    /// The pool as it was when the connection arrived (a reload does not move it).
    pub(super) pool: Rc<ServedPool>,
    /// Index into `pool.backends` of the backend in use or being connected.
    pub(super) backend_index: usize,
    /// `backend_index` holds a place in the backend's open count (taken by the balancer).
    pub(super) reserved: bool,
    /// Length of the PROXY header sent ahead of the client's bytes (0 = none).
    pub(super) header_sent_bytes: u64,
    /// Length of the PROXY header read from the client (`accept_proxy`; 0 = none): the kernel
    /// counts it among the client's bytes, the page must not.
    pub(super) header_read_bytes: u64,
    /// Bytes of that header not yet taken off the up count.
    pub(super) header_sent_uncounted: u64,
    /// The client's address is counted against `max_conns_per_ip` (release it at the end).
    pub(super) per_ip_counted: bool,
    /// Which side sent the first FIN (the access log says who ended the connection).
    pub(super) first_fin: Option<Side>,
    /// The TLS server name the client asked for (pools with `sni=` rows only).
    pub(super) sni: Option<String>,
    pub(super) phase: Phase,
    /// client → backend
    pub(super) up: Direction,
    /// backend → client
    pub(super) down: Direction,
    pub(super) started: Instant,
    pub(super) last_active: Instant,
    /// The pool's bandwidth limits as this connection answers to them; None while the pool has
    /// none (taken on at the next pump when an edit adds one).
    pub(super) throttle: Option<Box<Throttle>>,
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
            header_destination: None,
            pool,
            backend_index: 0,
            reserved: false,
            header_sent_bytes: 0,
            header_read_bytes: 0,
            header_sent_uncounted: 0,
            first_fin: None,
            sni: None,
            per_ip_counted: false,
            phase: Phase::Accepted,
            up: Direction::default(),
            down: Direction::default(),
            started: now,
            last_active: now,
            throttle: None,
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
            .register(&mut self.client, tokens::client(self.key), both)
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

    /// Handles a readiness event on one of the relay's sockets.
    pub fn ready(&mut self, side: Side, wake: Wake, ctx: &mut Context) -> Next {
        self.last_active = ctx.now;
        match &self.phase {
            Phase::Accepted => Next::Wait,
            Phase::ReadingHeader { .. } if side == Side::Client => self.read_header(ctx),
            Phase::ReadingHeader { .. } => Next::Wait,
            Phase::ReadingHello { .. } if side == Side::Client => self.read_hello(ctx),
            Phase::ReadingHello { .. } => Next::Wait,
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
            Phase::ReadingHello { deadline } if *deadline <= ctx.now => Next::Close(
                Ending::BadHello("no ClientHello within the connect timeout"),
            ),
            Phase::InKernel {
                fin_due: Some(due), ..
            } if *due <= ctx.now => self.watch_kernel(ctx),
            Phase::Relaying { .. } if self.throttle.is_some() => self.throttle_expired(ctx),
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
            Phase::Accepted | Phase::ReadingHeader { .. } | Phase::ReadingHello { .. } => None,
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
            Ending::NoSniRoute => {
                pool.no_sni_route.fetch_add(1, Relaxed);
            }
            Ending::BadHello(why) => {
                tracing::debug!(id = self.id, client = %self.client_addr, "closed: {why}");
                pool.bad_hello.fetch_add(1, Relaxed);
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
            Ending::Denied
                | Ending::Full
                | Ending::PerIpFull
                | Ending::BadHeader(_)
                | Ending::NoSniRoute
                | Ending::BadHello(_)
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
            throttled: self
                .throttle
                .as_ref()
                .map(|t| (t.held_ms(crate::rate::now_ns()), t.held_bytes)),
            sni: self.sni.as_deref(),
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
                Phase::Accepted
                | Phase::ReadingHeader { .. }
                | Phase::ReadingHello { .. }
                | Phase::Connecting { .. } => "connecting".into(),
                Phase::Relaying { .. } | Phase::InKernel { .. } => "relaying".into(),
            },
            bytes_up: self.bytes().0,
            bytes_down: self.bytes().1,
            age_ms: now.duration_since(self.started).as_millis() as u64,
            client_half_closed: self.source_done().0,
            backend_half_closed: self.source_done().1,
            udp: None,
            sni: self.sni.clone(),
        }
    }

    /// Bytes passed up and down: what the directions delivered (less the PROXY header we
    /// sent), or in the kernel, what the sockets counted when last looked at.
    pub(super) fn bytes(&self) -> (u64, u64) {
        match &self.phase {
            Phase::InKernel { up, down, .. } => (up.bytes(), down.bytes()),
            _ => (
                self.up.bytes() - (self.header_sent_bytes - self.header_sent_uncounted),
                self.down.bytes(),
            ),
        }
    }

    /// Whether the client and the backend sent their FIN.
    pub(super) fn source_done(&self) -> (bool, bool) {
        match &self.phase {
            Phase::InKernel { up, down, .. } => (up.source_done(), down.source_done()),
            _ => (self.up.source_done(), self.down.source_done()),
        }
    }

    /// The backend slot counting this connection.
    pub(super) fn backend_slot(&self) -> usize {
        self.pool.spec.backends[self.backend_index].slot
    }

    pub(super) fn backend_addr(&self) -> SocketAddr {
        self.pool.spec.backends[self.backend_index].addr
    }
}

#[cfg(test)]
mod tests;
