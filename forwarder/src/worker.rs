//! A worker process: one mio (epoll, edge-triggered) event loop that owns an `SO_REUSEPORT`
//! listener per TCP pool and a slab of relays addressed by token, and its UDP side ([`Udp`]:
//! a socket per UDP pool and the sessions). It takes orders from the supervisor
//! over its control socket and counts into the shared stats mapping.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::access_log::{self, AccessLog};
use crate::balance::ServedPool;
use crate::control::{
    self, ConnectionInfo, FrameReader, Numbered, PoolSpec, Reply, Request, ID_WORKER_SHIFT,
};
use crate::rules::Proto;
use crate::stats::Shared;
use crate::tcp::buffers::{BufferPool, PipePool};
use crate::tcp::direction::Resources;
use crate::tcp::relay::{self, Ending, Next, Relay, Side, Sides, Wake};
use crate::tcp::sockmap::{DataPath, Sockmap};
use crate::udp::{Udp, UdpConfig};

const CONTROL: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// Listener tokens start here; relay tokens (2 per relay) stay below, UDP tokens above
/// ([`Udp::owns`]).
const LISTENER_BASE: usize = 1 << 40;
/// How long accepting pauses after the process ran out of descriptors.
const EMFILE_PAUSE: Duration = Duration::from_millis(100);
/// A refused address is logged at most once per this long (per worker).
const DENIED_LOG_EVERY: Duration = Duration::from_secs(60);
/// Addresses remembered for that; the memory is forgotten whole when it fills (a scan from many
/// addresses then logs some of them again, never grows without bound).
const DENIED_LOG_LIMIT: usize = 4096;

/// Settings a worker gets from the supervisor's command line.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub index: usize,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub splice: bool,
    pub max_pipes: usize,
    /// `--data-path`: sockmap hands established connections to the kernel.
    pub data_path: DataPath,
    /// `--allow`: clients every pool without its own `allow` list admits (empty = all).
    pub default_allow: Vec<ipnet::IpNet>,
    /// `--deny`: clients every pool refuses, on top of its own `deny` list.
    pub default_deny: Vec<ipnet::IpNet>,
    /// `--access-log` and its format.
    pub access_log: Option<(access_log::Target, access_log::Format)>,
    /// UDP sessions idle this long end.
    pub udp_idle_timeout: Duration,
    /// UDP sessions this worker holds before evicting the least recently active.
    pub udp_max_sessions: usize,
}

struct Listener {
    socket: TcpListener,
    pool: Rc<ServedPool>,
    /// A range steered here by nftables: each connection's pool is the one of the port it
    /// reached (`SO_ORIGINAL_DST`).
    steered: Option<Rc<crate::ranges::SteeredPorts>>,
}

pub struct Worker {
    config: WorkerConfig,
    poll: Poll,
    shared: Shared,
    control: UnixStream,
    control_in: FrameReader,
    control_out: Vec<u8>,
    listeners: Slab<Listener>,
    by_addr: HashMap<SocketAddr, usize>,
    relays: Slab<Relay>,
    udp: Udp,
    res: Resources,
    /// Connect deadlines: (deadline, relay key). Never cancelled: a relay ignores a timer that
    /// is not its current one.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Relays that yielded their fair share and must be pumped again without an event.
    again: VecDeque<(usize, Sides)>,
    next_id: u64,
    accept_paused_until: Option<Instant>,
    access_log: Option<AccessLog>,
    /// When each refused client address was last logged.
    denied_logged: HashMap<std::net::IpAddr, Instant>,
    /// Accepting stopped because this worker holds its share of the capacity.
    at_capacity: bool,
    draining_since: Option<Instant>,
}

