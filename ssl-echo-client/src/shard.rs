//! One process's share of the run: opens its connections at the ramp rate, reports when all of
//! them are up (or failed), waits for the go, and streams each connection's record and the final
//! histograms out as [`WorkerMsg`]s. The same code runs inside the parent (one process) and in
//! each worker process (many).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};

use crate::config::ShardPlan;
use crate::connector::Connector;
use crate::failure::{Cause, Failure, Phase};
use crate::meter::{self, IntervalReport};
use crate::ramp::TokenBucket;
use crate::recorder::{HistogramDump, LiveSnapshot, Recorder, Second};
use crate::session::{self, ConnectionRecord, Shared};

/// At most this many connections of one process are being opened at once. Enough to keep a
/// server busy with handshakes; few enough that a burst of thousands does not overflow its
/// listen backlog (which turns into 1 s, 3 s, 7 s SYN retries and looks like a slow server).
pub const MAX_CONNECTING: usize = 500;

/// How often a worker process reports its live counters.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What a shard tells its parent, in order: `Connected` once phase 1 is over, then one
/// `Connection` per connection, then `Finished`. A worker process also sends `Progress` every
/// [`PROGRESS_EVERY`] from its own thread (in-process, the parent reads the counters directly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    Progress(LiveSnapshot),
    Connected {
        ok: u64,
        failed: u64,
    },
    Connection(Box<ConnectionRecord>),
    /// One second of phase 2 (from the meter).
    Interval(IntervalReport),
    Finished {
        exchange_s: f64,
        response: HistogramDump,
        corrected: HistogramDump,
        timeline: Vec<Second>,
        /// One per backend slot (see `BackendMap::slot_of`); empty without `--forwarder`.
        #[serde(default)]
        by_backend: Vec<HistogramDump>,
        /// The same from the intended send time (`--rate`).
        #[serde(default)]
        by_backend_corrected: Vec<HistogramDump>,
        /// The send window and the drain, and the meter's totals.
        #[serde(default)]
        window: Box<ShardWindow>,
    },
}

/// When a shard's sending ended and its last echo came, and what its meter saw.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardWindow {
    /// From the go to the moment its last connection stopped sending (the deadline with
    /// `--duration`, else the last echo).
    pub send_window_s: f64,
    /// From the go to its last echo.
    pub last_answer_s: f64,
    /// Echoes that came after the end of sending.
    pub drained: u64,
    pub hiccup: HistogramDump,
    pub cpu_pct_avg: f64,
    pub cpu_pct_max: f64,
    pub threads: u32,
}

/// Where a shard's messages go (a channel in-process, stdout in a worker process).
pub type Emit = Arc<dyn Fn(WorkerMsg) + Send + Sync>;

