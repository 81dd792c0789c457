//! The TCP half of a worker ([`Tcp`]): its `SO_REUSEPORT` listeners, the slab of relays, the
//! connect and FIN timers, the relays to pump again, and the accept pause. One connection's life
//! is [`relay`] (the phases: [`proxy`] for the PROXY header, [`connect`], [`relaying`] in user
//! space, [`kernel`] when the sockmap data path moves the bytes); [`direction`] moves the bytes
//! one way in user space with [`buffers`]; [`sockmap`] and [`bpf`] are the kernel data path;
//! [`data_path`] is `--data-path` and the start-up choice ([`calibrate`] for `auto`).

pub mod bpf;
pub mod buffers;
pub mod calibrate;
pub mod connect;
pub mod data_path;
pub mod direction;
pub mod kernel;
pub mod proxy;
pub mod relay;
pub mod relaying;
pub mod sni;
pub mod sockmap;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use slab::Slab;

use crate::access_log::AccessLog;
use crate::balance::ServedPool;
use crate::control::{ConnectionInfo, ID_WORKER_SHIFT};
use crate::listeners::Listeners;
use crate::stats::Shared;
use crate::tokens::{self, Owner};
use buffers::{BufferPool, PipePool};
use direction::Resources;
use relay::{Context, Ending, Next, Relay, Side, Sides, Wake};
use sockmap::{DataPath, Sockmap};

/// How long accepting pauses after the process ran out of descriptors.
const EMFILE_PAUSE: Duration = Duration::from_millis(100);
/// A refused address is logged at most once per this long (per worker).
const DENIED_LOG_EVERY: Duration = Duration::from_secs(60);
/// Addresses remembered for that; the memory is forgotten whole when it fills (a scan from many
/// addresses then logs some of them again, never grows without bound).
const DENIED_LOG_LIMIT: usize = 4096;
/// Buffers kept for reuse between connections.
const BUFFERS_KEPT: usize = 256;
/// Bulk copy buffers in use at once per worker (256 KiB each, so at most 16 MiB); beyond that
/// a bulk direction copies through the small buffers.
const BULK_BUFFERS: usize = 64;

/// The settings of a worker's TCP side.
pub struct TcpConfig {
    pub worker: usize,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub splice: bool,
    pub max_pipes: usize,
    pub data_path: DataPath,
}

/// What every relay borrows for one step, apart from the worker's shared mapping and registry.
struct Env {
    worker: usize,
    connect_timeout: Duration,
    res: Resources,
    access_log: Option<AccessLog>,
}

impl Env {
    /// The one place a relay's [`Context`] is made.
    fn context<'a>(
        &'a mut self,
        shared: &'a Shared,
        registry: &'a Registry,
        now: Instant,
    ) -> Context<'a> {
        Context {
            worker: self.worker,
            registry,
            shared,
            res: &mut self.res,
            connect_timeout: self.connect_timeout,
            now,
            access_log: self.access_log.as_ref(),
        }
    }
}

/// The TCP half of a worker.
pub struct Tcp {
    max_connections: usize,
    idle_timeout: Option<Duration>,
    env: Env,
    listeners: Listeners<TcpListener>,
    relays: Slab<Relay>,
    /// Connect and FIN deadlines: (deadline, relay key). Never cancelled: a relay ignores a timer
    /// that is not its current one.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Relays that yielded their fair share and must be pumped again without an event.
    again: VecDeque<(usize, Sides)>,
    next_id: u64,
    accept_paused_until: Option<Instant>,
    /// When each refused client address was last logged.
    denied_logged: HashMap<IpAddr, Instant>,
    /// Accepting stopped because this worker holds its share of the capacity.
    at_capacity: bool,
    draining: bool,
}

impl Tcp {
    pub fn new(config: TcpConfig, access_log: Option<AccessLog>) -> Tcp {
        let sockmap = load_sockmap(&config);
        Tcp {
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout,
            env: Env {
                worker: config.worker,
                connect_timeout: config.connect_timeout,
                res: Resources {
                    buffers: BufferPool::new(BUFFERS_KEPT, BULK_BUFFERS),
                    pipes: PipePool::new(config.max_pipes),
                    splice: config.splice,
                    sockmap,
                },
                access_log,
            },
            listeners: Listeners::default(),
            relays: Slab::with_capacity(1024),
            timers: BinaryHeap::new(),
            again: VecDeque::new(),
            next_id: 0,
            accept_paused_until: None,
            denied_logged: HashMap::new(),
            at_capacity: false,
            draining: false,
        }
    }

    /// Open relays.
    pub fn relays(&self) -> usize {
        self.relays.len()
    }

    /// Work to do without waiting for an event.
    pub fn has_again(&self) -> bool {
        !self.again.is_empty()
    }