/// Runs a worker until it is told to stop and has drained. `stats_fd` and `control_fd` are the
/// descriptors inherited from the supervisor.
pub fn run(config: WorkerConfig, stats_fd: i32, control_fd: i32) -> anyhow::Result<()> {
    // SAFETY: the supervisor passed these descriptors to this process for exactly this use.
    let shared = unsafe { Shared::from_inherited(stats_fd) }.context("mapping shared stats")?;
    let control_std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(control_fd) };
    control_std.set_nonblocking(true)?;
    let mut control = UnixStream::from_std(control_std);
    let poll = Poll::new().context("creating epoll instance")?;
    poll.registry().register(
        &mut control,
        CONTROL,
        Interest::READABLE | Interest::WRITABLE,
    )?;
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    // SIGUSR1 (forwarded by the supervisor) asks the access log to reopen its file; registered
    // whether or not there is one, so the signal never ends a worker.
    let reopen = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&reopen))?;
    let access_log = match &config.access_log {
        Some((target, format)) => {
            // SAFETY: dup gives the writer thread its own descriptor of the same mapping.
            let view = unsafe { Shared::from_inherited(libc::dup(shared.raw_fd())) }
                .context("mapping shared stats for the access log")?;
            Some(
                AccessLog::start(target.clone(), *format, view, reopen)
                    .context("opening the access log")?,
            )
        }
        None => None,
    };
    let res = Resources {
        buffers: BufferPool::new(256),
        pipes: PipePool::new(config.max_pipes),
        splice: config.splice,
        sockmap: load_sockmap(&config),
    };
    let udp = Udp::new(UdpConfig {
        worker: config.index,
        idle_timeout: config.udp_idle_timeout,
        max_sessions: config.udp_max_sessions,
    });
    let mut worker = Worker {
        config,
        poll,
        shared,
        control,
        control_in: FrameReader::default(),
        control_out: Vec::new(),
        listeners: Slab::new(),
        by_addr: HashMap::new(),
        relays: Slab::with_capacity(1024),
        udp,
        res,
        timers: BinaryHeap::new(),
        again: VecDeque::new(),
        next_id: 0,
        accept_paused_until: None,
        denied_logged: HashMap::new(),
        access_log,
        at_capacity: false,
        draining_since: None,
    };
    worker.event_loop(&mut signals)
}

