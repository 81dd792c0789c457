//! The worker-process side of a multi-process run. The parent re-executes this binary with a
//! hidden `--worker-plan JSON`; the worker runs its shard, writes [`WorkerMsg`]s to stdout as JSON
//! lines, and waits for the line `go` on stdin before phase 2; `stop` (or the end of stdin: the
//! parent is gone) ends phase 2 early. Workers ignore SIGINT: a Ctrl-C on the terminal reaches the
//! whole process group, and it is the parent that decides how the run ends.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::ShardPlan;
use crate::connector::Connector;
use crate::shard::{self, WorkerMsg};

/// The hidden flag that turns the binary into a worker.
pub const WORKER_FLAG: &str = "--worker-plan";

/// The line the parent sends on stdin to start phase 2.
pub const GO: &str = "go";
/// The line the parent sends on stdin to end phase 2 early.
pub const STOP: &str = "stop";

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
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
    let (tx, mut rx) = mpsc::unbounded_channel::<WorkerMsg>();
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
        while let Some(msg) = rx.recv().await {
            // Serialising our own plain data types cannot fail.
            let mut line = serde_json::to_vec(&msg).expect("worker messages serialise");
            line.push(b'\n');
            // Records are batched; everything the parent waits on is flushed at once.
            let urgent = !matches!(msg, WorkerMsg::Connection(_));
            if out.write_all(&line).await.is_err() || (urgent && out.flush().await.is_err()) {
                // The parent is gone; nobody is left to tell.
                return;
            }
        }
        let _ = out.flush().await;
    });
    let emit: shard::Emit = Arc::new(move |msg| {
        let _ = tx.send(msg);
    });
    let (go_tx, go_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut go_tx = Some(go_tx);
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
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
    shard::drive(plan, connector, emit, async { go_rx.await.ok() }, stop_rx).await;
    // `emit` (and with it the sender) is dropped by drive; the writer drains and ends.
    writer.await.context("stdout writer")?;
    Ok(())
}