    /// The earliest of the next timer and the end of an accept pause.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((deadline, _))| *deadline);
        match (timer, self.accept_paused_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Handles readiness of a listener or a relay socket (`owner` as [`tokens::decode`] read it).
    pub fn ready(
        &mut self,
        owner: Owner,
        event: &mio::event::Event,
        shared: &Shared,
        registry: &Registry,
        now: Instant,
    ) {
        let (key, side) = match owner {
            Owner::Listener(key) => return self.accept_ready(key, shared, registry, now),
            Owner::Client(key) => (key, Side::Client),
            Owner::Backend(key) => (key, Side::Backend),
            _ => return,
        };
        let wake = Wake::from(event);
        self.drive(key, shared, registry, now, |relay, ctx| {
            relay.ready(side, wake, ctx)
        });
    }

    /// After the events of one poll: pumps the relays that yielded, fires due timers, and
    /// resumes accepting after a pause.
    pub fn run_again(&mut self, shared: &Shared, registry: &Registry, now: Instant) {
        for _ in 0..self.again.len() {
            if let Some((key, sides)) = self.again.pop_front() {
                self.drive(key, shared, registry, now, |relay, ctx| {
                    relay.pump_again(sides, ctx)
                });
            }
        }
    }

    /// Fires the timers that are due and resumes accepting when a pause ended.
    pub fn expire(&mut self, shared: &Shared, registry: &Registry, now: Instant) {
        while let Some(Reverse((deadline, key))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            self.drive(key, shared, registry, now, |relay, ctx| {
                relay.timer_expired(ctx)
            });
        }
        self.resume_accepting(shared, registry, now);
    }

    /// Once a second: counts of connections the kernel moves, and the idle timeout.
    pub fn sweep(&mut self, shared: &Shared, registry: &Registry, now: Instant) {
        if self.env.res.sockmap.is_some() {
            // Connections whose bytes the kernel moves report none: read their counts.
            for key in self.relays.iter().map(|(k, _)| k).collect::<Vec<_>>() {
                self.drive(key, shared, registry, now, |relay, ctx| relay.refresh(ctx));
            }
        }
        let Some(limit) = self.idle_timeout else {
            return;
        };
        let idle: Vec<usize> = self
            .relays
            .iter()
            .filter(|(_, r)| r.idle_for(limit, now))
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.drive(key, shared, registry, now, |_, _| Next::Close(Ending::Idle));
        }
    }

    /// Closes the connection with this id (the web page's close button); false if it is not here.
    pub fn close(&mut self, id: u64, shared: &Shared, registry: &Registry) -> bool {
        let key = self
            .relays
            .iter()
            .find(|(_, r)| r.id() == id)
            .map(|(k, _)| k);
        if let Some(key) = key {
            let now = Instant::now();
            self.drive(key, shared, registry, now, |_, _| {
                Next::Close(Ending::Closed)
            });
        }
        key.is_some()
    }

    pub fn connections(&self, now: Instant) -> Vec<ConnectionInfo> {
        self.relays
            .iter()
            .map(|(_, r)| r.info(self.env.worker, now))
            .collect()
    }

    /// Makes the listeners match `pools` (TCP pools only): new addresses listen, removed ones
    /// close, changed pools serve new connections. Established relays keep their own pool and
    /// backend. Returns the addresses that could not be listened on.
    pub fn apply(
        &mut self,
        pools: Vec<ServedPool>,
        shared: &Shared,
        registry: &Registry,
    ) -> Vec<String> {
        let open = |addr: SocketAddr, key: usize| {
            let std_listener = testbed::listener::reuseport_listener(addr)
                .map_err(|e| format!("{addr}: cannot listen: {e}"))?;
            // Accepted sockets inherit both options from the listener (Linux clones the
            // listening socket), which saves two system calls per connection.
            let opts = socket2::SockRef::from(&std_listener);
            let _ = opts.set_tcp_nodelay(true);
            let _ = opts.set_keepalive(true);
            let mut socket = TcpListener::from_std(std_listener);
            registry
                .register(&mut socket, tokens::listener(key), Interest::READABLE)
                .map_err(|e| format!("{addr}: {e}"))?;
            Ok(socket)
        };
        let worker = self.env.worker;
        let (opened, errors) =
            self.listeners
                .reconcile(pools, !self.draining, open, |_, mut listener| {
                    let _ = registry.deregister(&mut listener.socket);
                    let addr = listener.pool.spec.listen;
                    tracing::debug!(worker, %addr, "stopped listening");
                });
        for key in opened {
            self.accept_ready(key, shared, registry, Instant::now());
        }
        errors
    }

    /// Stops accepting: the listeners close, so the kernel sends new connections to other
    /// workers or refuses them; established connections finish.
    pub fn start_drain(&mut self, registry: &Registry) {
        self.draining = true;
        for mut l in self.listeners.take_all() {
            let _ = registry.deregister(&mut l.socket);
        }
    }

