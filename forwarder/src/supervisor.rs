//! The supervisor process: loads the rules, starts the worker processes and restarts any that
//! dies, applies reloads (SIGHUP, a changed rules file, or the web page) without dropping
//! established connections, and owns shutdown. It forwards no traffic itself, so nothing the web
//! side does can stall forwarding.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::control::{self, ConnectionInfo, FrameReader, Numbered, PoolSpec, Reply, Request};
use crate::rules::file::{RulesFile, Snapshot, WriteError};
use crate::rules::options::{Admin, Balance};
use crate::rules::{self, Entry, Proto, RuleError, RuleSet, RulesError};
use crate::stats::health::Health;
use crate::stats::slots::Slots;
use crate::stats::{describe_error, now_ms, Shared};

/// How the supervisor runs its workers.
#[derive(Clone)]
pub struct SupervisorConfig {
    /// The rules file (the only file the web page may write).
    pub rules: Arc<RulesFile>,
    pub workers: usize,
    /// Connections each worker takes before it stops accepting.
    pub per_worker_connections: usize,
    pub capacity: usize,
    /// UDP sessions the workers hold before evicting (one descriptor each).
    pub udp_capacity: usize,
    /// Arguments every worker gets after the hidden worker flags.
    pub worker_args: Vec<String>,
    pub health_interval: Option<Duration>,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// How backend host names are re-resolved.
    pub dns: crate::dns::DnsConfig,
}

struct WorkerHandle {
    index: usize,
    child: Child,
    control: UnixStream,
    replies: FrameReader,
    /// Sequence number of the last request sent.
    asked: u64,
    started: Instant,
}

struct Inner {
    /// The rules in force.
    rules: RuleSet,
    /// The same rules as the workers get them: with the shared slots that count them.
    specs: Vec<PoolSpec>,
    slots: Slots,
    /// The last answer for every host name the rules use.
    answers: crate::dns::Answers,
    workers: Vec<WorkerHandle>,
    /// Why the last reload was refused (cleared by the next one that applies), for the page.
    reload_error: Option<String>,
}

/// The supervisor, shared with the web page (cheap to clone).
#[derive(Clone)]
pub struct Supervisor {
    config: Arc<SupervisorConfig>,
    /// Set the moment SIGTERM/SIGINT arrives: workers exiting from then on (a signal to the
    /// whole process group reaches them too) are not restarted.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<Shared>,
    inner: Arc<Mutex<Inner>>,
}

/// Everything the web page shows about the forwarder, read from the shared counters.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub workers: usize,
    pub capacity: usize,
    /// TCP connections open now.
    pub active: u64,
    #[serde(default)]
    pub udp_capacity: usize,
    /// UDP sessions live now.
    #[serde(default)]
    pub udp_sessions: u64,
    /// Connections that were open in a worker when it died.
    pub lost_worker_died: u64,
    pub uptime_ms: u64,
    pub accept_pauses: u64,
    /// Access log lines lost to a full queue or a failed write.
    pub access_log_dropped: u64,
    pub pools: Vec<PoolStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolStats {
    pub listen: SocketAddr,
    /// How the rows name the pool: `0.0.0.0:8080`, `0.0.0.0:53/udp`.
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub proto: Proto,
    /// Connections accepted; for UDP, sessions made.
    pub accepted: u64,
    /// Connections no backend took; for UDP, datagrams dropped for want of a session.
    pub unrouted: u64,
    /// Connections the pool's options refused, by reason.
    pub refused: Refusals,
    /// UDP sessions evicted to make room (always 0 for TCP).
    #[serde(default)]
    pub evicted: u64,
    /// Which tier takes new connections now: `primary`, `backup` or `none`.
    #[serde(default)]
    pub serving: String,
    pub backends: Vec<BackendStats>,
}

