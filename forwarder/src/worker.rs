//! A worker process: one mio (epoll, edge-triggered) event loop over its two sides, [`Tcp`]
//! (listeners and relays) and [`Udp`] (ports and sessions), the control socket the supervisor
//! gives orders on, and the drain at the end. The worker's settings arrive as the first frame on
//! the control socket ([`WorkerConfig`]); the token space is [`crate::tokens`].

use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mio::net::UnixStream;
use mio::{Events, Interest, Poll};
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::access_log::{self, AccessLog};
use crate::balance::ServedPool;
use crate::control::{self, FrameReader, Numbered, PoolSpec, Reply, Request};
use crate::rules::Proto;
use crate::stats::Shared;
use crate::tcp::sockmap::DataPath;
use crate::tcp::{Tcp, TcpConfig};
use crate::tokens::{self, Owner};
use crate::udp::{Udp, UdpConfig};

/// How long a new worker waits for its [`WorkerConfig`] frame before giving up.
const CONFIG_WAIT: Duration = Duration::from_secs(10);

/// A worker's settings: the first frame the supervisor writes on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub index: usize,
    /// `--log-level` (`RUST_LOG` still wins).
    pub log_level: String,
    /// This worker's share of `--max-connections`.
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub splice: bool,
    pub max_pipes: usize,
    /// `--data-path`, as the supervisor found it works: sockmap hands established connections
    /// to the kernel.
    pub data_path: DataPath,
    /// `--allow`: clients every pool without its own `allow` list admits (empty = all).
    pub default_allow: Vec<ipnet::IpNet>,
    /// `--deny`: clients every pool refuses, on top of its own `deny` list.
    pub default_deny: Vec<ipnet::IpNet>,
    /// `--access-log` (a file as an absolute path) and its format.
    pub access_log: Option<(access_log::Target, access_log::Format)>,
    /// UDP sessions idle this long end.
    pub udp_idle_timeout: Duration,
    /// UDP sessions this worker holds before evicting the least recently active.
    pub udp_max_sessions: usize,
}

/// The descriptors a worker inherits from the supervisor, as `--worker-fds STATS,CONTROL`.
pub struct Inherited {
    pub stats_fd: i32,
    pub control_fd: i32,
    /// What was read off the control socket after the configuration frame (the supervisor
    /// sends the first rules right behind it).
    pub pending: FrameReader,
}

/// Reads the worker's settings off the control socket (blocking, for at most [`CONFIG_WAIT`]).
/// A worker started by hand has no supervisor on the other end: it gets an error saying so.
pub fn receive_config(fds: &mut Inherited) -> anyhow::Result<WorkerConfig> {
    let fd = fds.control_fd;
    // SAFETY: fstat on any integer is harmless; it tells whether the descriptor is a socket
    // before this process takes ownership of it.
    let is_socket = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    };
    if !is_socket {
        bail!(
            "descriptor {fd} is not a control socket: a worker is started by the supervisor \
             (run `forwarder` without --worker-fds)"
        );
    }
    // SAFETY: the supervisor passed this socket to this process for exactly this use; it is
    // handed back as a raw descriptor below, so it is owned once.
    let control = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    control.set_read_timeout(Some(CONFIG_WAIT))?;
    let mut reader = FrameReader::default();
    let mut buf = [0u8; 4096];
    let config = loop {
        if let Some(frame) = reader.next_frame::<WorkerConfig>() {
            break frame.context("the supervisor's configuration frame does not decode")?;
        }
        match (&control).read(&mut buf) {
            Ok(0) => bail!(
                "control socket {fd} closed before the configuration frame came: a worker is \
                 started by the supervisor"
            ),
            Ok(n) => reader.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "no configuration frame on control socket {fd} within {} s: a worker is \
                     started by the supervisor",
                    CONFIG_WAIT.as_secs()
                )
            }
            Err(e) => return Err(e).context("reading the configuration frame"),
        }
    };
    fds.pending = reader;
    // Still owned as the raw descriptor, which `run` takes over.
    std::mem::forget(control);
    Ok(config)
}

/// The worker: its two sides and its control socket.
pub struct Worker {
    config: WorkerConfig,
    poll: Poll,
    shared: Shared,
    control: UnixStream,
    control_in: FrameReader,
    control_out: Vec<u8>,
    tcp: Tcp,
    udp: Udp,
    draining_since: Option<Instant>,
}

