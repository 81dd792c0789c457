//! The parent's side of a run: starts the shards (in this process, as worker processes, or on
//! agents on other PCs), shows progress, holds the one barrier across all of them (go only once
//! every shard's connections are up or failed), asks the forwarder who serves which connection,
//! and joins their records, histograms and timelines.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Local};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backends::{BackendMap, ForwarderApi};
use crate::config::{split, RunConfig, ShardPlan};
use crate::connector::Connector;
use crate::failure::{Cause, Failure, Phase};
use crate::interval::Intervals;
use crate::link::{self, AgentLink, FromAgent, ToAgent};
use crate::live::Display;
use crate::recorder::{merge_timeline, new_histogram, LiveSnapshot, Recorder, Second};
use crate::session::ConnectionRecord;
use crate::shard::{self, WorkerMsg};
use crate::worker::{BACKENDS, GO, STOP, WORKER_FLAG};

/// Descriptors each process keeps for itself (stdio, the runtime's epoll and wakers, pipes to
/// workers, the CA file, the report) besides one per connection.
pub const FD_RESERVE: u64 = 100;

/// Where the connections run.
pub enum Placement {
    /// On this PC, over this many processes (1 = in this process).
    Here { processes: u64 },
    /// On these agents (greeted already), each over as many processes as its open-file limit needs.
    Agents(Vec<AgentLink>),
}

/// What to do when an agent (or a worker process) is lost or too slow to reach the barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnLoss {
    /// Stop every other part of the run, write the report, exit non-zero.
    Stop,
    /// Count its connections as failed and go on with the others.
    Continue,
}

/// How the run is coordinated, besides the config.
pub struct Options {
    /// Draw the progress bar and live line (stderr is a terminal).
    pub show: bool,
    pub forwarder: Option<ForwarderApi>,
    /// Longest wait for every shard to reach the barrier.
    pub barrier_timeout: Duration,
    pub on_loss: OnLoss,
    /// `--json-lines`: one record per second of phase 2.
    pub json_lines: Option<std::path::PathBuf>,
    /// `--hdr-log`: HdrHistogram interval log.
    pub hdr_log: Option<std::path::PathBuf>,
}

/// One agent's (client PC's) part of the outcome.
pub struct AgentResult {
    pub name: String,
    pub processes: u64,
    /// Its shards' histograms merged (exact: the same buckets, counts added).
    pub response: Histogram<u64>,
    /// The same from the intended send time (`--rate`).
    pub corrected: Histogram<u64>,
}

/// The steady window and the drain of phase 2, over every process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    /// From the go to the end of sending: the deadline with `--duration`, else the last echo.
    pub send_window_s: f64,
    /// From the end of sending to the last echo.
    pub drain_s: f64,
    /// Echoes that arrived in the drain.
    pub drained: u64,
}

/// One process's CPU over phase 2, as its meter measured it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProcessCpu {
    pub process: u32,
    /// % of one core, averaged over phase 2.
    pub avg_pct: f64,
    /// The highest one-second figure.
    pub max_pct: f64,
    /// Threads running its connections (its ceiling is 100 % × threads).
    pub threads: u32,
}

/// A part of the run that was lost, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lost {
    pub who: String,
    pub reason: String,
}

/// Everything a run produced, joined across processes and agents.
pub struct Outcome {
    pub config: RunConfig,
    pub processes: u64,
    pub started_at: DateTime<Local>,
    pub ended_at: DateTime<Local>,
    /// Phase 1: from the first connect to the barrier.
    pub connect_s: f64,
    /// Phase 2: from the barrier until the last shard finished.
    pub exchange_s: f64,
    /// The steady window (what msg/s is measured over) and the drain.
    pub window: Window,
    /// How late every process's hiccup timer fired (µs), merged.
    pub hiccup: Histogram<u64>,
    /// Per process, in process order.
    pub cpu: Vec<ProcessCpu>,
    /// Seconds in which some process used more than 90 % of what its threads can get.
    pub saturated_seconds: u64,
    /// Per backend slot from the intended send time (`--rate`); alongside `backends`.
    pub backends_corrected: Vec<Histogram<u64>>,
    /// Why `--json-lines` or `--hdr-log` could not be written in full.
    pub streams_error: Option<String>,
    /// One per connection, sorted by id.
    pub records: Vec<ConnectionRecord>,
    pub response: Histogram<u64>,
    pub corrected: Histogram<u64>,
    pub timeline: Vec<Second>,
    /// Per agent, in `--agents` order; empty for a run on this PC.
    pub agents: Vec<AgentResult>,
    /// Who served which connection (with `--forwarder`), and one histogram per backend slot.
    pub backends: Option<(BackendMap, Vec<Histogram<u64>>)>,
    /// Why the forwarder could not be asked (then every connection's backend is unknown).
    pub backends_error: Option<String>,
    /// Agents (or worker processes) lost or too slow, in the order it happened.
    pub lost: Vec<Lost>,
    /// True when a loss stopped the run (`--on-agent-loss stop`).
    pub stopped_by_loss: bool,
}