/// Connections a pool refused before relaying a byte.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Refusals {
    /// By the access list (`allow`/`deny`, `--allow`/`--deny`).
    pub denied: u64,
    /// Every backend held its `max_conns`.
    pub max_conns: u64,
    /// The client's address held the pool's `max_conns_per_ip`.
    pub max_conns_per_ip: u64,
    /// `accept_proxy`: no valid PROXY header within the connect timeout.
    pub proxy_header: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendStats {
    pub name: String,
    pub dest_ip: String,
    pub dest_port: String,
    pub addr: SocketAddr,
    /// Health: `up`, `down` or `unknown` (nothing tried yet), as [`crate::stats::health`] says.
    pub state: String,
    /// For a row with a host name: what its last lookup said (`resolved to a, b` or why not).
    #[serde(default)]
    pub dns: Option<String>,
    /// `active`, `drain` or `disabled` (the operator's, from the rules file).
    #[serde(default)]
    pub admin: String,
    /// A `backup`: serves only while no primary of its pool can.
    #[serde(default)]
    pub backup: bool,
    /// What tells its health: `tcp connect`, `passive (connects)`, ...
    #[serde(default)]
    pub check: String,
    /// While down: good checks in a row so far (it is up at 2).
    #[serde(default)]
    pub rise: u64,
    /// In slow start: the percentage of its weight it takes now.
    #[serde(default)]
    pub slowstart_pct: Option<u32>,
    /// Connections (TCP) or sessions (UDP) open now.
    pub active: u64,
    /// Connections that were open when their worker died.
    pub lost_worker_died: u64,
    pub total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Of the bytes each way, those moved with splice(2).
    pub spliced_up: u64,
    pub spliced_down: u64,
    /// Connections handed to the kernel (sockmap data path).
    pub in_kernel: u64,
    pub connect_failures: u64,
    pub last_error: String,
    pub last_error_ms: u64,
    pub down_since_ms: u64,
    /// While down: when the backend will next be tried (unix ms).
    pub retry_at_ms: u64,
    pub last_check_ms: u64,
    /// UDP only: datagrams each way, and those dropped because a socket buffer was full toward
    /// the backend (up) or the client (down).
    #[serde(default)]
    pub datagrams_up: u64,
    #[serde(default)]
    pub datagrams_down: u64,
    #[serde(default)]
    pub drops_up: u64,
    #[serde(default)]
    pub drops_down: u64,
}

/// Events the supervisor loop reacts to.
enum Event {
    Reload,
    Shutdown,
    /// SIGUSR1: the workers reopen their access logs.
    Reopen,
}

impl Supervisor {
    /// Creates the shared counters and checks the rules; starts nothing yet.
    pub fn new(config: SupervisorConfig, rules: RuleSet) -> anyhow::Result<Supervisor> {
        let shared = Shared::create().context("creating shared stats mapping")?;
        shared
            .header()
            .workers
            .store(config.workers as u64, Relaxed);
        shared
            .header()
            .capacity
            .store(config.capacity as u64, Relaxed);
        let mut slots = Slots::default();
        // Names are looked up once before the workers start, so a name that resolves serves
        // from the first connection; one that does not leaves its backend down, not the file.
        let mut answers = crate::dns::Answers::default();
        if rules.rules().any(|r| r.host.is_some()) {
            let resolver = crate::dns::Resolver::new(&config.dns)?;
            for host in host_names(&rules) {
                let result = resolver.lookup(&host);
                let (answer, _) = crate::dns::fold(None, result, &config.dns, Instant::now());
                if answer.addrs.is_empty() {
                    tracing::warn!("{}", crate::dns::describe(&host, Some(&answer)));
                } else {
                    tracing::info!("{}", crate::dns::describe(&host, Some(&answer)));
                }
                answers.insert(host, answer);
            }
        }
        let specs = slots.assign(&rules, &answers, &shared)?;
        let inner = Inner {
            rules,
            specs,
            slots,
            answers,
            workers: Vec::new(),
            reload_error: None,
        };
        Ok(Supervisor {
            config: Arc::new(config),
            stopping: Arc::default(),
            shared: Arc::new(shared),
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the workers, then runs until SIGTERM/SIGINT and every worker has drained.
    pub fn run(&self) -> anyhow::Result<()> {
        {
            let mut inner = self.lock();
            for index in 0..self.config.workers {
                let worker = self.spawn_worker(index, &inner.specs)?;
                inner.workers.push(worker);
            }
        }
        let (tx, rx) = mpsc::channel();
        self.watch_signals(tx)?;
        crate::service::notify::ready();
        if let Some(interval) = self.config.health_interval {
            self.start_health_checks(interval);
        }
        self.start_dns();
        let mut last_file_check = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::Reload) => {
                    tracing::info!("SIGHUP: reloading {}", self.config.rules.label());
                    crate::service::notify::reloading();
                    let _ = self.reload_from_file(true);
                    crate::service::notify::ready();
                }
                Ok(Event::Shutdown) => return self.shutdown(),
                Ok(Event::Reopen) => self.forward_reopen(),
                Err(_) => {}
            }
            self.restart_dead_workers();
            crate::service::notify::watchdog(self.workers_running());
            if last_file_check.elapsed() >= Duration::from_millis(500) {
                last_file_check = Instant::now();
                let _ = self.reload_from_file(false);
            }
        }
    }

