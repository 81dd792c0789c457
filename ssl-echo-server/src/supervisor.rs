//! The parent process: starts the worker processes (this same binary with `--worker-index`),
//! reads their counters from shared memory, prints a stats line per interval and a summary at
//! exit, writes the `--stats-file`, and restarts any worker that dies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::{error, info, warn};

use crate::shared::SharedStats;
use crate::stats::{self, Snapshot, WorkerCounters, WorkerEntry};

/// How often the supervisor looks at its workers and the clock.
const TICK: Duration = Duration::from_millis(50);
/// A worker that dies sooner than this after starting counts as a failed start.
const QUICK_DEATH: Duration = Duration::from_secs(2);
/// Failed starts in a row after which the supervisor gives up instead of looping.
const MAX_QUICK_DEATHS: u32 = 5;
/// How long workers get to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a new worker may take to bind its listener.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// What the supervisor runs.
pub struct SupervisorConfig {
    pub listen: SocketAddr,
    pub plain: bool,
    pub workers: usize,
    pub stats_interval: Duration,
    pub stats_file: Option<PathBuf>,
    /// Arguments every worker gets (besides `--listen`, `--worker-index`, `--stats-fd`).
    pub worker_args: Vec<String>,
}

/// One worker slot: the process running in it now.
struct Slot {
    child: Child,
    started: Instant,
    restarts: u64,
    quick_deaths: u32,
}

pub struct Supervisor {
    cfg: SupervisorConfig,
    shared: SharedStats,
    slots: Vec<Slot>,
    started: Instant,
}

impl Supervisor {
    /// Starts every worker and waits until each has bound its listener.
    pub fn start(cfg: SupervisorConfig) -> anyhow::Result<Supervisor> {
        let shared = SharedStats::create(cfg.workers).context("cannot create shared counters")?;
        let mut sup = Supervisor {
            cfg,
            shared,
            slots: Vec::new(),
            started: Instant::now(),
        };
        for index in 0..sup.cfg.workers {
            match spawn_worker(&sup.cfg, &sup.shared, index) {
                Ok(child) => sup.slots.push(Slot {
                    child,
                    started: Instant::now(),
                    restarts: 0,
                    quick_deaths: 0,
                }),
                Err(e) => {
                    sup.stop_all();
                    return Err(e);
                }
            }
        }
        for index in 0..sup.slots.len() {
            if let Err(e) = sup.wait_ready(index) {
                sup.stop_all();
                return Err(e);
            }
        }
        sup.started = Instant::now();
        Ok(sup)
    }

