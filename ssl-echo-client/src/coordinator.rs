//! The parent's side of a run: starts the shards (in this process, or as worker processes),
//! shows progress, holds the one barrier across all of them (go only once every shard's
//! connections are up or failed), and joins their records, histograms and timelines.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Local};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{split, RunConfig, ShardPlan};
use crate::connector::Connector;
use crate::failure::{Cause, Failure, Phase};
use crate::live::Display;
use crate::recorder::{merge_timeline, new_histogram, LiveSnapshot, Recorder, Second};
use crate::session::ConnectionRecord;
use crate::shard::{self, WorkerMsg};
use crate::worker::{GO, STOP, WORKER_FLAG};

/// Everything a run produced, joined across processes.
pub struct Outcome {
    pub config: RunConfig,
    pub processes: u64,
    pub started_at: DateTime<Local>,
    pub ended_at: DateTime<Local>,
    /// Phase 1: from the first connect to the barrier.
    pub connect_s: f64,
    /// Phase 2: from the barrier until the last shard finished.
    pub exchange_s: f64,
    /// One per connection, sorted by id.
    pub records: Vec<ConnectionRecord>,
    pub response: Histogram<u64>,
    pub corrected: Histogram<u64>,
    pub timeline: Vec<Second>,
}

/// What a shard sent, or that it ended (with the reason if it ended badly).
enum Event {
    Msg(WorkerMsg),
    Ended(Option<String>),
}

/// How the parent starts and stops a shard's phase 2.
enum Control {
    Local {
        go: Option<oneshot::Sender<Instant>>,
        stop: watch::Sender<bool>,
    },
    /// A worker's stdin; kept open until the run ends, because its end tells the worker the
    /// parent is gone.
    Worker(ChildStdin),
}

impl Control {
    async fn go(&mut self, at: Instant) {
        match self {
            Control::Local { go, .. } => {
                if let Some(tx) = go.take() {
                    let _ = tx.send(at);
                }
            }
            Control::Worker(stdin) => send_line(stdin, GO).await,
        }
    }

    async fn stop(&mut self) {
        match self {
            Control::Local { stop, .. } => {
                let _ = stop.send(true);
            }
            Control::Worker(stdin) => send_line(stdin, STOP).await,
        }
    }
}

async fn send_line(stdin: &mut ChildStdin, line: &str) {
    // A worker that died already has reported (or will report) its end; nothing to do.
    let _ = stdin.write_all(format!("{line}\n").as_bytes()).await;
    let _ = stdin.flush().await;
}

#[derive(Default)]
struct ShardState {
    /// The in-process shard's counters, read directly on every tick.
    local: Option<Arc<Recorder>>,
    progress: LiveSnapshot,
    connected: bool,
    finished: bool,
    ended: bool,
}

