//! The parent process: starts the worker processes (this same binary with `--worker-index`),
//! collects their counter lines, prints a stats line per interval and a summary at exit, writes the
//! `--stats-file`, and restarts any worker that dies.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::{error, info, warn};

use crate::stats::{self, Snapshot, WorkerCounters, WorkerEntry};

/// Environment variable naming the supervisor's pid, so a worker can tell it was orphaned.
pub const PARENT_PID_ENV: &str = "SSL_ECHO_SERVER_PARENT_PID";
/// How often the supervisor looks at its workers and the clock.
const TICK: Duration = Duration::from_millis(50);
/// A worker that dies sooner than this after starting counts as a failed start.
const QUICK_DEATH: Duration = Duration::from_secs(2);
/// Failed starts in a row after which the supervisor gives up instead of looping.
const MAX_QUICK_DEATHS: u32 = 5;
/// How long workers get to report and exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// What the supervisor runs.
pub struct SupervisorConfig {
    pub listen: SocketAddr,
    pub plain: bool,
    pub workers: usize,
    pub stats_interval: Duration,
    pub stats_file: Option<PathBuf>,
    /// Arguments every worker gets (besides `--listen` and `--worker-index`).
    pub worker_args: Vec<String>,
}

/// One worker slot: the running process and what earlier processes in this slot did.
struct Slot {
    index: usize,
    child: Child,
    started: Instant,
    latest: Arc<Mutex<Option<WorkerCounters>>>,
    reader: Option<JoinHandle<()>>,
    /// Totals of earlier incarnations of this slot.
    retired: WorkerCounters,
    restarts: u64,
    quick_deaths: u32,
}

impl Slot {
    fn current(&self) -> WorkerCounters {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_default()
    }

    fn total(&self, live: bool) -> WorkerCounters {
        let mut t = self.retired;
        t.add(&self.current(), live);
        t
    }
}

pub struct Supervisor {
    cfg: SupervisorConfig,
    slots: Vec<Slot>,
    started: Instant,
}

impl Supervisor {
    /// Starts every worker and waits until each has bound its listener.
    pub fn start(cfg: SupervisorConfig) -> anyhow::Result<Supervisor> {
        let mut slots = Vec::with_capacity(cfg.workers);
        for index in 0..cfg.workers {
            let (child, latest, reader) = spawn_worker(&cfg, index)?;
            slots.push(Slot {
                index,
                child,
                started: Instant::now(),
                latest,
                reader: Some(reader),
                retired: WorkerCounters::default(),
                restarts: 0,
                quick_deaths: 0,
            });
        }
        let mut sup = Supervisor {
            cfg,
            slots,
            started: Instant::now(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        for i in 0..sup.slots.len() {
            loop {
                if sup.slots[i]
                    .latest
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some()
                {
                    break;
                }
                if let Some(status) = sup.slots[i].child.try_wait()? {
                    sup.stop_all();
                    bail!("worker {i} exited during start-up ({status}); its error is above");
                }
                if Instant::now() >= deadline {
                    sup.stop_all();
                    bail!("worker {i} did not start listening within 15 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(sup)
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
        let per_worker: Vec<String> = self
            .slots
            .iter()
            .map(|s| format!("{}={}", s.index, s.total(false).connections_total))
            .collect();
        info!(
            "summary: {} connections accepted (per worker: {}), {} handshakes ({} failed, {} timed out), \
             {} messages, {} bytes echoed, {} connection errors, {} worker restarts, up {:.1} s",
            totals.connections_total,
            per_worker.join(" "),
            totals.handshakes_total,
            totals.handshake_failures,
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
        for s in &self.slots {
            t.add(&s.total(true), true);
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
                .map(|s| {
                    let t = s.total(true);
                    WorkerEntry {
                        index: s.index,
                        pid: s.child.id(),
                        restarts: s.restarts,
                        connections_total: t.connections_total,
                        connections_now: t.connections_now,
                    }
                })
                .collect(),
        };
        if let Err(e) = stats::write_snapshot(path, &snapshot) {
            // Not fatal: the echo service matters more than its statistics.
            warn!("{}: cannot write stats file: {e}", path.display());
        }
    }

    /// Replaces workers that exited. Their last reported counters stay in the totals.
    fn restart_dead(&mut self) -> anyhow::Result<()> {
        for i in 0..self.slots.len() {
            let Some(status) = self.slots[i].child.try_wait()? else {
                continue;
            };
            let slot = &mut self.slots[i];
            // The pipe closed with the process: the reader has the final line once it ends.
            if let Some(reader) = slot.reader.take() {
                let _ = reader.join();
            }
            let last = slot.current();
            slot.retired.add(&last, false);
            let lived = slot.started.elapsed();
            slot.quick_deaths = if lived < QUICK_DEATH {
                slot.quick_deaths + 1
            } else {
                0
            };
            if slot.quick_deaths >= MAX_QUICK_DEATHS {
                error!(
                    "worker {i} died {} times in a row right after starting ({status}); giving up",
                    slot.quick_deaths
                );
                self.stop_all();
                bail!("worker {i} keeps dying; see its errors above");
            }
            warn!(
                "worker {i} (pid {}) died ({status}) with {} open connections; restarting",
                slot.child.id(),
                last.connections_now
            );
            let (child, latest, reader) = spawn_worker(&self.cfg, i)?;
            let slot = &mut self.slots[i];
            slot.child = child;
            slot.latest = latest;
            slot.reader = Some(reader);
            slot.started = Instant::now();
            slot.restarts += 1;
        }
        Ok(())
    }

    /// SIGTERM to every worker, a grace period to send their final counters, then SIGKILL.
    fn stop_all(&mut self) {
        for s in &self.slots {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe {
                libc::kill(s.child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for s in &mut self.slots {
            loop {
                match s.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        warn!("worker {} did not stop in time; killing it", s.index);
                        let _ = s.child.kill();
                        let _ = s.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            if let Some(reader) = s.reader.take() {
                let _ = reader.join();
            }
        }
    }
}

type Spawned = (Child, Arc<Mutex<Option<WorkerCounters>>>, JoinHandle<()>);

/// Starts worker `index`: this executable again, with its stdout as the counter pipe.
fn spawn_worker(cfg: &SupervisorConfig, index: usize) -> anyhow::Result<Spawned> {
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(&cfg.worker_args)
        .arg("--listen")
        .arg(cfg.listen.to_string())
        .arg("--worker-index")
        .arg(index.to_string())
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start worker {index}"))?;
    let stdout = child
        .stdout
        .take()
        .context("worker stdout was not captured")?;
    let latest = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&latest);
    let reader = std::thread::Builder::new()
        .name(format!("worker-{index}-stats"))
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<WorkerCounters>(&line) {
                    Ok(c) => *sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(c),
                    Err(e) => warn!("worker {index}: unreadable stats line {line:?}: {e}"),
                }
            }
        })
        .context("cannot start a stats reader thread")?;
    Ok((child, latest, reader))
}