    /// Waits until the worker in `index` has stored its pid (it does so once listening).
    fn wait_ready(&mut self, index: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let slot = &mut self.slots[index];
        while self.shared.pid(index) != u64::from(slot.child.id()) {
            if let Some(status) = slot.child.try_wait()? {
                bail!("worker {index} exited during start-up ({status}); its error is above");
            }
            if Instant::now() >= deadline {
                bail!(
                    "worker {index} did not start listening within {} s",
                    START_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Runs until `stop` is set (SIGINT/SIGTERM), then stops the workers and prints the summary.
    pub fn run(mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut last_line = self.totals();
        let mut last_line_at = Instant::now();
        self.write_stats_file(false);
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            if stop.load(Ordering::SeqCst) {
                break;
            }
            self.restart_dead()?;
            let now = Instant::now();
            let elapsed = now - last_line_at;
            if elapsed >= self.cfg.stats_interval {
                let totals = self.totals();
                info!(
                    "stats: {}",
                    stats::stats_line(&last_line, &totals, elapsed.as_secs_f64())
                );
                self.write_stats_file(false);
                last_line = totals;
                last_line_at = now;
            }
        }
        info!("stopping {} worker(s)", self.slots.len());
        self.stop_all();
        let totals = self.totals();
        let per_worker: Vec<String> = (0..self.slots.len())
            .map(|i| format!("{i}={}", self.shared.read(i).connections_total))
            .collect();
        info!(
            "summary: {} connections accepted (per worker: {}), {} handshakes ({} TLS 1.3, {} TLS 1.2, \
             {} resumed; {} failed, {} of them client certificates refused; {} timed out), \
             {} messages, {} bytes echoed, {} connection errors, {} worker restarts, up {:.1} s",
            totals.connections_total,
            per_worker.join(" "),
            totals.handshakes_total,
            totals.tls13_handshakes,
            totals.tls12_handshakes,
            totals.resumed_handshakes,
            totals.handshake_failures,
            totals.client_cert_refused,
            totals.handshake_timeouts,
            totals.messages_echoed,
            totals.bytes_echoed,
            totals.connection_errors,
            self.slots.iter().map(|s| s.restarts).sum::<u64>(),
            self.started.elapsed().as_secs_f64()
        );
        self.write_stats_file(true);
        Ok(())
    }

    fn totals(&self) -> WorkerCounters {
        let mut t = WorkerCounters::default();
        for i in 0..self.slots.len() {
            t.add(&self.shared.read(i));
        }
        t
    }

    fn write_stats_file(&self, final_report: bool) {
        let Some(path) = &self.cfg.stats_file else {
            return;
        };
        let snapshot = Snapshot {
            totals: self.totals(),
            workers: self.slots.len(),
            plain: self.cfg.plain,
            listen: self.cfg.listen.to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            worker_restarts: self.slots.iter().map(|s| s.restarts).sum(),
            final_report,
            per_worker: self
                .slots
                .iter()
                .enumerate()
                .map(|(index, s)| {
                    let c = self.shared.read(index);
                    WorkerEntry {
                        index,
                        pid: s.child.id(),
                        restarts: s.restarts,
                        connections_total: c.connections_total,
                        connections_now: c.connections_now,
                    }
                })
                .collect(),
        };
        if let Err(e) = stats::write_snapshot(path, &snapshot) {
            // Not fatal: the echo service matters more than its statistics.
            warn!("{}: cannot write stats file: {e}", path.display());
        }
    }

    /// Replaces workers that exited. What they counted stays in their slot.
    fn restart_dead(&mut self) -> anyhow::Result<()> {
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            let Some(status) = slot.child.try_wait()? else {
                continue;
            };
            let open = self.shared.read(index).connections_now;
            self.shared.clear_dead(index);
            slot.quick_deaths = if slot.started.elapsed() < QUICK_DEATH {
                slot.quick_deaths + 1
            } else {
                0
            };
            if slot.quick_deaths >= MAX_QUICK_DEATHS {
                error!(
                    "worker {index} died {} times in a row right after starting ({status}); giving up",
                    slot.quick_deaths
                );
                self.stop_all();
                bail!("worker {index} keeps dying; see its errors above");
            }
            warn!(
                "worker {index} (pid {}) died ({status}) with {open} open connections; restarting",
                slot.child.id()
            );
            slot.child = spawn_worker(&self.cfg, &self.shared, index)?;
            slot.started = Instant::now();
            slot.restarts += 1;
            // Not waiting for it to listen: the other workers keep serving meanwhile.
        }
        Ok(())
    }

    /// SIGTERM to every worker, a grace period, then SIGKILL.
    fn stop_all(&mut self) {
        for s in &self.slots {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe {
                libc::kill(s.child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for (index, s) in self.slots.iter_mut().enumerate() {
            loop {
                match s.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        warn!("worker {index} did not stop in time; killing it");
                        let _ = s.child.kill();
                        let _ = s.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }
}

/// Starts worker `index`: this executable again, told which shared slot is its own.
fn spawn_worker(
    cfg: &SupervisorConfig,
    shared: &SharedStats,
    index: usize,
) -> anyhow::Result<Child> {
    // The counters' memfd is made without close-on-exec, so it needs no listing here.
    testbed::workers::worker_command(&[])
        .context("cannot find my own executable")?
        .args(&cfg.worker_args)
        .arg("--listen")
        .arg(cfg.listen.to_string())
        .arg("--worker-index")
        .arg(index.to_string())
        .arg("--stats-fd")
        .arg(shared.raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start worker {index}"))
}
