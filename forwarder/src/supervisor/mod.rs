//! The supervisor process: loads the rules, starts the worker processes and restarts any that
//! dies ([`workers`]), applies reloads (SIGHUP, a changed rules file, or the web page) without
//! dropping established connections ([`reload`]: how a reload reaches the workers), and owns
//! shutdown. One thread here owns every signal the process takes (HUP, TERM, INT, USR1). It
//! forwards no traffic itself, so nothing the web side does can stall forwarding.

mod names;
pub mod reload;
pub mod slots;
mod workers;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::control::{ConnectionInfo, PoolSpec, Reply, Request};
use crate::rules::file::{RulesFile, Snapshot, WriteError};
use crate::rules::{Entry, RuleSet};
use crate::service::signals::status_lines;
use crate::stats::snapshot::{self, Sizes, StatsSnapshot};
use crate::stats::{now_ms, Shared};
use crate::tcp::data_path::Choice;
use crate::worker::WorkerConfig;
pub use reload::{check_bindable, describe_pool};
use slots::Slots;
use workers::WorkerHandle;

/// How the supervisor runs its workers.
#[derive(Clone)]
pub struct SupervisorConfig {
    /// The rules file (the only file the web page may write).
    pub rules: Arc<RulesFile>,
    pub workers: usize,
    pub capacity: usize,
    /// UDP sessions the workers hold before evicting (one descriptor each).
    pub udp_capacity: usize,
    /// The settings every worker gets, as one frame on its control socket (the index is set
    /// per worker).
    pub worker: WorkerConfig,
    pub health_interval: Option<Duration>,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// The data path the workers use and why (`--data-path`, resolved at start).
    pub data_path: Choice,
    /// `--source`: the outbound address of backends without `source=` (one per family).
    pub default_sources: Vec<std::net::IpAddr>,
    /// Listening sockets a worker may hold ([`crate::capacity::listen_budget`]); every reload is
    /// checked against it as `--check` and the start were.
    pub listen_budget: usize,
    /// The nftables table that steers large TCP ranges to one listener, or why there is none.
    pub steering: Result<crate::steer::Steering, String>,
    /// How backend host names are re-resolved.
    pub dns: crate::dns::DnsConfig,
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

/// Events the supervisor loop reacts to.
enum Event {
    Reload,
    Shutdown,
    /// SIGUSR1: log the status lines; the workers reopen their access logs.
    Usr1,
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
        crate::ranges::check_limits(
            &rules,
            config.rules.label(),
            config.listen_budget,
            config.steering.as_ref().map(|_| ()).map_err(|s| s.as_str()),
        )?;
        let mut slots = Slots::default();
        let answers = names::first_answers(&config.dns, &rules)?;
        let mut specs = slots.assign(&rules, &answers, &shared)?;
        crate::outbound::apply_default_sources(&mut specs, &config.default_sources);
        shared.publish_rates(&specs);
        crate::ranges::mark_steered(&mut specs, &rules, config.steering.is_ok());
        if let Ok(steering) = &config.steering {
            // Also replaces a table a crashed run on the same rules file left behind.
            let ranges = crate::steer::steered_ranges(rules.pools.iter());
            steering
                .sync(&ranges)
                .with_context(|| format!("installing nftables table {}", steering.table))?;
            reload::log_steering(steering, &ranges);
        }
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
                Ok(Event::Usr1) => self.on_usr1(),
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

    /// SIGUSR1: logs the figures the web page shows (for a host without a browser), and passes
    /// the signal on to every worker, whose access log reopens its file (logrotate signals the
    /// supervisor's pid only).
    fn on_usr1(&self) {
        for line in status_lines(&self.stats()) {
            tracing::info!("{line}");
        }
        let inner = self.lock();
        for w in &inner.workers {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(w.child.id() as i32, libc::SIGUSR1);
            }
        }
        tracing::info!("SIGUSR1: workers reopen their access logs");
    }

    /// The one signal thread of the process: HUP, TERM, INT and USR1 become [`Event`]s for the
    /// run loop.
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
                        Event::Usr1
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

    /// The figures the web page and SIGUSR1 show, read from the shared counters.
    pub fn stats(&self) -> StatsSnapshot {
        let inner = self.lock();
        snapshot::read(
            &self.shared,
            &inner.rules,
            &inner.slots,
            Sizes {
                workers: self.config.workers,
                capacity: self.config.capacity,
                udp_capacity: self.config.udp_capacity,
                data_path: &self.config.data_path,
            },
            snapshot::Members {
                specs: &inner.specs,
                answers: &inner.answers,
                active_checks: self.config.health_interval.is_some(),
            },
        )
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
                // TCP backends only (a TCP connect says nothing about a UDP service), and not
                // the disabled ones: the operator took them out of checking too.
                let backends: Vec<crate::control::BackendSpec> = {
                    let inner = me.lock();
                    inner
                        .specs
                        .iter()
                        .filter(|p| p.proto == crate::rules::Proto::Tcp)
                        .flat_map(|p| p.backends.iter())
                        .filter(|b| b.options.admin != crate::rules::options::Admin::Disabled)
                        .cloned()
                        .collect()
                };
                for b in backends {
                    let (addr, name) = (b.addr, b.name);
                    let s = me.shared.backend(b.slot);
                    // From the row's outbound address, interface and mark: the path connections take.
                    let result = crate::outbound::connect_tcp_blocking(addr, &b.options, me.config.connect_timeout);
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

/// What the service side needs (kept apart from the engine's code).
impl Supervisor {
    /// Why the web page could not save the rules file, if it could not (a `--user` without
    /// write access, say).
    pub fn rules_write_problem(&self) -> Option<String> {
        crate::service::privilege::rules_write_problem(self.config.rules.path())
    }

    /// Every worker process is running (none exited since the last restart pass).
    pub fn workers_running(&self) -> bool {
        let mut inner = self.lock();
        inner
            .workers
            .iter_mut()
            .all(|w| matches!(w.child.try_wait(), Ok(None)))
    }
}
