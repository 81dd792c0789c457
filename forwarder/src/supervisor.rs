//! The supervisor process: loads the rules, starts the worker processes and restarts any that
//! dies, applies reloads (SIGHUP, a changed rules file, or the web page) without dropping
//! established connections, and owns shutdown. It forwards no traffic itself, so nothing the web
//! side does can stall forwarding.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::control::{ConnectionInfo, PoolSpec, Reply, Request};
use crate::rules::{self, Entry, RuleError, RuleSet, RulesError};
use crate::stats::slots::Slots;
use crate::stats::{describe_error, now_ms, Shared};

/// How the supervisor runs its workers.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub rules_path: PathBuf,
    pub workers: usize,
    /// Connections each worker takes before it stops accepting.
    pub per_worker_connections: usize,
    pub capacity: usize,
    /// Arguments every worker gets after the hidden worker flags.
    pub worker_args: Vec<String>,
    pub health_interval: Option<Duration>,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
}

struct WorkerHandle {
    index: usize,
    child: Child,
    control: UnixStream,
    replies: BufReader<UnixStream>,
    started: Instant,
}

struct Inner {
    rules: RuleSet,
    specs: Vec<PoolSpec>,
    slots: Slots,
    workers: Vec<WorkerHandle>,
    /// What the rules file looked like when last read, to notice edits.
    file_stamp: Option<(i64, i64, u64, u64)>,
    file_text: String,
}

/// The supervisor, shared with the web page (cheap to clone).
#[derive(Clone)]
pub struct Supervisor {
    config: Arc<SupervisorConfig>,
    /// Held from the If-Match check to the rename, so two writers cannot both pass the check.
    write_lock: Arc<Mutex<()>>,
    /// Set the moment SIGTERM/SIGINT arrives: workers exiting from then on (a signal to the
    /// whole process group reaches them too) are not restarted.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<Shared>,
    inner: Arc<Mutex<Inner>>,
}