/// Runs a worker until it is told to stop and has drained.
pub fn run(config: WorkerConfig, fds: Inherited) -> anyhow::Result<()> {
    // SAFETY: the supervisor passed these descriptors to this process for exactly this use.
    let shared = unsafe { Shared::from_inherited(fds.stats_fd) }.context("mapping shared stats")?;
    let control_std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fds.control_fd) };
    control_std.set_read_timeout(None)?;
    control_std.set_nonblocking(true)?;
    let mut control = UnixStream::from_std(control_std);
    let poll = Poll::new().context("creating epoll instance")?;
    poll.registry().register(
        &mut control,
        tokens::CONTROL,
        Interest::READABLE | Interest::WRITABLE,
    )?;
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    poll.registry()
        .register(&mut signals, tokens::SIGNALS, Interest::READABLE)?;
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
    let tcp = Tcp::new(
        TcpConfig {
            worker: config.index,
            max_connections: config.max_connections,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            splice: config.splice,
            max_pipes: config.max_pipes,
            data_path: config.data_path,
        },
        access_log,
    );
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
        control_in: fds.pending,
        control_out: Vec::new(),
        tcp,
        udp,
        draining_since: None,
    };
    // Frames that came with the configuration: no event will announce them again.
    worker.control_ready()?;
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
                let registry = self.poll.registry();
                match tokens::decode(event.token()) {
                    Owner::Control => self.control_ready()?,
                    Owner::Signals => {
                        if signals.pending().next().is_some() {
                            self.start_drain();
                        }
                    }
                    Owner::UdpPort(_) | Owner::UdpSession(_) => {
                        self.udp.ready(event.token(), &self.shared, registry, now)
                    }
                    owner => self.tcp.ready(owner, event, &self.shared, registry, now),
                }
            }
            let (shared, registry) = (&self.shared, self.poll.registry());
            self.tcp.run_again(shared, registry, now);
            self.udp.run_again(shared, registry, now);
            self.udp.expire(shared, now);
            self.tcp.expire(shared, registry, now);
            if now.duration_since(last_sweep) >= Duration::from_secs(1) {
                last_sweep = now;
                self.tcp.sweep(shared, registry, now);
            }
            if let Some(since) = self.draining_since {
                let done = self.tcp.relays() == 0 && self.udp.drained(now);
                if done || now.duration_since(since) >= self.config.drain_timeout {
                    tracing::info!(
                        worker = self.config.index,
                        left = self.tcp.relays(),
                        udp_sessions = self.udp.sessions(),
                        "worker drained, exiting"
                    );
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if self.tcp.has_again() || self.udp.has_again() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        if let Some(deadline) = self.tcp.next_deadline() {
            next = next.min(deadline);
        }
        Some(next.saturating_duration_since(now))
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
        let (shared, registry) = (&self.shared, self.poll.registry());
        match request {
            Request::Apply { pools } => Reply::Applied {
                errors: self.apply(pools),
            },
            Request::ListConnections => {
                let now = Instant::now();
                let mut list = self.tcp.connections(now);
                list.extend(self.udp.connections(now));
                Reply::Connections { list }
            }
            Request::Close { id } => Reply::Closed {
                found: self.tcp.close(id, shared, registry) || self.udp.close(id, shared),
            },
        }
    }

    /// Hands each side its pools; established connections keep their own pool and backend.
    fn apply(&mut self, pools: Vec<PoolSpec>) -> Vec<String> {
        let (allow, deny) = (&self.config.default_allow, &self.config.default_deny);
        let (tcp, udp): (Vec<ServedPool>, Vec<ServedPool>) = pools
            .into_iter()
            .flat_map(crate::ranges::port_specs)
            .map(|spec| ServedPool::new(spec, allow, deny))
            .partition(|p| p.spec.proto == Proto::Tcp);
        let (shared, registry) = (&self.shared, self.poll.registry());
        let mut errors = self.udp.apply(udp, shared, registry);
        errors.extend(self.tcp.apply(tcp, shared, registry));
        errors
    }

    /// Stops accepting (TCP listeners close; UDP stops reading clients but keeps its sockets for
    /// the replies in flight) and lets established connections finish.
    fn start_drain(&mut self) {
        if self.draining_since.is_some() {
            return;
        }
        tracing::info!(
            worker = self.config.index,
            connections = self.tcp.relays(),
            udp_sessions = self.udp.sessions(),
            "draining"
        );
        let now = Instant::now();
        self.draining_since = Some(now);
        self.udp.start_drain(self.poll.registry(), now);
        self.tcp.start_drain(self.poll.registry());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::IntoRawFd;

    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig {
            index: 3,
            log_level: "debug".into(),
            max_connections: 10,
            connect_timeout: Duration::from_millis(250),
            idle_timeout: None,
            drain_timeout: Duration::from_secs(1),
            splice: true,
            max_pipes: 4,
            data_path: DataPath::Splice,
            default_allow: vec!["10.0.0.0/8".parse().unwrap()],
            default_deny: Vec::new(),
            access_log: Some((
                access_log::Target::File("/var/log/f.log".into()),
                access_log::Format::Json,
            )),
            udp_idle_timeout: Duration::from_secs(60),
            udp_max_sessions: 5,
        }
    }

    fn inherited(control: std::os::unix::net::UnixStream) -> Inherited {
        Inherited {
            stats_fd: -1,
            control_fd: control.into_raw_fd(),
            pending: FrameReader::default(),
        }
    }

    #[test]
    fn the_configuration_frame_arrives_whole_and_what_follows_is_kept() {
        let (mut sup, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut bytes = Vec::new();
        control::encode(&config(), &mut bytes).unwrap();
        control::encode(&(1u64, Request::ListConnections), &mut bytes).unwrap();
        sup.write_all(&bytes).unwrap();
        let mut fds = inherited(theirs);
        assert_eq!(receive_config(&mut fds).unwrap(), config());
        let next = fds
            .pending
            .next_frame::<Numbered<Request>>()
            .unwrap()
            .unwrap();
        assert!(matches!(next, (1, Request::ListConnections)));
        // SAFETY: the test owns the descriptor receive_config left open.
        drop(unsafe { std::os::unix::net::UnixStream::from_raw_fd(fds.control_fd) });
    }

    #[test]
    fn without_a_supervisor_the_worker_says_how_it_is_started() {
        let (sup, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(sup);
        let e = receive_config(&mut inherited(theirs))
            .unwrap_err()
            .to_string();
        assert!(e.contains("closed before the configuration frame"), "{e}");
        assert!(e.contains("started by the supervisor"), "{e}");
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.into_raw_fd();
        let e = receive_config(&mut Inherited {
            stats_fd: -1,
            control_fd: fd,
            pending: FrameReader::default(),
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("descriptor {fd} is not a control socket")),
            "{e}"
        );
        // SAFETY: receive_config refused it without taking it.
        unsafe { libc::close(fd) };
    }
}
