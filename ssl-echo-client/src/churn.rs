//! Handshake capacity (`--churn R --lifetime T`): an open loop. Connection `i` of a process starts
//! at `go + i / R` whatever the earlier ones are doing (a slow server makes connections pile up,
//! not the schedule slow down), lives its lifetime after its handshake, and closes. The only
//! brake is the open-file limit: when every descriptor is in use, the next start waits, and the
//! wait is recorded as that connection's start lag, so the report shows the client fell behind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::ShardPlan;
use crate::coordinator::FD_RESERVE;
use crate::failure::{Cause, Failure, Phase};
use crate::session::{self, ChurnStart, ConnectionRecord, Shared};

/// A start this far behind its schedule counts as late in the summary.
pub const LATE_START: Duration = Duration::from_millis(10);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// When connection `i` (0-based within the shard) is due, at `rate` per second from `go`.
pub fn due(go: Instant, i: u64, rate: f64) -> Instant {
    go + Duration::from_secs_f64(i as f64 / rate)
}

/// Starts the shard's connections on the churn schedule from `go`; returns their handles in id
/// order. A stop (Ctrl-C) ends the schedule: connections not started yet are recorded as such.
pub async fn open_all(
    plan: &ShardPlan,
    shared: Arc<Shared>,
    go_rx: watch::Receiver<Option<Instant>>,
    go: Instant,
) -> Vec<JoinHandle<ConnectionRecord>> {
    let nofile = testbed::fdlimit::raise_nofile().map_or(1024, |l| l.soft);
    let alive = Arc::new(Semaphore::new(
        nofile.saturating_sub(FD_RESERVE).max(1) as usize
    ));
    let mut stop = shared.stop.clone();
    let mut handles = Vec::with_capacity(plan.connections as usize);
    let rate = plan.connect_rate.max(f64::MIN_POSITIVE);
    for i in 0..plan.connections {
        let id = plan.first_id + i;
        let at = due(go, i, rate);
        let stopped = *stop.borrow()
            || tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => false,
                _ = stop.wait_for(|s| *s) => true,
            };
        if stopped {
            let mut r = ConnectionRecord::new(id, shared.process);
            r.failure = Some(Failure::new(
                Cause::Other,
                Phase::Connect,
                "not started: the run was stopped",
            ));
            handles.push(tokio::spawn(async move { r }));
            continue;
        }
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = Arc::clone(&alive)
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let started = Instant::now();
        let (shared, go_rx) = (Arc::clone(&shared), go_rx.clone());
        handles.push(tokio::spawn(async move {
            let mut record = session::run(id, shared, None, go_rx).await;
            drop(permit);
            record.opening_mut().churn = Some(ChurnStart {
                started_ms: ms(started.saturating_duration_since(go)),
                start_lag_ms: ms(started.saturating_duration_since(at)),
            });
            record
        }));
    }
    handles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_evenly_spaced_from_the_go() {
        let go = Instant::now();
        assert_eq!(due(go, 0, 50.0), go);
        assert_eq!(due(go, 1, 50.0) - go, Duration::from_millis(20));
        assert_eq!(due(go, 150, 50.0) - go, Duration::from_secs(3));
    }
}