    // ---- accepting -------------------------------------------------------------------------

    fn accepting(&self) -> bool {
        !self.draining && self.accept_paused_until.is_none() && !self.at_capacity
    }

    fn accept_ready(&mut self, key: usize, shared: &Shared, registry: &Registry, now: Instant) {
        while self.accepting() {
            let Some(listener) = self.listeners.get(key) else {
                return;
            };
            let pool = Rc::clone(&listener.pool);
            match listener.socket.accept() {
                Ok((client, addr)) => {
                    // A range steered here by nftables: the pool of the port the client reached.
                    let pool = match &pool.steered {
                        Some(ports) => match crate::ranges::reached_pool(ports, &client) {
                            Some(reached) => reached,
                            None => continue, // dropped: closes it
                        },
                        None => pool,
                    };
                    self.start_relay(client, addr, pool, shared, registry, now)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_out_of_descriptors(&e) => {
                    self.pause_accepting(now, &e, shared);
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
    fn pause_accepting(&mut self, now: Instant, e: &io::Error, shared: &Shared) {
        if self.accept_paused_until.is_none() {
            tracing::warn!(
                worker = self.env.worker,
                open = self.relays.len(),
                "out of file descriptors ({e}); pausing accept for {} ms",
                EMFILE_PAUSE.as_millis()
            );
            shared.header().accept_pauses.fetch_add(1, Relaxed);
        }
        self.accept_paused_until = Some(now + EMFILE_PAUSE);
    }

    /// Edge-triggered listeners do not report connections that queued while we were not
    /// accepting, so after a pause every listener is drained again.
    fn resume_accepting(&mut self, shared: &Shared, registry: &Registry, now: Instant) {
        let was_paused = matches!(self.accept_paused_until, Some(until) if now >= until);
        if was_paused {
            self.accept_paused_until = None;
        }
        let was_full = self.at_capacity && self.relays.len() < self.max_connections;
        if was_full {
            self.at_capacity = false;
        }
        if (was_paused || was_full) && self.accepting() {
            for key in self.listeners.keys() {
                self.accept_ready(key, shared, registry, now);
            }
        }
    }

    fn start_relay(
        &mut self,
        client: TcpStream,
        client_addr: SocketAddr,
        pool: Rc<ServedPool>,
        shared: &Shared,
        registry: &Registry,
        now: Instant,
    ) {
        self.next_id += 1;
        let id = ((self.env.worker as u64) << ID_WORKER_SHIFT) | self.next_id;
        let entry = self.relays.vacant_entry();
        let key = entry.key();
        entry.insert(Relay::new(id, key, client, client_addr, pool, now));
        if self.relays.len() >= self.max_connections {
            self.at_capacity = true;
        }
        self.drive(key, shared, registry, now, |relay, ctx| relay.start(ctx));
    }

    // ---- relaying --------------------------------------------------------------------------

    /// Runs one step of relay `key` (gone already: nothing to do) and acts on what it returns;
    /// [`Next::Close`] ends it through [`Relay::close`], the one way out.
    fn drive(
        &mut self,
        key: usize,
        shared: &Shared,
        registry: &Registry,
        now: Instant,
        step: impl FnOnce(&mut Relay, &mut Context) -> Next,
    ) {
        let Some(relay) = self.relays.get_mut(key) else {
            return; // a stale event or timer for a relay closed earlier
        };
        let mut ctx = self.env.context(shared, registry, now);
        let ending = match step(relay, &mut ctx) {
            Next::Wait => return,
            Next::Again(sides) => return self.again.push_back((key, sides)),
            Next::Timer(deadline) => return self.timers.push(Reverse((deadline, key))),
            Next::Close(ending) => ending,
        };
        // No epoll deregistration: closing a socket's only descriptor removes it from the epoll
        // set, and an event of this batch that still names the token finds either nothing or a
        // new relay, which copes with a spurious wake.
        let relay = self.relays.remove(key);
        let client = relay.client_addr();
        relay.close(&ending, &mut ctx);
        match &ending {
            Ending::NoSocket(e) if is_out_of_descriptors(e) => self.pause_accepting(now, e, shared),
            Ending::Denied => self.log_denied(client, now),
            _ => {}
        }
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
        tracing::info!(worker = self.env.worker, client = %ip, "refused by the access list");
    }
}

/// The worker's own verdict map for `--data-path sockmap` (two sockets per connection). The
/// supervisor checked that it loads; should it fail here anyway, connections are spliced.
fn load_sockmap(config: &TcpConfig) -> Option<Sockmap> {
    if config.data_path != DataPath::Sockmap {
        return None;
    }
    match Sockmap::load(config.max_connections.saturating_mul(2)) {
        Ok(map) => Some(map),
        Err(e) => {
            tracing::warn!(
                worker = config.worker,
                "sockmap data path unavailable ({e}); splicing"
            );
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