    /// Passes SIGUSR1 on to every worker (logrotate signals the supervisor's pid only).
    fn forward_reopen(&self) {
        let inner = self.lock();
        for w in &inner.workers {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(w.child.id() as i32, libc::SIGUSR1);
            }
        }
        tracing::info!("SIGUSR1: workers reopen their access logs");
    }

    fn watch_signals(&self, tx: mpsc::Sender<Event>) -> anyhow::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
        let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM, SIGUSR1])?;
        let stopping = Arc::clone(&self.stopping);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let event = if sig == SIGHUP {
                        Event::Reload
                    } else if sig == SIGUSR1 {
                        Event::Reopen
                    } else {
                        stopping.store(true, Relaxed);
                        Event::Shutdown
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            })?;
        Ok(())
    }

    fn spawn_worker(&self, index: usize, specs: &[PoolSpec]) -> anyhow::Result<WorkerHandle> {
        let (ours, theirs) = UnixStream::pair().context("creating control socket pair")?;
        let stats_fd = self.shared.raw_fd();
        let control_fd = theirs.as_raw_fd();
        let mut cmd = testbed::workers::worker_command(&[stats_fd, control_fd])
            .context("finding own executable")?;
        cmd.arg("--worker-index")
            .arg(index.to_string())
            .arg("--worker-fds")
            .arg(format!("{stats_fd},{control_fd}"))
            .arg("--worker-max-connections")
            .arg(self.config.per_worker_connections.to_string())
            .args(&self.config.worker_args);
        let child = cmd.spawn().context("starting a worker process")?;
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut worker = WorkerHandle {
            index,
            child,
            control: ours,
            replies: FrameReader::default(),
            asked: 0,
            started: Instant::now(),
        };
        match worker.ask(&Request::Apply {
            pools: specs.to_vec(),
        }) {
            Ok(Reply::Applied { errors }) => {
                for e in errors {
                    tracing::error!(worker = index, "{e}");
                }
            }
            Ok(_) => tracing::error!(worker = index, "unexpected reply to apply"),
            Err(e) => tracing::error!(worker = index, "worker did not take its rules: {e:#}"),
        }
        tracing::debug!(worker = index, pid = worker.child.id(), "worker started");
        Ok(worker)
    }

    fn restart_dead_workers(&self) {
        if self.stopping.load(Relaxed) {
            return;
        }
        let mut inner = self.lock();
        let specs = inner.specs.clone();
        for i in 0..inner.workers.len() {
            let status = match inner.workers[i].child.try_wait() {
                Ok(Some(status)) => status,
                _ => continue,
            };
            let index = inner.workers[i].index;
            // Its connections died with it: off the open counts before its successor counts.
            let held = self.shared.forget_worker(index);
            let how = match status.signal() {
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("exited ({status})"),
            };
            tracing::warn!(
                worker = index,
                "worker {index} {how} after {:.1} s holding {held} connections; restarting",
                inner.workers[i].started.elapsed().as_secs_f64()
            );
            match self.spawn_worker(index, &specs) {
                Ok(w) => inner.workers[i] = w,
                Err(e) => tracing::error!(worker = index, "cannot restart worker: {e:#}"),
            }
        }
    }

    fn shutdown(&self) -> anyhow::Result<()> {
        crate::service::notify::stopping();
        let mut inner = self.lock();
        tracing::info!(
            "shutting down: draining connections for up to {} s",
            self.config.drain_timeout.as_secs()
        );
        for w in &inner.workers {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(w.child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + self.config.drain_timeout + Duration::from_secs(2);
        for w in inner.workers.iter_mut() {
            loop {
                if let Ok(Some(_)) = w.child.try_wait() {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(worker = w.index, "worker did not drain in time; killing it");
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        tracing::info!("stopped");
        Ok(())
    }

    // ---- reloads ---------------------------------------------------------------------------

    /// Applies the rules file if it changed since it was last applied (or, with `force`, in any
    /// case); on any error the old rules stay in force.
    pub fn reload_from_file(&self, force: bool) -> Result<(), RulesError> {
        let Some(file) = self.config.rules.take_change(force) else {
            return Ok(());
        };
        if !force {
            tracing::info!("{} changed: reloading", self.config.rules.label());
        }
        let result = match &file.rules {
            Ok(set) => self.apply(set.clone()),
            Err(e) => Err(e.clone()),
        };
        if let Err(e) = &result {
            tracing::error!("rules not reloaded, the previous rules stay in force:\n{e}");
        }
        self.lock().reload_error = result.as_ref().err().map(|e| e.to_string());
        result
    }

    /// Why the last reload of the rules file was refused, if it was.
    pub fn reload_error(&self) -> Option<String> {
        self.lock().reload_error.clone()
    }

    /// Makes `new` the rules in force: new ports are checked for being free, then every worker
    /// switches over. Established connections are untouched.
    pub fn apply(&self, new: RuleSet) -> Result<(), RulesError> {
        let mut inner = self.lock();
        let old: Vec<(SocketAddr, Proto)> = inner
            .rules
            .pools
            .iter()
            .map(|p| (p.listen, p.proto))
            .collect();
        let mut errors = Vec::new();
        for pool in new
            .pools
            .iter()
            .filter(|p| !old.contains(&(p.listen, p.proto)))
        {
            if let Err(e) = probe_bind(pool.listen, pool.proto) {
                let line = pool.rules.first().map(|r| r.line).unwrap_or(0);
                errors.push(RuleError {
                    file: self.config.rules.label().to_string(),
                    line,
                    field: "listen_port".into(),
                    message: format!("cannot listen on {}: {e}", pool.label()),
                });
            }
        }
        if !errors.is_empty() {
            return Err(RulesError(errors));
        }
        // Slots are committed only once every worker took the rules.
        let mut slots = inner.slots.clone();
        let specs = match slots.assign(&new, &inner.answers, &self.shared) {
            Ok(s) => s,
            Err(e) => {
                return Err(RulesError(vec![RuleError {
                    file: self.config.rules.label().to_string(),
                    line: 0,
                    field: "row".into(),
                    message: e.to_string(),
                }]))
            }
        };
        crate::balance::tier::mark_returning(&inner.specs, &specs, &self.shared, now_ms());
        let failures = deliver(&mut inner.workers, &specs);
        if !failures.is_empty() {
            // All or nothing: put the workers that switched back on the rules in force.
            let previous = inner.specs.clone();
            for (worker, why) in deliver(&mut inner.workers, &previous) {
                tracing::error!(worker, "cannot return to the previous rules: {why}");
            }
            let file = self.config.rules.label().to_string();
            return Err(RulesError(
                failures
                    .into_iter()
                    .map(|(worker, why)| RuleError {
                        file: file.clone(),
                        line: 0,
                        field: "row".into(),
                        message: format!(
                            "worker {worker} could not apply the rules ({why}); the previous rules stay in force"
                        ),
                    })
                    .collect(),
            ));
        }
        inner.slots = slots;
        inner.reload_error = None;
        log_changes(&inner.rules, &new);
        inner.rules = new;
        inner.specs = specs;
        Ok(())
    }

    /// The rules in force.
    pub fn rules_in_force(&self) -> RuleSet {
        self.lock().rules.clone()
    }

    /// The rules file.
    pub fn rules_file(&self) -> &RulesFile {
        &self.config.rules
    }

    /// Writes `entries` to the rules file and applies them live, all or nothing (see
    /// [`RulesFile::replace`]).
    pub fn write_entries(
        &self,
        entries: &[(usize, Entry)],
        if_match: Option<&str>,
    ) -> Result<Arc<Snapshot>, WriteError> {
        self.config
            .rules
            .replace(entries, if_match, |set| self.apply(set.clone()))
    }

    // ---- figures ---------------------------------------------------------------------------

    pub fn stats(&self) -> StatsSnapshot {
        let inner = self.lock();
        let now = now_ms();
        let header = self.shared.header();
        let mut active = 0;
        let mut udp_sessions = 0;
        let pools = inner
            .rules
            .pools
            .iter()
            .filter_map(|pool| {
                let pool_slot = inner.slots.pool_slot(pool)?;
                let p = self.shared.pool(pool_slot);
                let serving = inner
                    .specs
                    .iter()
                    .find(|s| s.slot == pool_slot)
                    .map_or("none", |s| {
                        crate::balance::tier::serving_tier(&s.backends, &self.shared, now)
                    });
                Some(PoolStats {
                    listen: pool.listen,
                    label: pool.label(),
                    proto: pool.proto,
                    accepted: p.accepted.load(Relaxed),
                    unrouted: p.unrouted.load(Relaxed),
                    refused: Refusals {
                        denied: p.denied.load(Relaxed),
                        max_conns: p.full.load(Relaxed),
                        max_conns_per_ip: p.per_ip_full.load(Relaxed),
                        proxy_header: p.bad_header.load(Relaxed),
                    },
                    evicted: p.evicted.load(Relaxed),
                    serving: serving.to_string(),
                    backends: pool
                        .rules
                        .iter()
                        .flat_map(|rule| {
                            // A row with a host name has one member per address it resolved to.
                            let members: Vec<(SocketAddr, usize)> = match &rule.host {
                                None => inner
                                    .slots
                                    .backend_slot(pool, rule.dest)
                                    .map(|slot| (rule.dest, slot))
                                    .into_iter()
                                    .collect(),
                                Some(_) => inner
                                    .specs
                                    .iter()
                                    .filter(|s| s.slot == pool_slot)
                                    .flat_map(|s| s.backends.iter())
                                    .filter(|b| b.line == rule.line && b.name == rule.entry.name)
                                    .map(|b| (b.addr, b.slot))
                                    .collect(),
                            };
                            let dns = rule
                                .host
                                .as_ref()
                                .map(|h| crate::dns::describe(h, inner.answers.get(h)));
                            let unresolved = (members.is_empty() && rule.host.is_some())
                                .then(|| unresolved_stats(rule, dns.clone().unwrap_or_default()));
                            members
                                .into_iter()
                                .map(|(addr, slot)| {
                                    let s = self.shared.backend(slot);
                                    let open = self.shared.active(slot);
                                    match pool.proto {
                                        Proto::Tcp => active += open,
                                        Proto::Udp => udp_sessions += open,
                                    }
                                    let down = s.is_down(now);
                                    let health = crate::stats::health::health(s);
                                    let o = &rule.options;
                                    let spec = crate::control::BackendSpec {
                                        name: String::new(),
                                        addr,
                                        slot,
                                        options: o.clone(),
                                        line: rule.line,
                                    };
                                    let ramp = crate::balance::tier::ramp_share(&spec, s, now)
                                        .filter(|_| pool.options.balance != Balance::Source);
                                    BackendStats {
                                        name: rule.entry.name.clone(),
                                        dest_ip: rule.entry.dest_ip.clone(),
                                        dest_port: rule.entry.dest_port.clone(),
                                        addr,
                                        dns: dns.clone(),
                                        state: health.as_str().into(),
                                        admin: o.admin.as_str().into(),
                                        backup: o.backup,
                                        check: crate::stats::health::check_kind(
                                            pool.proto == Proto::Udp,
                                            self.config.health_interval.is_some(),
                                            o.admin == Admin::Disabled,
                                        )
                                        .into(),
                                        rise: if health == Health::Down {
                                            s.rise.load(Relaxed)
                                        } else {
                                            0
                                        },
                                        slowstart_pct: ramp.map(|f| (f * 100.0) as u32),
                                        active: open,
                                        lost_worker_died: s.lost.load(Relaxed),
                                        total: s.total.load(Relaxed),
                                        bytes_up: s.bytes_up.load(Relaxed),
                                        bytes_down: s.bytes_down.load(Relaxed),
                                        spliced_up: s.spliced_up.load(Relaxed),
                                        spliced_down: s.spliced_down.load(Relaxed),
                                        in_kernel: s.in_kernel.load(Relaxed),
                                        connect_failures: s.connect_failures.load(Relaxed),
                                        last_error: describe_error(s.last_error.load(Relaxed)),
                                        last_error_ms: s.last_error_ms.load(Relaxed),
                                        down_since_ms: if down {
                                            s.down_since_ms.load(Relaxed)
                                        } else {
                                            0
                                        },
                                        retry_at_ms: if down {
                                            s.down_until_ms.load(Relaxed)
                                        } else {
                                            0
                                        },
                                        last_check_ms: s.last_check_ms.load(Relaxed),
                                        datagrams_up: s.datagrams_up.load(Relaxed),
                                        datagrams_down: s.datagrams_down.load(Relaxed),
                                        drops_up: s.drops_up.load(Relaxed),
                                        drops_down: s.drops_down.load(Relaxed),
                                    }
                                })
                                .chain(unresolved)
                                .collect::<Vec<_>>()
                        })
                        .collect(),
                })
            })
            .collect();
        StatsSnapshot {
            workers: self.config.workers,
            capacity: self.config.capacity,
            active,
            udp_capacity: self.config.udp_capacity,
            udp_sessions,
            lost_worker_died: header.lost_worker_died.load(Relaxed),
            uptime_ms: now.saturating_sub(header.started_ms.load(Relaxed)),
            accept_pauses: header.accept_pauses.load(Relaxed),
            access_log_dropped: header.access_log_dropped.load(Relaxed),
            pools,
        }
    }

    /// Every live connection, from every worker.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut inner = self.lock();
        let mut all = Vec::new();
        for w in inner.workers.iter_mut() {
            match w.ask(&Request::ListConnections) {
                Ok(Reply::Connections { list }) => all.extend(list),
                Ok(_) => {}
                Err(e) => tracing::warn!(worker = w.index, "cannot list connections: {e:#}"),
            }
        }
        all.sort_by_key(|c| c.id);
        all
    }

    /// Closes one connection (reset on both sides). False when no worker has it.
    pub fn close_connection(&self, id: u64) -> bool {
        let worker = (id >> crate::control::ID_WORKER_SHIFT) as usize;
        let mut inner = self.lock();
        let Some(w) = inner.workers.iter_mut().find(|w| w.index == worker) else {
            return false;
        };
        matches!(
            w.ask(&Request::Close { id }),
            Ok(Reply::Closed { found: true })
        )
    }

    // ---- host names -------------------------------------------------------------------------

    /// The `dns` thread: asks again for every name of the rules in force whose answer's TTL ran
    /// out (a name new in an edit at once), outside the lock, and turns a changed answer into
    /// changed pool members for the workers. Connections already open stay where they are.
    fn start_dns(&self) {
        let me = self.clone();
        let config = self.config.dns;
        let spawned = std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || {
                let mut resolver: Option<crate::dns::Resolver> = None;
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    let due: Vec<(String, Option<crate::dns::Answer>)> = {
                        let inner = me.lock();
                        let now = Instant::now();
                        host_names(&inner.rules)
                            .into_iter()
                            .filter_map(|h| {
                                let a = inner.answers.get(&h).cloned();
                                let due =
                                    a.as_ref().and_then(|a| a.next_at).is_none_or(|t| t <= now);
                                due.then_some((h, a))
                            })
                            .collect()
                    };
                    if due.is_empty() {
                        continue;
                    }
                    if resolver.is_none() {
                        match crate::dns::Resolver::new(&config) {
                            Ok(r) => resolver = Some(r),
                            Err(e) => {
                                tracing::error!("cannot resolve host names: {e:#}");
                                std::thread::sleep(config.min_ttl);
                                continue;
                            }
                        }
                    }
                    let Some(r) = resolver.as_ref() else { continue };
                    for (host, previous) in due {
                        let result = r.lookup(&host);
                        let (answer, outcome) =
                            crate::dns::fold(previous.as_ref(), result, &config, Instant::now());
                        use crate::dns::Outcome;
                        match outcome {
                            Outcome::Changed => tracing::info!(
                                "{} (was {})",
                                crate::dns::describe(&host, Some(&answer)),
                                previous.as_ref().map_or("unresolved".to_string(), |p| {
                                    crate::dns::list(&p.addrs)
                                })
                            ),
                            Outcome::FailedFirst => {
                                tracing::warn!("{}", crate::dns::describe(&host, Some(&answer)))
                            }
                            Outcome::FailedAgain | Outcome::Same => {}
                        }
                        let mut inner = me.lock();
                        inner.answers.insert(host, answer);
                        if outcome == Outcome::Changed {
                            me.reassign(&mut inner);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the dns thread: {e}");
        }
    }

    /// Gives the workers the members the current answers make of the rules in force.
    fn reassign(&self, inner: &mut Inner) {
        let mut slots = inner.slots.clone();
        let specs = match slots.assign(&inner.rules, &inner.answers, &self.shared) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("new addresses not applied: {e}");
                return;
            }
        };
        crate::balance::tier::mark_returning(&inner.specs, &specs, &self.shared, now_ms());
        let failures = deliver(&mut inner.workers, &specs);
        if !failures.is_empty() {
            let previous = inner.specs.clone();
            for (worker, why) in deliver(&mut inner.workers, &previous) {
                tracing::error!(worker, "cannot return to the previous members: {why}");
            }
            return;
        }
        inner.slots = slots;
        inner.specs = specs;
    }

    // ---- active health checks --------------------------------------------------------------

    fn start_health_checks(&self, interval: Duration) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("health".into())
            .spawn(move || loop {
                // TCP backends only (a TCP connect says nothing about a UDP service), and not
                // the disabled ones: the operator took them out of checking too.
                let backends: Vec<(usize, SocketAddr, String)> = {
                    let inner = me.lock();
                    inner
                        .specs
                        .iter()
                        .filter(|p| p.proto == Proto::Tcp)
                        .flat_map(|p| p.backends.iter())
                        .filter(|b| b.options.admin != Admin::Disabled)
                        .map(|b| (b.slot, b.addr, b.name.clone()))
                        .collect()
                };
                for (slot, addr, name) in backends {
                    let s = me.shared.backend(slot);
                    let result = std::net::TcpStream::connect_timeout(&addr, me.config.connect_timeout);
                    s.last_check_ms.store(now_ms(), Relaxed);
                    match result {
                        Ok(_) => {
                            if s.record_success(now_ms()) {
                                tracing::info!(backend = %addr, %name, "backend up (health check)");
                            }
                        }
                        Err(e) => {
                            let code = e.raw_os_error().map(|c| c as u64).unwrap_or(crate::stats::ERR_TIMEOUT);
                            if s.record_failure(code, now_ms()) {
                                tracing::warn!(backend = %addr, %name, "backend down (health check): {e}");
                            }
                        }
                    }
                }
                std::thread::sleep(interval);
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start health checks: {e}");
        }
    }
}

/// Every host name the rules use, once.
fn host_names(rules: &RuleSet) -> Vec<String> {
    let mut names: Vec<String> = rules.rules().filter_map(|r| r.host.clone()).collect();
    names.sort();
    names.dedup();
    names
}

/// The figures of a row whose host name has not resolved yet: down, saying why.
fn unresolved_stats(rule: &rules::Rule, why: String) -> BackendStats {
    BackendStats {
        name: rule.entry.name.clone(),
        dest_ip: rule.entry.dest_ip.clone(),
        dest_port: rule.entry.dest_port.clone(),
        addr: rule.dest,
        dns: Some(why.clone()),
        state: Health::Down.as_str().into(),
        admin: rule.options.admin.as_str().into(),
        backup: rule.options.backup,
        check: "dns".into(),
        rise: 0,
        slowstart_pct: None,
        active: 0,
        lost_worker_died: 0,
        total: 0,
        bytes_up: 0,
        bytes_down: 0,
        spliced_up: 0,
        spliced_down: 0,
        in_kernel: 0,
        connect_failures: 0,
        last_error: why,
        last_error_ms: 0,
        down_since_ms: 0,
        retry_at_ms: 0,
        last_check_ms: 0,
        datagrams_up: 0,
        datagrams_down: 0,
        drops_up: 0,
        drops_down: 0,
    }
}

/// Sends `specs` to every live worker; returns the workers that did not apply them and why. A
/// worker that has exited is not a failure: it is restarted with the rules in force.
fn deliver(workers: &mut [WorkerHandle], specs: &[PoolSpec]) -> Vec<(usize, String)> {
    let mut failures = Vec::new();
    for w in workers.iter_mut() {
        let why = match w.ask(&Request::Apply {
            pools: specs.to_vec(),
        }) {
            Ok(Reply::Applied { errors }) if errors.is_empty() => continue,
            Ok(Reply::Applied { errors }) => errors.join("; "),
            Ok(other) => format!("unexpected reply {other:?}"),
            Err(_) if matches!(w.child.try_wait(), Ok(Some(_))) => continue,
            Err(e) => format!("{e:#}"),
        };
        tracing::error!(worker = w.index, "rules not applied: {why}");
        failures.push((w.index, why));
    }
    failures
}

impl WorkerHandle {
    /// Sends one request and waits (up to the socket's read timeout) for its reply.
    fn ask(&mut self, request: &Request) -> anyhow::Result<Reply> {
        self.asked += 1;
        let mut frame = Vec::new();
        control::encode(&(self.asked, request), &mut frame)?;
        self.control
            .write_all(&frame)
            .context("sending to worker")?;
        let mut buf = [0u8; 64 * 1024];
        loop {
            while let Some(reply) = self.replies.next_frame::<Numbered<Reply>>() {
                let (seq, reply) = reply.context("decoding worker reply")?;
                if seq == self.asked {
                    return Ok(reply);
                }
                // The late answer to a request that timed out earlier.
            }
            let n = self
                .control
                .read(&mut buf)
                .context("reading worker reply")?;
            anyhow::ensure!(n > 0, "worker closed its control socket");
            self.replies.push(&buf[..n]);
        }
    }
}

/// Checks that nothing else holds `addr`: a bind without listen, with SO_REUSEPORT like the
/// workers, fails only when a socket that does not share the port has it.
fn probe_bind(addr: SocketAddr, proto: Proto) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let kind = match proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    let s = Socket::new(Domain::for_address(addr), kind, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())
}

/// Checks every new listen address of `set` (for `--check` and start-up).
pub fn check_bindable(set: &RuleSet, file: &str) -> Result<(), RulesError> {
    let errors: Vec<RuleError> = set
        .pools
        .iter()
        .filter_map(|p| {
            probe_bind(p.listen, p.proto).err().map(|e| RuleError {
                file: file.to_string(),
                line: p.rules.first().map(|r| r.line).unwrap_or(0),
                field: "listen_port".into(),
                message: format!("cannot listen on {}: {e}", p.label()),
            })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RulesError(errors))
    }
}

fn log_changes(old: &RuleSet, new: &RuleSet) {
    for p in &new.pools {
        match old
            .pools
            .iter()
            .find(|o| o.listen == p.listen && o.proto == p.proto)
        {
            None => tracing::info!(listen = %p.label(), "new port: {}", describe_pool(p)),
            Some(o) if destinations(o) != destinations(p) => {
                tracing::info!(listen = %p.label(), "pool changed: {}", describe_pool(p))
            }
            Some(_) => {}
        }
    }
    for o in &old.pools {
        if !new
            .pools
            .iter()
            .any(|p| p.listen == o.listen && p.proto == o.proto)
        {
            tracing::info!(listen = %o.label(), "port removed (established connections stay)");
        }
    }
}

/// What a pool forwards to, without the line numbers a rewrite of the file shifts.
fn destinations(p: &rules::Pool) -> Vec<(&Entry, SocketAddr)> {
    p.rules.iter().map(|r| (&r.entry, r.dest)).collect()
}

/// `a 127.0.0.1:9001, b 127.0.0.1:9002`
pub fn describe_pool(p: &rules::Pool) -> String {
    p.rules
        .iter()
        .map(|r| {
            let dest = match &r.host {
                Some(h) => format!("{h}:{}", r.dest.port()),
                None => r.dest.to_string(),
            };
            match r.entry.options.trim() {
                "" => format!("{} {dest}", r.entry.name),
                options => format!("{} {dest} [{options}]", r.entry.name),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the service side needs (kept apart from the engine's code).
impl Supervisor {
    /// Every worker process is running (none exited since the last restart pass).
    pub fn workers_running(&self) -> bool {
        let mut inner = self.lock();
        inner
            .workers
            .iter_mut()
            .all(|w| matches!(w.child.try_wait(), Ok(None)))
    }
}