/// Runs the shard to the end, counting into `recorder`. `go` resolves to the barrier instant, or `None` if the run is
/// abandoned (the parent went away): then open connections are closed without sending.
///
/// `stop` turning true ends phase 2 early: each connection finishes its message in flight.
pub async fn drive(
    plan: ShardPlan,
    connector: Connector,
    recorder: Arc<Recorder>,
    emit: Emit,
    go: impl Future<Output = Option<Instant>>,
    stop: watch::Receiver<bool>,
) {
    let payload: Arc<[u8]> = match plan.config.payload_bytes() {
        Ok(p) => p.into(),
        Err(e) => {
            // The parent built the same payload before starting anyone; cannot differ here.
            tracing::error!("{e:#}");
            plan.config.message.as_bytes().into()
        }
    };
    let shared = Arc::new(Shared {
        config: plan.config.clone(),
        connector,
        recorder: Arc::clone(&recorder),
        process: plan.index,
        stop,
        payload,
    });
    let (go_tx, go_rx) = watch::channel(None);

    // Churn mode opens nothing before the go: it is an open loop that starts at the go.
    let churn = plan.config.churn.is_some();
    let ramp =
        (!churn).then(|| tokio::spawn(open_all(plan.clone(), Arc::clone(&shared), go_rx.clone())));
    if !churn {
        recorder.wait_phase1(plan.connections).await;
    }
    let phase1 = recorder.snapshot();
    emit(WorkerMsg::Progress(phase1));
    emit(WorkerMsg::Connected {
        ok: phase1.up,
        failed: phase1.connect_failed,
    });

    let go_at = go.await;
    let (meter_end, meter_rx) = tokio::sync::oneshot::channel();
    let mut meter = None;
    match go_at {
        Some(at) => {
            recorder.set_go(at);
            let _ = go_tx.send(Some(at));
            let (recorder, emit) = (Arc::clone(&recorder), Arc::clone(&emit));
            meter = Some(tokio::spawn(meter::run(
                at,
                recorder,
                move |r| emit(WorkerMsg::Interval(r)),
                meter_rx,
            )));
        }
        None => drop(go_tx),
    }

    let handles = match (ramp, go_at) {
        (Some(ramp), _) => match ramp.await {
            Ok(handles) => handles,
            Err(e) => {
                tracing::error!("connection ramp failed: {e}");
                Vec::new()
            }
        },
        (None, Some(at)) => crate::churn::open_all(&plan, shared, go_rx, at).await,
        (None, None) => Vec::new(),
    };
    for (offset, handle) in handles.into_iter().enumerate() {
        let record = handle.await.unwrap_or_else(|e| {
            let mut r = ConnectionRecord::new(plan.first_id + offset as u64, plan.index);
            r.failure = Some(Failure::new(Cause::Other, Phase::Exchange, e));
            r
        });
        emit(WorkerMsg::Connection(Box::new(record)));
    }
    let exchange_s = go_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
    let _ = meter_end.send(());
    let mut window = ShardWindow {
        send_window_s: recorder.send_window_s(),
        last_answer_s: recorder.last_answer_s(),
        drained: recorder.drained(),
        ..ShardWindow::default()
    };
    if let Some(Ok(totals)) = match meter {
        Some(m) => Some(m.await),
        None => None,
    } {
        window.hiccup = HistogramDump::of(&totals.hiccup);
        window.cpu_pct_avg = totals.cpu_pct_avg;
        window.cpu_pct_max = totals.cpu_pct_max;
        window.threads = totals.threads;
    }
    let tallies = recorder.take();
    emit(WorkerMsg::Progress(recorder.snapshot()));
    emit(WorkerMsg::Finished {
        exchange_s,
        response: HistogramDump::of(&tallies.response),
        corrected: HistogramDump::of(&tallies.corrected),
        timeline: tallies.timeline,
        by_backend: tallies.by_backend.iter().map(HistogramDump::of).collect(),
        by_backend_corrected: tallies
            .by_backend_corrected
            .iter()
            .map(HistogramDump::of)
            .collect(),
        window: Box::new(window),
    });
}

/// Starts every connection of the shard, paced by a token bucket at the connect rate and
/// limited to `--max-connecting` in flight. Returns their handles in id order.
///
/// A token bucket rather than an absolute schedule: when the in-flight cap (or a slow server)
/// holds the ramp back, the time lost is not made up in a burst afterwards; the bucket holds
/// at most [`crate::ramp::BURST`] tokens.
async fn open_all(
    plan: ShardPlan,
    shared: Arc<Shared>,
    go: watch::Receiver<Option<Instant>>,
) -> Vec<tokio::task::JoinHandle<ConnectionRecord>> {
    let cap = usize::try_from(plan.config.max_connecting)
        .unwrap_or(MAX_CONNECTING)
        .max(1);
    let connecting = Arc::new(Semaphore::new(cap));
    let mut bucket =
        (plan.connect_rate > 0.0).then(|| TokenBucket::new(plan.connect_rate, Instant::now()));
    let mut handles = Vec::with_capacity(plan.connections as usize);
    for i in 0..plan.connections {
        if let Some(bucket) = &mut bucket {
            let now = Instant::now();
            if let Some(wait) = bucket.take(now) {
                tokio::time::sleep_until((now + wait).into()).await;
            }
        }
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = Arc::clone(&connecting)
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        handles.push(tokio::spawn(session::run(
            plan.first_id + i,
            Arc::clone(&shared),
            Some(permit),
            go.clone(),
        )));
    }
    handles
}