impl Worker {
    fn event_loop(&mut self, signals: &mut Signals) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("epoll_wait");
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    CONTROL => self.control_ready()?,
                    SIGNALS => {
                        if signals.pending().next().is_some() {
                            self.start_drain();
                        }
                    }
                    token if Udp::owns(token) => {
                        self.udp
                            .ready(token, &self.shared, self.poll.registry(), now)
                    }
                    Token(t) if t >= LISTENER_BASE => self.accept_ready(t - LISTENER_BASE, now),
                    Token(t) => {
                        let side = if t % 2 == 1 {
                            Side::Backend
                        } else {
                            Side::Client
                        };
                        let wake = Wake::from(event);
                        self.drive(t / 2, now, |relay, ctx| relay.ready(side, wake, ctx));
                    }
                }
            }
            self.run_again(now);
            self.udp.run_again(&self.shared, self.poll.registry(), now);
            self.udp.expire(&self.shared, now);
            self.expire_timers(now);
            self.resume_accepting(now);
            if now.duration_since(last_sweep) >= Duration::from_secs(1) {
                last_sweep = now;
                self.refresh_kernel_counts(now);
                self.sweep_idle(now);
            }
            if let Some(since) = self.draining_since {
                let done = self.relays.is_empty() && self.udp.drained(now);
                if done || now.duration_since(since) >= self.config.drain_timeout {
                    tracing::info!(
                        worker = self.config.index,
                        left = self.relays.len(),
                        udp_sessions = self.udp.sessions(),
                        "worker drained, exiting"
                    );
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() || self.udp.has_again() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        if let Some(Reverse((deadline, _))) = self.timers.peek() {
            next = next.min(*deadline);
        }
        if let Some(until) = self.accept_paused_until {
            next = next.min(until);
        }
        Some(next.saturating_duration_since(now))
    }

    // ---- accepting -------------------------------------------------------------------------

    fn accepting(&self) -> bool {
        self.draining_since.is_none() && self.accept_paused_until.is_none() && !self.at_capacity
    }

    fn accept_ready(&mut self, key: usize, now: Instant) {
        while self.accepting() {
            let Some(listener) = self.listeners.get(key) else {
                return;
            };
            let pool = Rc::clone(&listener.pool);
            let steered = listener.steered.clone();
            match listener.socket.accept() {
                Ok((client, addr)) => {
                    let pool = match steered {
                        Some(ports) => match reached_pool(&ports, &client) {
                            Some(pool) => pool,
                            None => continue, // dropped: closes it
                        },
                        None => pool,
                    };
                    self.start_relay(client, addr, pool, now)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_out_of_descriptors(&e) => {
                    self.pause_accepting(now, &e);
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection only.
                    tracing::debug!("accept on {}: {e}", pool.spec.listen);
                }
            }
        }
    }

    /// Stops accepting for a moment when descriptors run out, instead of spinning on a listener
    /// that stays readable. Logged once per episode.
    fn pause_accepting(&mut self, now: Instant, e: &io::Error) {
        if self.accept_paused_until.is_none() {
            tracing::warn!(
                worker = self.config.index,
                open = self.relays.len(),
                "out of file descriptors ({e}); pausing accept for {} ms",
                EMFILE_PAUSE.as_millis()
            );
            self.shared.header().accept_pauses.fetch_add(1, Relaxed);
        }
        self.accept_paused_until = Some(now + EMFILE_PAUSE);
    }

    /// Edge-triggered listeners do not report connections that queued while we were not
    /// accepting, so after a pause every listener is drained again.
    fn resume_accepting(&mut self, now: Instant) {
        let was_paused = matches!(self.accept_paused_until, Some(until) if now >= until);
        if was_paused {
            self.accept_paused_until = None;
        }
        let was_full = self.at_capacity && self.relays.len() < self.config.max_connections;
        if was_full {
            self.at_capacity = false;
        }
        if (was_paused || was_full) && self.accepting() {
            let keys: Vec<usize> = self.listeners.iter().map(|(k, _)| k).collect();
            for key in keys {
                self.accept_ready(key, now);
            }
        }
    }

    fn start_relay(
        &mut self,
        client: TcpStream,
        client_addr: SocketAddr,
        pool: Rc<ServedPool>,
        now: Instant,
    ) {
        self.next_id += 1;
        let id = ((self.config.index as u64) << ID_WORKER_SHIFT) | self.next_id;
        let entry = self.relays.vacant_entry();
        let key = entry.key();
        entry.insert(Relay::new(id, key, client, client_addr, pool, now));
        if self.relays.len() >= self.config.max_connections {
            self.at_capacity = true;
        }
        self.drive(key, now, |relay, ctx| relay.start(ctx));
    }

    // ---- relaying --------------------------------------------------------------------------

    /// Runs one step of relay `key` (gone already: nothing to do) and acts on what it returns.
    fn drive(
        &mut self,
        key: usize,
        now: Instant,
        step: impl FnOnce(&mut Relay, &mut relay::Context) -> Next,
    ) {
        let Some(relay) = self.relays.get_mut(key) else {
            return; // a stale event or timer for a relay closed earlier
        };
        let mut ctx = relay_context(
            &self.poll,
            &self.shared,
            &mut self.res,
            &self.config,
            self.access_log.as_ref(),
            now,
        );
        match step(relay, &mut ctx) {
            Next::Wait => {}
            Next::Again(sides) => self.again.push_back((key, sides)),
            Next::Timer(deadline) => self.timers.push(Reverse((deadline, key))),
            Next::Close(ending) => self.close(key, ending, now),
        }
    }

    fn run_again(&mut self, now: Instant) {
        for _ in 0..self.again.len() {
            if let Some((key, sides)) = self.again.pop_front() {
                self.drive(key, now, |relay, ctx| relay.pump_again(sides, ctx));
            }
        }
    }

    fn expire_timers(&mut self, now: Instant) {
        while let Some(Reverse((deadline, key))) = self.timers.peek().copied() {
            if deadline > now {
                return;
            }
            self.timers.pop();
            self.drive(key, now, |relay, ctx| relay.timer_expired(ctx));
        }
    }

    /// Connections whose bytes the kernel moves report none: read their counts once a second.
    fn refresh_kernel_counts(&mut self, now: Instant) {
        if self.res.sockmap.is_none() {
            return;
        }
        let keys: Vec<usize> = self.relays.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.drive(key, now, |relay, ctx| relay.refresh(ctx));
        }
    }

    fn sweep_idle(&mut self, now: Instant) {
        let Some(limit) = self.config.idle_timeout else {
            return;
        };
        let idle: Vec<usize> = self
            .relays
            .iter()
            .filter(|(_, r)| r.idle_for(limit, now))
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.close(key, Ending::Idle, now);
        }
    }

    /// Ends relay `key` through [`Relay::close`]. No epoll deregistration: closing a socket's
    /// only descriptor removes it from the epoll set, and an event of this batch that still names
    /// the token finds either nothing or a new relay, which copes with a spurious wake.
    fn close(&mut self, key: usize, ending: Ending, now: Instant) {
        let Some(relay) = self.relays.try_remove(key) else {
            return;
        };
        match &ending {
            Ending::NoSocket(e) if is_out_of_descriptors(e) => self.pause_accepting(now, e),
            Ending::Denied => self.log_denied(relay.client_addr(), now),
            _ => {}
        }
        let mut ctx = relay_context(
            &self.poll,
            &self.shared,
            &mut self.res,
            &self.config,
            self.access_log.as_ref(),
            now,
        );
        relay.close(&ending, &mut ctx);
    }

    /// Logs a refused client, once per address per [`DENIED_LOG_EVERY`].
    fn log_denied(&mut self, client: SocketAddr, now: Instant) {
        let ip = client.ip();
        if let Some(last) = self.denied_logged.get(&ip) {
            if now.duration_since(*last) < DENIED_LOG_EVERY {
                return;
            }
        }
        if self.denied_logged.len() >= DENIED_LOG_LIMIT {
            self.denied_logged.clear();
        }
        self.denied_logged.insert(ip, now);
        tracing::info!(worker = self.config.index, client = %ip, "refused by the access list");
    }

    // ---- control ---------------------------------------------------------------------------

    fn control_ready(&mut self) -> anyhow::Result<()> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.control.read(&mut buf) {
                Ok(0) => {
                    // The supervisor is gone: finish what we carry, take nothing new.
                    if self.draining_since.is_none() {
                        tracing::warn!(worker = self.config.index, "supervisor gone; draining");
                        self.start_drain();
                    }
                    break;
                }
                Ok(n) => self.control_in.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading control socket"),
            }
        }
        while let Some(frame) = self.control_in.next_frame::<Numbered<Request>>() {
            let reply = match frame {
                Ok((seq, request)) => (seq, self.handle(request)),
                Err(e) => {
                    tracing::error!("bad control message: {e}");
                    continue;
                }
            };
            control::encode(&reply, &mut self.control_out)?;
        }
        while !self.control_out.is_empty() {
            match self.control.write(&self.control_out) {
                Ok(n) => {
                    self.control_out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("writing control socket"),
            }
        }
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Reply {
        match request {
            Request::Apply { pools } => Reply::Applied {
                errors: self.apply(pools),
            },
            Request::ListConnections => Reply::Connections {
                list: self.connections(),
            },
            Request::Close { id } => {
                let key = self
                    .relays
                    .iter()
                    .find(|(_, r)| r.id() == id)
                    .map(|(k, _)| k);
                if let Some(key) = key {
                    self.close(key, Ending::Closed, Instant::now());
                }
                let found = key.is_some() || self.udp.close(id, &self.shared);
                Reply::Closed { found }
            }
        }
    }

    /// Makes the listeners match `pools`: new addresses listen, removed ones close, changed
    /// pools serve new connections. Established relays keep their own pool and backend.
    fn apply(&mut self, pools: Vec<PoolSpec>) -> Vec<String> {
        let mut errors = Vec::new();
        let (tcp, udp): (Vec<PoolSpec>, Vec<PoolSpec>) = pools
            .into_iter()
            .flat_map(crate::ranges::port_specs)
            .partition(|p| p.proto == Proto::Tcp);
        let udp = udp
            .into_iter()
            .map(|spec| {
                ServedPool::new(spec, &self.config.default_allow, &self.config.default_deny)
            })
            .collect();
        errors.extend(self.udp.apply(udp, &self.shared, self.poll.registry()));
        let wanted: HashMap<SocketAddr, PoolSpec> =
            tcp.into_iter().map(|p| (p.listen, p)).collect();
        let gone: Vec<SocketAddr> = self
            .by_addr
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(key) = self.by_addr.remove(&addr) {
                let mut l = self.listeners.remove(key);
                let _ = self.poll.registry().deregister(&mut l.socket);
                tracing::debug!(worker = self.config.index, %addr, "stopped listening");
            }
        }
        for (addr, spec) in wanted {
            let steered = spec.steered.then(|| {
                Rc::new(crate::ranges::SteeredPorts::new(
                    spec.clone(),
                    &self.config.default_allow,
                    &self.config.default_deny,
                ))
            });
            let pool = Rc::new(ServedPool::new(
                spec,
                &self.config.default_allow,
                &self.config.default_deny,
            ));
            if let Some(&key) = self.by_addr.get(&addr) {
                self.listeners[key].pool = pool;
                self.listeners[key].steered = steered;
                continue;
            }
            if self.draining_since.is_some() {
                continue;
            }
            match testbed::listener::reuseport_listener(addr) {
                Ok(std_listener) => {
                    // Accepted sockets inherit both options from the listener (Linux clones the
                    // listening socket), which saves two system calls per connection.
                    let opts = socket2::SockRef::from(&std_listener);
                    let _ = opts.set_tcp_nodelay(true);
                    let _ = opts.set_keepalive(true);
                    let mut socket = TcpListener::from_std(std_listener);
                    let entry = self.listeners.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut socket,
                        Token(LISTENER_BASE + key),
                        Interest::READABLE,
                    ) {
                        errors.push(format!("{addr}: {e}"));
                        continue;
                    }
                    entry.insert(Listener {
                        socket,
                        pool,
                        steered,
                    });
                    self.by_addr.insert(addr, key);
                    self.accept_ready(key, Instant::now());
                }
                Err(e) => errors.push(format!("{addr}: cannot listen: {e}")),
            }
        }
        errors
    }

    fn connections(&self) -> Vec<ConnectionInfo> {
        let now = Instant::now();
        let mut list: Vec<ConnectionInfo> = self
            .relays
            .iter()
            .map(|(_, r)| r.info(self.config.index, now))
            .collect();
        list.extend(self.udp.connections(now));
        list
    }

    /// Stops accepting (listeners closed, so the kernel sends new connections to other workers or
    /// refuses them) and lets established connections finish.
    fn start_drain(&mut self) {
        if self.draining_since.is_some() {
            return;
        }
        tracing::info!(
            worker = self.config.index,
            connections = self.relays.len(),
            udp_sessions = self.udp.sessions(),
            "draining"
        );
        let now = Instant::now();
        self.draining_since = Some(now);
        self.udp.start_drain(self.poll.registry(), now);
        for (_, mut l) in std::mem::take(&mut self.listeners) {
            let _ = self.poll.registry().deregister(&mut l.socket);
        }
        self.by_addr.clear();
    }
}