/// Why the web page's write of the rules was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the rules changed since you loaded them (current version {current})")]
    Stale { current: String },
    #[error("{0}")]
    Invalid(RulesError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Everything the web page shows about the forwarder, read from the shared counters.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub workers: usize,
    pub capacity: usize,
    pub active: u64,
    pub uptime_ms: u64,
    pub accept_pauses: u64,
    pub pools: Vec<PoolStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolStats {
    pub listen: SocketAddr,
    pub accepted: u64,
    pub unrouted: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendStats {
    pub name: String,
    pub dest_ip: String,
    pub dest_port: String,
    pub addr: SocketAddr,
    /// `up` or `down`.
    pub state: String,
    pub active: u64,
    pub total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub connect_failures: u64,
    pub last_error: String,
    pub last_error_ms: u64,
    pub down_since_ms: u64,
    /// While down: when the backend will next be tried (unix ms).
    pub retry_at_ms: u64,
    pub last_check_ms: u64,
}

/// Events the supervisor loop reacts to.
enum Event {
    Reload,
    Shutdown,
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
        let specs = slots.assign(&rules, &shared)?;
        let file_text = std::fs::read_to_string(&config.rules_path).unwrap_or_default();
        let inner = Inner {
            rules,
            specs,
            slots,
            workers: Vec::new(),
            file_stamp: stamp(&config.rules_path),
            file_text,
        };
        Ok(Supervisor {
            config: Arc::new(config),
            write_lock: Arc::new(Mutex::new(())),
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
        let mut last_file_check = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::Reload) => {
                    tracing::info!("SIGHUP: reloading {}", self.config.rules_path.display());
                    crate::service::notify::reloading();
                    let _ = self.reload_from_file();
                    crate::service::notify::ready();
                }
                Ok(Event::Shutdown) => return self.shutdown(),
                Err(_) => {}
            }
            self.restart_dead_workers();
            crate::service::notify::watchdog(self.workers_running());
            if last_file_check.elapsed() >= Duration::from_millis(500) {
                last_file_check = Instant::now();
                let changed = {
                    let inner = self.lock();
                    stamp(&self.config.rules_path) != inner.file_stamp
                };
                if changed {
                    tracing::info!("{} changed: reloading", self.config.rules_path.display());
                    let _ = self.reload_from_file();
                }
            }
        }
    }

    fn watch_signals(&self, tx: mpsc::Sender<Event>) -> anyhow::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])?;
        let stopping = Arc::clone(&self.stopping);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let event = if sig == SIGHUP {
                        Event::Reload
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
        let exe = std::env::current_exe().context("finding own executable")?;
        let stats_fd = self.shared.raw_fd();
        let control_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(exe);
        cmd.arg("--worker-index")
            .arg(index.to_string())
            .arg("--worker-fds")
            .arg(format!("{stats_fd},{control_fd}"))
            .arg("--worker-max-connections")
            .arg(self.config.per_worker_connections.to_string())
            .args(&self.config.worker_args);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                keep_across_exec(stats_fd)?;
                keep_across_exec(control_fd)?;
                // A worker must not outlive a supervisor killed with SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting a worker process")?;
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(5)))?;
        let replies = BufReader::new(ours.try_clone()?);
        let mut worker = WorkerHandle {
            index,
            child,
            control: ours,
            replies,
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
            tracing::warn!(
                worker = index,
                "worker exited ({status}) after {:.1} s; restarting",
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

    /// Reads the rules file again and applies it; on any error the old rules stay in force.
    pub fn reload_from_file(&self) -> Result<(), RulesError> {
        let path = &self.config.rules_path;
        let stamp_now = stamp(path);
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let result = rules::load(path).and_then(|set| self.apply(set));
        let mut inner = self.lock();
        inner.file_stamp = stamp_now;
        inner.file_text = text;
        drop(inner);
        if let Err(e) = &result {
            tracing::error!("rules not reloaded, the previous rules stay in force:\n{e}");
        }
        result
    }

    /// Makes `new` the rules in force: new ports are checked for being free, then every worker
    /// switches over. Established connections are untouched.
    pub fn apply(&self, new: RuleSet) -> Result<(), RulesError> {
        let mut inner = self.lock();
        let old: Vec<SocketAddr> = inner.rules.pools.iter().map(|p| p.listen).collect();
        let mut errors = Vec::new();
        for pool in new.pools.iter().filter(|p| !old.contains(&p.listen)) {
            if let Err(e) = probe_bind(pool.listen) {
                let line = pool.rules.first().map(|r| r.line).unwrap_or(0);
                errors.push(RuleError {
                    file: self.config.rules_path.display().to_string(),
                    line,
                    field: "listen_port".into(),
                    message: format!("cannot listen on {}: {e}", pool.listen),
                });
            }
        }
        if !errors.is_empty() {
            return Err(RulesError(errors));
        }
        let specs = match inner.slots.assign(&new, &self.shared) {
            Ok(s) => s,
            Err(e) => {
                return Err(RulesError(vec![RuleError {
                    file: self.config.rules_path.display().to_string(),
                    line: 0,
                    field: "row".into(),
                    message: e.to_string(),
                }]))
            }
        };
        for w in inner.workers.iter_mut() {
            match w.ask(&Request::Apply {
                pools: specs.clone(),
            }) {
                Ok(Reply::Applied { errors }) => {
                    for e in errors {
                        tracing::error!(worker = w.index, "{e}");
                    }
                }
                Ok(_) => tracing::error!(worker = w.index, "unexpected reply to apply"),
                Err(e) => tracing::error!(worker = w.index, "reload not delivered: {e:#}"),
            }
        }
        log_changes(&inner.rules, &new);
        inner.rules = new;
        inner.specs = specs;
        Ok(())
    }

    /// The rules in force, the rules file's text as last read, and its version (for If-Match).
    pub fn rules(&self) -> (RuleSet, String, String) {
        let inner = self.lock();
        (
            inner.rules.clone(),
            inner.file_text.clone(),
            version(&inner.file_text),
        )
    }

    /// Validates `entries`, writes them to the rules file atomically (the previous file kept as
    /// `<file>.bak`), and applies them live. With `if_match`, refuses when the file changed since
    /// that version was read.
    pub fn write_entries(
        &self,
        entries: &[Entry],
        if_match: Option<&str>,
    ) -> Result<RuleSet, WriteError> {
        let _writing = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.config.rules_path.clone();
        let label = path.display().to_string();
        let text = rules::to_csv(entries);
        let set = rules::parse(&text, &label).map_err(WriteError::Invalid)?;
        let current_text = std::fs::read_to_string(&path).unwrap_or_default();
        let current = version(&current_text);
        if let Some(expected) = if_match {
            if expected.trim_matches('"') != current {
                return Err(WriteError::Stale { current });
            }
        }
        self.apply(set.clone()).map_err(WriteError::Invalid)?;
        write_atomically(&path, &text).map_err(|source| WriteError::Io {
            path: label.clone(),
            source,
        })?;
        let mut inner = self.lock();
        inner.file_stamp = stamp(&path);
        inner.file_text = text;
        tracing::info!("rules written to {label} ({} entries)", entries.len());
        Ok(set)
    }

    // ---- figures ---------------------------------------------------------------------------

    pub fn stats(&self) -> StatsSnapshot {
        let inner = self.lock();
        let now = now_ms();
        let header = self.shared.header();
        let mut active = 0;
        let pools = inner
            .specs
            .iter()
            .zip(&inner.rules.pools)
            .map(|(spec, pool)| {
                let p = self.shared.pool(spec.slot);
                PoolStats {
                    listen: spec.listen,
                    accepted: p.accepted.load(Relaxed),
                    unrouted: p.unrouted.load(Relaxed),
                    backends: spec
                        .backends
                        .iter()
                        .zip(&pool.rules)
                        .map(|(b, rule)| {
                            let s = self.shared.backend(b.slot);
                            active += s.active.load(Relaxed);
                            let down = s.is_down(now);
                            BackendStats {
                                name: b.name.clone(),
                                dest_ip: rule.entry.dest_ip.clone(),
                                dest_port: rule.entry.dest_port.clone(),
                                addr: b.addr,
                                state: if down { "down" } else { "up" }.into(),
                                active: s.active.load(Relaxed),
                                total: s.total.load(Relaxed),
                                bytes_up: s.bytes_up.load(Relaxed),
                                bytes_down: s.bytes_down.load(Relaxed),
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
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        StatsSnapshot {
            workers: self.config.workers,
            capacity: self.config.capacity,
            active,
            uptime_ms: now.saturating_sub(header.started_ms.load(Relaxed)),
            accept_pauses: header.accept_pauses.load(Relaxed),
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

    // ---- active health checks --------------------------------------------------------------

    fn start_health_checks(&self, interval: Duration) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("health".into())
            .spawn(move || loop {
                let backends: Vec<(usize, SocketAddr, String)> = {
                    let inner = me.lock();
                    inner
                        .specs
                        .iter()
                        .flat_map(|p| p.backends.iter().map(|b| (b.slot, b.addr, b.name.clone())))
                        .collect()
                };
                for (slot, addr, name) in backends {
                    let s = me.shared.backend(slot);
                    let result = std::net::TcpStream::connect_timeout(&addr, me.config.connect_timeout);
                    s.last_check_ms.store(now_ms(), Relaxed);
                    match result {
                        Ok(_) => {
                            if s.record_success() {
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

impl WorkerHandle {
    /// Sends one request and waits (up to the socket's read timeout) for its reply.
    fn ask(&mut self, request: &Request) -> anyhow::Result<Reply> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.control.write_all(&line).context("sending to worker")?;
        let mut reply = String::new();
        let n = self
            .replies
            .read_line(&mut reply)
            .context("reading worker reply")?;
        anyhow::ensure!(n > 0, "worker closed its control socket");
        Ok(serde_json::from_str(&reply)?)
    }
}

/// Checks that nothing else holds `addr`: a bind without listen, with SO_REUSEPORT like the
/// workers, fails only when a socket that does not share the port has it.
fn probe_bind(addr: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
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
            probe_bind(p.listen).err().map(|e| RuleError {
                file: file.to_string(),
                line: p.rules.first().map(|r| r.line).unwrap_or(0),
                field: "listen_port".into(),
                message: format!("cannot listen on {}: {e}", p.listen),
            })
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RulesError(errors))
    }
}

fn keep_across_exec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold; async-signal-safe.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn stamp(path: &Path) -> Option<(i64, i64, u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
}

/// A short version tag of the rules file's content, for ETag / If-Match.
pub fn version(text: &str) -> String {
    // FNV-1a: stable across runs, unlike the std hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Writes `text` to a temp file beside `path`, keeps the old file as `<path>.bak`, then renames.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    if path.exists() {
        std::fs::copy(path, dir.join(format!("{name}.bak")))?;
    }
    std::fs::rename(&tmp, path)
}

fn log_changes(old: &RuleSet, new: &RuleSet) {
    for p in &new.pools {
        match old.pools.iter().find(|o| o.listen == p.listen) {
            None => tracing::info!(listen = %p.listen, "new port: {}", describe_pool(p)),
            Some(o) if destinations(o) != destinations(p) => {
                tracing::info!(listen = %p.listen, "pool changed: {}", describe_pool(p))
            }
            Some(_) => {}
        }
    }
    for o in &old.pools {
        if !new.pools.iter().any(|p| p.listen == o.listen) {
            tracing::info!(listen = %o.listen, "port removed (established connections stay)");
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
        .map(|r| format!("{} {}", r.entry.name, r.dest))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the web page needs beyond the rules and figures (kept apart from the engine's code).
impl Supervisor {
    /// The rules file this supervisor reads, and the only file the web page may write.
    pub fn rules_path(&self) -> &Path {
        &self.config.rules_path
    }
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