/// What a shard sent, that it ended (with the reason if it ended badly), or that a whole agent
/// was lost.
pub(crate) enum Event {
    Msg(usize, WorkerMsg),
    Ended(usize, Option<String>),
    AgentLost(usize, String),
}

/// How the parent starts and stops one endpoint's phase 2 (an endpoint runs one or more shards).
pub(crate) enum Control {
    Local {
        recorder: Arc<Recorder>,
        go: Option<oneshot::Sender<Instant>>,
        stop: watch::Sender<bool>,
    },
    /// A worker's stdin; kept open until the run ends, because its end tells the worker the
    /// parent is gone.
    Worker(ChildStdin),
    /// The link to an agent; its end tells the agent the coordinator is gone.
    Agent(OwnedWriteHalf),
}

impl Control {
    pub(crate) async fn go(&mut self, at: Instant, backends: Option<&BackendMap>) {
        match self {
            Control::Local { recorder, go, .. } => {
                if let Some(map) = backends {
                    recorder.set_backends(map.clone());
                }
                if let Some(tx) = go.take() {
                    let _ = tx.send(at);
                }
            }
            Control::Worker(stdin) => {
                if let Some(map) = backends {
                    // Our own plain data: serialising cannot fail.
                    let json = serde_json::to_string(map).expect("backend map serialises");
                    send_line(stdin, &format!("{BACKENDS} {json}")).await;
                }
                send_line(stdin, GO).await
            }
            Control::Agent(w) => {
                let go = ToAgent::Go {
                    backends: backends.cloned(),
                };
                // A lost agent is reported by its reader.
                let _ = link::send(w, &go).await;
            }
        }
    }

