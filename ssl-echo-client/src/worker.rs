//! The worker-process side of a multi-process run. The parent re-executes this binary with a
//! hidden `--worker-plan JSON`; the worker runs its shard, writes [`WorkerMsg`]s to stdout as JSON
//! lines, and waits for the line `go` on stdin before phase 2. End of stdin before `go` means the
//! parent is gone: the worker closes its connections and exits.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::config::ShardPlan;
use crate::connector::Connector;
use crate::shard::{self, WorkerMsg};

/// The hidden flag that turns the binary into a worker.
pub const WORKER_FLAG: &str = "--worker-plan";

/// The word the parent sends on stdin to start phase 2.
pub const GO: &str = "go";

/// Runs one worker process to the end.
pub fn main(plan_json: &str) -> anyhow::Result<()> {
    let plan: ShardPlan =
        serde_json::from_str(plan_json).context("worker plan is not valid JSON")?;
    testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cpus / plan.processes.max(1) as usize).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(plan))
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
    let go = async {
        let mut line = String::new();
        let mut stdin = BufReader::new(tokio::io::stdin());
        match stdin.read_line(&mut line).await {
            Ok(_) if line.trim() == GO => Some(Instant::now()),
            _ => None,
        }
    };
    shard::drive(plan, connector, emit, go).await;
    // `emit` (and with it the sender) is dropped by drive; the writer drains and ends.
    writer.await.context("stdout writer")?;
    Ok(())
}