/// What a relay borrows from its worker for one step (split borrows: the relay itself is borrowed
/// from the worker's slab at the same time).
fn relay_context<'a>(
    poll: &'a Poll,
    shared: &'a Shared,
    res: &'a mut Resources,
    config: &WorkerConfig,
    access_log: Option<&'a AccessLog>,
    now: Instant,
) -> relay::Context<'a> {
    relay::Context {
        worker: config.index,
        registry: poll.registry(),
        shared,
        res,
        connect_timeout: config.connect_timeout,
        now,
        access_log,
    }
}

/// The worker's own verdict map for `--data-path sockmap` (two sockets per connection). The
/// supervisor checked that it loads; should it fail here anyway, connections are spliced.
fn load_sockmap(config: &WorkerConfig) -> Option<Sockmap> {
    if config.data_path != DataPath::Sockmap {
        return None;
    }
    match Sockmap::load(config.max_connections.saturating_mul(2)) {
        Ok(map) => Some(map),
        Err(e) => {
            tracing::warn!(
                worker = config.index,
                "sockmap data path unavailable ({e}); splicing"
            );
            None
        }
    }
}

/// The pool of the port a steered connection reached; `None` (and the connection dropped) when
/// conntrack does not know it or it is outside the range.
fn reached_pool(ports: &crate::ranges::SteeredPorts, client: &TcpStream) -> Option<Rc<ServedPool>> {
    use std::os::fd::AsRawFd;
    let v6 = client.local_addr().is_ok_and(|a| a.is_ipv6());
    match crate::steer::original_dst(client.as_raw_fd(), v6) {
        Ok(reached) => ports.pool_for(reached.port()),
        Err(e) => {
            tracing::debug!("steered connection without an original destination: {e}");
            None
        }
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}