    /// Ends phase 2 early, or abandons the run before the go.
    pub(crate) async fn stop(&mut self) {
        match self {
            Control::Local { go, stop, .. } => {
                go.take();
                let _ = stop.send(true);
            }
            Control::Worker(stdin) => send_line(stdin, STOP).await,
            Control::Agent(w) => {
                let _ = link::send(w, &ToAgent::Stop).await;
            }
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
    /// Index into the endpoints.
    endpoint: usize,
    progress: LiveSnapshot,
    connected: bool,
    finished: bool,
    ended: bool,
}

/// This process, one worker process, or one agent with its worker processes.
struct Endpoint {
    /// "worker process 1", "agent pc1:7000": how messages name it.
    who: String,
    /// The agent's name as given, for the report (`None` on this PC).
    agent: Option<String>,
    /// `None` once dropped.
    control: Option<Control>,
    /// Lost or too slow: the run no longer waits for it.
    dropped: bool,
    /// Why its missing connections are missing.
    missing_reason: String,
    response: Histogram<u64>,
    corrected: Histogram<u64>,
    processes: u64,
}

/// Splits the connections evenly over the agents, and each agent's share over as many processes
/// as its open-file limit needs.
pub fn split_over_agents(config: &RunConfig, nofile: &[u64]) -> Vec<Vec<ShardPlan>> {
    let agents = nofile.len().max(1) as u64;
    let (base, extra) = (config.connections / agents, config.connections % agents);
    let mut first_id = 0;
    let mut index = 0;
    nofile
        .iter()
        .enumerate()
        .map(|(i, &limit)| {
            let share = base + u64::from((i as u64) < extra);
            if share == 0 {
                return Vec::new();
            }
            let mut part = config.clone();
            part.connections = share;
            part.connect_rate = config.connect_rate * share as f64 / config.connections as f64;
            // In churn mode, sized for the connections open at once, not for all of them.
            let processes =
                testbed::fdlimit::processes_needed(part.open_at_once(), 1, FD_RESERVE, limit);
            let mut plans = split(&part, processes);
            for p in &mut plans {
                p.first_id += first_id;
                p.index = index;
                index += 1;
                p.config.connections = config.connections;
                p.config.connect_rate = config.connect_rate;
            }
            first_id += share;
            plans
        })
        .collect()
}

/// Runs the whole load.
pub async fn run(
    config: RunConfig,
    placement: Placement,
    opts: Options,
) -> anyhow::Result<Outcome> {
    // Checked here so a bad CA file is one clear error, not one per worker process or agent.
    let connector = Connector::new(&config)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let started_at = Local::now();
    let started = Instant::now();
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let mut shards: Vec<ShardState> = Vec::new();
    let mut plans: Vec<ShardPlan> = Vec::new();
    match placement {
        Placement::Here { processes } => {
            plans = split(&config, processes);
            for (i, plan) in plans.iter().enumerate() {
                let mut state = ShardState {
                    endpoint: i,
                    ..ShardState::default()
                };
                let control = if plans.len() == 1 {
                    let recorder = Arc::new(Recorder::default());
                    state.local = Some(Arc::clone(&recorder));
                    start_local(plan.clone(), connector.clone(), recorder, tx.clone())
                } else {
                    start_worker(i, plan, tx.clone())?
                };
                shards.push(state);
                endpoints.push(Endpoint {
                    who: format!("worker process {i}"),
                    agent: None,
                    control: Some(control),
                    dropped: false,
                    missing_reason: "worker process ended without reporting this connection"
                        .to_string(),
                    response: new_histogram(),
                    corrected: new_histogram(),
                    processes: 1,
                });
            }
        }
        Placement::Agents(links) => {
            let nofile: Vec<u64> = links.iter().map(|l| l.nofile).collect();
            let shares = split_over_agents(&config, &nofile);
            for (a, (mut link, agent_plans)) in links.into_iter().zip(shares).enumerate() {
                let first = plans.len();
                link::send(
                    &mut link.writer,
                    &ToAgent::Plans {
                        plans: agent_plans.clone(),
                    },
                )
                .await
                .with_context(|| format!("agent {}: sending its plans", link.name))?;
                for _ in &agent_plans {
                    shards.push(ShardState {
                        endpoint: a,
                        ..ShardState::default()
                    });
                }
                let count = agent_plans.len();
                plans.extend(agent_plans);
                tracing::info!("agent {} ({}): {count} processes", link.name, link.host);
                relay_agent(a, first, count, link.reader, tx.clone());
                endpoints.push(Endpoint {
                    who: format!("agent {}", link.name),
                    agent: Some(link.name.clone()),
                    control: Some(Control::Agent(link.writer)),
                    dropped: false,
                    missing_reason: format!(
                        "agent {} ended without reporting this connection",
                        link.name
                    ),
                    response: new_histogram(),
                    corrected: new_histogram(),
                    processes: count as u64,
                });
            }
        }
    }
    drop(tx);
    let processes = plans.len() as u64;

    let mut display = Display::new(config.connections, opts.show);
    let mut intervals = Intervals::new(
        shards.len(),
        config.rate.is_some(),
        opts.json_lines.as_deref(),
        opts.hdr_log.as_deref(),
    )?;
    let mut window = Window::default();
    let mut last_answer_s: f64 = 0.0;
    let mut hiccup = new_histogram();
    let mut cpu: Vec<ProcessCpu> = Vec::new();
    let mut backends_corrected: Vec<Histogram<u64>> = Vec::new();
    let mut records: Vec<ConnectionRecord> = Vec::with_capacity(config.connections as usize);
    let mut response = new_histogram();
    let mut corrected = new_histogram();
    let mut timeline: Vec<Second> = Vec::new();
    let mut backends: Option<(BackendMap, Vec<Histogram<u64>>)> = None;
    let mut backends_error = None;
    let mut lost: Vec<Lost> = Vec::new();
    let mut stopped_by_loss = false;
    let mut exchange_s: f64 = 0.0;
    let mut phase2 = false;
    let mut connect_s = 0.0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let barrier_deadline = tokio::time::Instant::now() + opts.barrier_timeout;
    let mut stopping = false;

    loop {
        if !phase2
            && !shards
                .iter()
                .any(|s| waiting(s, &endpoints) && !s.connected)
        {
            // The barrier: every connection of every shard still in the run is up or has failed.
            for s in &mut shards {
                if let Some(r) = &s.local {
                    s.progress = r.snapshot();
                }
            }
            let total = sum(&shards);
            connect_s = started.elapsed().as_secs_f64();
            match &config.churn {
                Some(churn) => display.churn_started(churn),
                None => display.connected(&total, started.elapsed()),
            }
            if let Some(api) = &opts.forwarder {
                let asked = Instant::now();
                let map = match api.connections_of_at_least(total.up).await {
                    Ok(map) => {
                        eprintln!(
                            "the forwarder listed {} connections over {} backends in {:.2} s",
                            map.clients.len(),
                            map.names.len(),
                            asked.elapsed().as_secs_f64()
                        );
                        map
                    }
                    Err(e) => {
                        let e = format!("asking the forwarder for its connections: {e:#}");
                        tracing::error!("{e}; every connection's backend is unknown");
                        backends_error = Some(e);
                        BackendMap::default()
                    }
                };
                let hists = (0..map.slots()).map(|_| new_histogram()).collect();
                backends = Some((map, hists));
            }
            let go_at = Instant::now();
            for e in endpoints.iter_mut().filter(|e| !e.dropped) {
                if let Some(control) = &mut e.control {
                    control.go(go_at, backends.as_ref().map(|(m, _)| m)).await;
                }
            }
            phase2 = true;
        }
        if !shards.iter().any(|s| waiting(s, &endpoints)) {
            break;
        }
        let mut newly_lost: Vec<(usize, String)> = Vec::new();
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                match event {
                    Event::Msg(i, WorkerMsg::Progress(p)) => shards[i].progress = p,
                    Event::Msg(i, WorkerMsg::Connected { .. }) => shards[i].connected = true,
                    Event::Msg(i, WorkerMsg::Connection(mut r)) => {
                        r.agent = endpoints[shards[i].endpoint].agent.clone();
                        records.push(*r);
                    }
                    Event::Msg(i, WorkerMsg::Interval(report)) => {
                        let live = sum(&shards);
                        intervals.add(i, report, (live.open, live.errors));
                    }
                    Event::Msg(i, WorkerMsg::Finished { exchange_s: s, response: r, corrected: c, timeline: t, by_backend, by_backend_corrected, window: w }) => {
                        r.merge_into(&mut response);
                        r.merge_into(&mut endpoints[shards[i].endpoint].response);
                        c.merge_into(&mut corrected);
                        c.merge_into(&mut endpoints[shards[i].endpoint].corrected);
                        window.send_window_s = window.send_window_s.max(w.send_window_s);
                        window.drained += w.drained;
                        last_answer_s = last_answer_s.max(w.last_answer_s);
                        w.hiccup.merge_into(&mut hiccup);
                        cpu.push(ProcessCpu {
                            process: plans[i].index,
                            avg_pct: w.cpu_pct_avg,
                            max_pct: w.cpu_pct_max,
                            threads: w.threads,
                        });
                        if backends_corrected.len() < by_backend_corrected.len() {
                            backends_corrected.resize_with(by_backend_corrected.len(), new_histogram);
                        }
                        for (h, d) in backends_corrected.iter_mut().zip(&by_backend_corrected) {
                            d.merge_into(h);
                        }
                        merge_timeline(&mut timeline, &t);
                        if let Some((_, hists)) = &mut backends {
                            for (h, d) in hists.iter_mut().zip(&by_backend) {
                                d.merge_into(h);
                            }
                        }
                        exchange_s = exchange_s.max(s);
                        shards[i].finished = true;
                    }
                    Event::Ended(i, problem) => {
                        shards[i].ended = true;
                        let who = shard_name(&endpoints, &shards, &plans, i);
                        if let Some(problem) = problem {
                            tracing::error!("{who}: {problem}");
                        } else if !shards[i].finished {
                            tracing::error!("{who} ended without its results");
                        }
                    }
                    Event::AgentLost(e, reason) => {
                        if !endpoints[e].dropped {
                            newly_lost.push((e, reason));
                        }
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => {
                if !phase2 || stopping {
                    // Nothing measured yet, or asked twice: leave now. Workers see their stdin
                    // close (agents their link) and end on their own.
                    display.finish();
                    eprintln!("interrupted");
                    std::process::exit(130);
                }
                stopping = true;
                display.finish();
                eprintln!("stopping: finishing the messages in flight (Ctrl-C again to quit at once)");
                for e in &mut endpoints {
                    if let Some(control) = &mut e.control {
                        control.stop().await;
                    }
                }
            }
            _ = tick.tick() => {
                for s in &mut shards {
                    if let Some(r) = &s.local {
                        s.progress = r.snapshot();
                    }
                }
                let total = sum(&shards);
                if phase2 { display.exchanging(&total, intervals.latest()) } else { display.connecting(&total) }
            }
            _ = tokio::time::sleep_until(barrier_deadline), if !phase2 => {
                for (e, endpoint) in endpoints.iter().enumerate() {
                    let slow: Vec<&ShardState> = shards
                        .iter()
                        .filter(|s| s.endpoint == e && !s.connected && !s.ended)
                        .collect();
                    if endpoint.dropped || slow.is_empty() {
                        continue;
                    }
                    let done: u64 = slow.iter().map(|s| s.progress.phase1_done()).sum();
                    let planned: u64 = plans
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| shards[*i].endpoint == e && !shards[*i].connected)
                        .map(|(_, p)| p.connections)
                        .sum();
                    newly_lost.push((e, format!(
                        "did not reach the barrier within {} s ({done} of {planned} connections opened or failed)",
                        opts.barrier_timeout.as_secs_f64()
                    )));
                }
            }
        }
        for (e, reason) in newly_lost {
            let who = endpoints[e].who.clone();
            display.finish();
            eprintln!("{who} lost: {reason}");
            lost.push(Lost {
                who: who.clone(),
                reason: reason.clone(),
            });
            drop_endpoint(&mut endpoints[e], format!("{who} lost: {reason}")).await;
            if opts.on_loss == OnLoss::Stop && !stopped_by_loss {
                stopped_by_loss = true;
                eprintln!("stopping the run (--on-agent-loss stop)");
                for e in &mut endpoints {
                    if let Some(control) = &mut e.control {
                        control.stop().await;
                    }
                }
            }
        }
    }
    display.finish();
    if !phase2 {
        connect_s = started.elapsed().as_secs_f64();
    }
    let live = sum(&shards);
    let streams_error = intervals.finish((live.open, live.errors));
    if let Some(e) = &streams_error {
        tracing::error!("{e}");
    }
    window.drain_s = (last_answer_s - window.send_window_s).max(0.0);
    cpu.sort_by_key(|c| c.process);
    let reasons: Vec<String> = shards
        .iter()
        .map(|s| endpoints[s.endpoint].missing_reason.clone())
        .collect();
    drop(
        endpoints
            .iter_mut()
            .map(|e| e.control.take())
            .collect::<Vec<_>>(),
    );
    fill_missing(&mut records, &plans, &reasons);
    for r in &mut records {
        if r.agent.is_none() {
            r.agent = shards
                .get(r.process as usize)
                .and_then(|s| endpoints[s.endpoint].agent.clone());
        }
    }
    let agents = endpoints
        .into_iter()
        .filter_map(|e| {
            e.agent.map(|name| AgentResult {
                name,
                processes: e.processes,
                response: e.response,
                corrected: e.corrected,
            })
        })
        .collect();
    Ok(Outcome {
        config,
        processes,
        started_at,
        ended_at: Local::now(),
        connect_s,
        exchange_s,
        window,
        hiccup,
        cpu,
        saturated_seconds: intervals.saturated_seconds,
        backends_corrected,
        streams_error,
        records,
        response,
        corrected,
        timeline,
        agents,
        backends,
        backends_error,
        lost,
        stopped_by_loss,
    })
}

/// True while the run still waits for this shard.
fn waiting(s: &ShardState, endpoints: &[Endpoint]) -> bool {
    !(s.ended || endpoints[s.endpoint].dropped)
}

/// Tells a lost endpoint to stop and closes its control (an agent then stops its workers); the
/// run no longer waits for it, and its connections with no record count as failed for `reason`.
async fn drop_endpoint(endpoint: &mut Endpoint, reason: String) {
    if let Some(mut control) = endpoint.control.take() {
        control.stop().await;
    }
    endpoint.dropped = true;
    endpoint.missing_reason = reason;
}

fn shard_name(
    endpoints: &[Endpoint],
    shards: &[ShardState],
    plans: &[ShardPlan],
    i: usize,
) -> String {
    let e = &endpoints[shards[i].endpoint];
    match &e.agent {
        Some(_) => {
            let first = shards
                .iter()
                .position(|s| s.endpoint == shards[i].endpoint)
                .unwrap_or(i);
            format!(
                "{}, process {}",
                e.who,
                plans[i].index as usize - plans[first].index as usize
            )
        }
        None => e.who.clone(),
    }
}

fn sum(shards: &[ShardState]) -> LiveSnapshot {
    let mut total = LiveSnapshot::default();
    for s in shards {
        total.add(&s.progress);
    }
    total
}

/// Connections whose record never arrived (their worker process or agent was lost) are counted
/// as failed, so the report always has one row per connection.
fn fill_missing(records: &mut Vec<ConnectionRecord>, plans: &[ShardPlan], reasons: &[String]) {
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
    for (plan, reason) in plans.iter().zip(reasons) {
        for id in plan.first_id..plan.first_id + plan.connections {
            if !seen[id as usize] {
                let mut r = ConnectionRecord::new(id, plan.index);
                r.failure = Some(Failure::new(Cause::Other, Phase::Exchange, reason));
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
    tx: mpsc::UnboundedSender<Event>,
) -> Control {
    let (go_tx, go_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let emit_tx = tx.clone();
    let emit: shard::Emit = Arc::new(move |msg| {
        let _ = emit_tx.send(Event::Msg(0, msg));
    });
    let shard_recorder = Arc::clone(&recorder);
    tokio::spawn(async move {
        let go = async { go_rx.await.ok() };
        shard::drive(plan, connector, shard_recorder, emit, go, stop_rx).await;
        let _ = tx.send(Event::Ended(0, None));
    });
    Control::Local {
        recorder,
        go: Some(go_tx),
        stop: stop_tx,
    }
}

/// Reads an agent's link: its workers' messages become events of shards `first..first + count`;
/// when the link ends, the agent is lost (unless every one of its workers had ended).
fn relay_agent(
    endpoint: usize,
    first: usize,
    count: usize,
    mut reader: link::Reader,
    tx: mpsc::UnboundedSender<Event>,
) {
    tokio::spawn(async move {
        let mut ended = vec![false; count];
        let why = loop {
            match link::recv::<FromAgent>(&mut reader).await {
                Ok(Some(FromAgent::Shard { shard, msg })) if shard < count => {
                    let _ = tx.send(Event::Msg(first + shard, msg));
                }
                Ok(Some(FromAgent::Ended { shard, problem })) if shard < count => {
                    ended[shard] = true;
                    let _ = tx.send(Event::Ended(first + shard, problem));
                    if ended.iter().all(|e| *e) {
                        return;
                    }
                }
                Ok(Some(other)) => break format!("unexpected message {other:?}"),
                Ok(None) => break "the connection to it closed".to_string(),
                Err(e) => break format!("the connection to it failed: {e:#}"),
            }
        };
        let _ = tx.send(Event::AgentLost(endpoint, why));
    });
}

/// Re-executes this binary as worker `i`; a task forwards its stdout lines as events.
pub(crate) fn start_worker(
    i: usize,
    plan: &ShardPlan,
    tx: mpsc::UnboundedSender<Event>,
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
                        let _ = tx.send(Event::Msg(i, msg));
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
        let _ = tx.send(Event::Ended(i, problem));
    });
    Ok(Control::Worker(stdin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Workload;

    #[test]
    fn agents_share_the_connections_and_each_share_its_processes() {
        let config = RunConfig {
            host: "gw".into(),
            addr: "127.0.0.1:9".parse().unwrap(),
            server_name: "gw".into(),
            ca: None,
            message: "m".into(),
            workload: Workload::Count(1),
            connections: 40_001,
            connect_rate: 400.0,
            rate: None,
            timeout_ms: 1,
            source_ips: Vec::new(),
            tls_options: Default::default(),
            churn: None,
            max_connecting: 500,
            keepalive_ms: 0,
            payload: None,
        };
        // One agent with room for 20,000 per process, one with 10,000.
        let split = split_over_agents(&config, &[20_000, 10_000]);
        let sizes: Vec<Vec<u64>> = split
            .iter()
            .map(|a| a.iter().map(|p| p.connections).collect())
            .collect();
        assert_eq!(sizes, vec![vec![10_001, 10_000], vec![6_667, 6_667, 6_666]]);
        let all: Vec<&ShardPlan> = split.iter().flatten().collect();
        let indexes: Vec<u32> = all.iter().map(|p| p.index).collect();
        assert_eq!(indexes, [0, 1, 2, 3, 4]);
        let mut next = 0;
        for p in &all {
            assert_eq!(p.first_id, next, "ids run on across agents");
            next += p.connections;
            assert_eq!(p.config.connections, 40_001);
        }
        assert_eq!(next, 40_001);
        let rate: f64 = all.iter().map(|p| p.connect_rate).sum();
        assert!((rate - 400.0).abs() < 1e-9);
    }
}