/// Runs the whole load over `processes` shards.
pub async fn run(config: RunConfig, processes: u64, show: bool) -> anyhow::Result<Outcome> {
    let plans = split(&config, processes);
    let processes = plans.len() as u64;
    // Checked here so a bad CA file is one clear error, not one per worker process.
    let connector = Connector::new(&config)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let started_at = Local::now();
    let started = Instant::now();
    let mut controls = Vec::with_capacity(plans.len());
    let mut shards: Vec<ShardState> = plans.iter().map(|_| ShardState::default()).collect();
    if plans.len() == 1 {
        let recorder = Arc::new(Recorder::default());
        shards[0].local = Some(Arc::clone(&recorder));
        controls.push(start_local(
            plans[0].clone(),
            connector,
            recorder,
            tx.clone(),
        ));
    } else {
        for (i, plan) in plans.iter().enumerate() {
            controls.push(start_worker(i, plan, tx.clone())?);
        }
    }
    drop(tx);

    let mut display = Display::new(config.connections, show);
    let mut records: Vec<ConnectionRecord> = Vec::with_capacity(config.connections as usize);
    let mut response = new_histogram();
    let mut corrected = new_histogram();
    let mut timeline: Vec<Second> = Vec::new();
    let mut exchange_s: f64 = 0.0;
    let mut phase2 = false;
    let mut connect_s = 0.0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut stopping = false;

    loop {
        if !phase2 && shards.iter().all(|s| s.connected || s.ended) {
            // The barrier: every connection of every shard is up or has failed.
            for s in &mut shards {
                if let Some(r) = &s.local {
                    s.progress = r.snapshot();
                }
            }
            let total = sum(&shards);
            connect_s = started.elapsed().as_secs_f64();
            display.connected(&total, started.elapsed());
            let go_at = Instant::now();
            for control in &mut controls {
                control.go(go_at).await;
            }
            phase2 = true;
        }
        if shards.iter().all(|s| s.ended) {
            break;
        }
        tokio::select! {
            event = rx.recv() => {
                let Some((i, event)) = event else { break };
                match event {
                    Event::Msg(WorkerMsg::Progress(p)) => shards[i].progress = p,
                    Event::Msg(WorkerMsg::Connected { .. }) => shards[i].connected = true,
                    Event::Msg(WorkerMsg::Connection(r)) => records.push(r),
                    Event::Msg(WorkerMsg::Finished { exchange_s: s, response: r, corrected: c, timeline: t }) => {
                        r.merge_into(&mut response);
                        c.merge_into(&mut corrected);
                        merge_timeline(&mut timeline, &t);
                        exchange_s = exchange_s.max(s);
                        shards[i].finished = true;
                    }
                    Event::Ended(problem) => {
                        shards[i].ended = true;
                        if let Some(problem) = problem {
                            tracing::error!("worker process {i}: {problem}");
                        } else if !shards[i].finished {
                            tracing::error!("worker process {i} ended without its results");
                        }
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => {
                if !phase2 || stopping {
                    // Nothing measured yet, or asked twice: leave now. Workers see their stdin
                    // close and end on their own.
                    display.finish();
                    eprintln!("interrupted");
                    std::process::exit(130);
                }
                stopping = true;
                display.finish();
                eprintln!("stopping: finishing the messages in flight (Ctrl-C again to quit at once)");
                for control in &mut controls {
                    control.stop().await;
                }
            }
            _ = tick.tick() => {
                for s in &mut shards {
                    if let Some(r) = &s.local {
                        s.progress = r.snapshot();
                    }
                }
                let total = sum(&shards);
                if phase2 { display.exchanging(&total) } else { display.connecting(&total) }
            }
        }
    }
    display.finish();
    drop(controls);
    if !phase2 {
        connect_s = started.elapsed().as_secs_f64();
    }
    fill_missing(&mut records, &plans);
    Ok(Outcome {
        config,
        processes,
        started_at,
        ended_at: Local::now(),
        connect_s,
        exchange_s,
        records,
        response,
        corrected,
        timeline,
    })
}

fn sum(shards: &[ShardState]) -> LiveSnapshot {
    let mut total = LiveSnapshot::default();
    for s in shards {
        total.add(&s.progress);
    }
    total
}

/// Connections whose record never arrived (their worker process died) are counted as failed,
/// so the report always has one row per connection.
fn fill_missing(records: &mut Vec<ConnectionRecord>, plans: &[ShardPlan]) {
    records.sort_by_key(|r| r.id);
    records.dedup_by_key(|r| r.id);
    let total: u64 = plans.iter().map(|p| p.connections).sum();
    if records.len() as u64 == total {
        return;
    }
    let mut seen = vec![false; total as usize];
    for r in records.iter() {
        if let Some(s) = seen.get_mut(r.id as usize) {
            *s = true;
        }
    }
    for plan in plans {
        for id in plan.first_id..plan.first_id + plan.connections {
            if !seen[id as usize] {
                let mut r = ConnectionRecord::new(id, plan.index);
                r.failure = Some(Failure::new(
                    Cause::Other,
                    Phase::Exchange,
                    "worker process ended without reporting this connection",
                ));
                records.push(r);
            }
        }
    }
    records.sort_by_key(|r| r.id);
}

fn start_local(
    plan: ShardPlan,
    connector: Connector,
    recorder: Arc<Recorder>,
    tx: mpsc::UnboundedSender<(usize, Event)>,
) -> Control {
    let (go_tx, go_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let emit_tx = tx.clone();
    let emit: shard::Emit = Arc::new(move |msg| {
        let _ = emit_tx.send((0, Event::Msg(msg)));
    });
    tokio::spawn(async move {
        let go = async { go_rx.await.ok() };
        shard::drive(plan, connector, recorder, emit, go, stop_rx).await;
        let _ = tx.send((0, Event::Ended(None)));
    });
    Control::Local {
        go: Some(go_tx),
        stop: stop_tx,
    }
}

/// Re-executes this binary as worker `i`; a task forwards its stdout lines as events.
fn start_worker(
    i: usize,
    plan: &ShardPlan,
    tx: mpsc::UnboundedSender<(usize, Event)>,
) -> anyhow::Result<Control> {
    let exe = std::env::current_exe().context("finding this program to start worker processes")?;
    let plan_json = serde_json::to_string(plan)?;
    let mut child: Child = Command::new(&exe)
        .arg(WORKER_FLAG)
        .arg(plan_json)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting worker process {i} ({})", exe.display()))?;
    // Both were requested as pipes just above.
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut problem = None;
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<WorkerMsg>(&line) {
                    Ok(msg) => {
                        let _ = tx.send((i, Event::Msg(msg)));
                    }
                    Err(e) => {
                        problem = Some(format!("unreadable line from worker: {e}: {line:.200}"));
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    problem = Some(format!("reading worker output: {e}"));
                    break;
                }
            }
        }
        if problem.is_some() {
            let _ = child.start_kill();
        }
        match child.wait().await {
            Ok(status) if !status.success() && problem.is_none() => {
                problem = Some(format!("exited with {status}"));
            }
            Err(e) => problem = Some(format!("waiting for it: {e}")),
            _ => {}
        }
        let _ = tx.send((i, Event::Ended(problem)));
    });
    Ok(Control::Worker(stdin))
}
