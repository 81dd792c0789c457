//! The worker-process side of a multi-process run. The parent re-executes this binary with a
//! hidden `--worker-plan JSON`; the worker runs its shard, writes [`WorkerMsg`]s to stdout as JSON
//! lines, and waits for the line `go` on stdin before phase 2 (preceded, with `--forwarder`, by
//! `backends JSON`: who serves which connection); `stop` (or the end of stdin: the parent is
//! gone) ends phase 2 early, or abandons the run before the go. Workers ignore SIGINT: a Ctrl-C on the terminal reaches the
//! whole process group, and it is the parent that decides how the run ends.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{oneshot, watch};

use crate::config::ShardPlan;
use crate::connector::Connector;
use crate::recorder::Recorder;
use crate::shard::{self, WorkerMsg, PROGRESS_EVERY};

/// The hidden flag that turns the binary into a worker.
pub const WORKER_FLAG: &str = "--worker-plan";

/// The line the parent sends on stdin to start phase 2.
pub const GO: &str = "go";
/// The line the parent sends on stdin to end phase 2 early.
pub const STOP: &str = "stop";
/// The start of the line that carries the [`crate::backends::BackendMap`] (JSON after a space).
pub const BACKENDS: &str = "backends";

/// Runs one worker process to the end.
pub fn main(plan_json: &str) -> anyhow::Result<()> {
    let plan: ShardPlan =
        serde_json::from_str(plan_json).context("worker plan is not valid JSON")?;
    testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    // SAFETY: setting a signal disposition to SIG_IGN has no handler to race with.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cpus / plan.processes.max(1) as usize).max(1);
    // One thread: the current-thread scheduler. Its run queue is one FIFO, so every connection
    // woken by an echo runs in the order it was woken. The multi-thread scheduler with one
    // worker keeps a 256-slot local queue and a LIFO slot, and pushes the overflow to a global
    // queue it looks at only every few dozen polls: with 10,000 connections waking at once,
    // those in the global queue waited seconds while the others went round again (the
    // unfairness seen at 20,000 connections).
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    let result = runtime.block_on(run(plan));
    // Not a plain drop: that would wait for the blocking thread still reading stdin, which the
    // parent keeps open until this process has exited.
    runtime.shutdown_background();
    result
}

async fn run(plan: ShardPlan) -> anyhow::Result<()> {
    let connector = Connector::new(&plan.config)?;
    let recorder = Arc::new(Recorder::default());
    let (tx, rx) = std::sync::mpsc::channel::<WorkerMsg>();
    let writer = {
        let recorder = Arc::clone(&recorder);
        std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || write_messages(rx, &recorder))
            .context("starting the stdout thread")?
    };
    let emit: shard::Emit = Arc::new(move |msg| {
        let _ = tx.send(msg);
    });
    let (go_tx, go_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stdin_recorder = Arc::clone(&recorder);
    tokio::spawn(async move {
        let mut go_tx = Some(go_tx);
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(json) = line
                .strip_prefix(BACKENDS)
                .and_then(|l| l.strip_prefix(' '))
            {
                match serde_json::from_str(json) {
                    Ok(map) => stdin_recorder.set_backends(map),
                    Err(e) => tracing::error!("unreadable backends from the parent: {e}"),
                }
                continue;
            }
            match line.trim() {
                GO => {
                    if let Some(tx) = go_tx.take() {
                        let _ = tx.send(Instant::now());
                    }
                }
                STOP => break,
                other => tracing::warn!("ignoring {other:?} from the parent"),
            }
        }
        // `stop`, or the parent is gone. Before `go` the dropped sender abandons the run.
        let _ = stop_tx.send(true);
    });
    let go = async { go_rx.await.ok() };
    shard::drive(plan, connector, recorder, emit, go, stop_rx).await;
    // `emit` (and with it the sender) was dropped by drive; the writer drains and ends.
    let _ = writer.join();
    Ok(())
}

/// The stdout thread: forwards the shard's messages as JSON lines and adds a `Progress` line
/// every [`PROGRESS_EVERY`]. A thread of its own, so the live counters reach the parent on time
/// even when thousands of busy connections keep the async runtime's one thread saturated.
fn write_messages(rx: std::sync::mpsc::Receiver<WorkerMsg>, recorder: &Recorder) {
    use std::io::Write;
    use std::sync::mpsc::RecvTimeoutError;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut last_progress = Instant::now();
    loop {
        let msg = match rx.recv_timeout(PROGRESS_EVERY) {
            Ok(msg) => Some(msg),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut urgent = false;
        if let Some(msg) = &msg {
            urgent = !matches!(msg, WorkerMsg::Connection(_));
            if write_line(&mut out, msg).is_err() {
                return; // The parent is gone; nobody is left to tell.
            }
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            urgent = true;
            if write_line(&mut out, &WorkerMsg::Progress(recorder.snapshot())).is_err() {
                return;
            }
        }
        // Records are batched; everything the parent waits on is flushed at once.
        if urgent && out.flush().is_err() {
            return;
        }
    }
    let _ = out.flush();
}

fn write_line(out: &mut impl std::io::Write, msg: &WorkerMsg) -> std::io::Result<()> {
    // Serialising our own plain data types cannot fail.
    let mut line = serde_json::to_vec(msg).expect("worker messages serialise");
    line.push(b'\n');
    out.write_all(&line)
}
