//! The last minutes of each pool and backend, sampled once a second into bounded ring buffers,
//! for the page's charts: active connections, new connections and bytes each way per second.
//! Sampling happens here, not in the browser, so a chart is complete the moment a page opens.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::stats::snapshot::StatsSnapshot;
use crate::supervisor::Supervisor;

/// Seconds of history kept per series.
pub const KEEP_SECONDS: usize = 300;

const INTERVAL: Duration = Duration::from_secs(1);

/// One second: `[unix_ms, active, new_connections, bytes_up, bytes_down]`.
pub type Point = [u64; 5];

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub listen: String,
    /// The backend's entry name and address; absent for a pool's series.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    pub points: VecDeque<Point>,
}

/// Counter values at the previous sample, to turn totals into per-second figures.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    total: u64,
    up: u64,
    down: u64,
}

#[derive(Debug)]
pub struct History {
    keep: usize,
    pools: HashMap<String, Series>,
    backends: HashMap<String, (Series, Totals)>,
}

/// What `GET /api/history` returns.
#[derive(Debug, Serialize)]
pub struct HistoryView {
    pub interval_ms: u64,
    /// Order of the numbers in each point.
    pub columns: [&'static str; 5],
    pub pools: Vec<Series>,
    pub backends: Vec<Series>,
}

impl History {
    pub fn new(keep: usize) -> History {
        History {
            keep,
            pools: HashMap::new(),
            backends: HashMap::new(),
        }
    }

    /// Adds one sample taken at `now_ms`. Series of rules that are gone are dropped, so memory
    /// is bounded by the rules in force times `keep`.
    pub fn record(&mut self, stats: &StatsSnapshot, now_ms: u64) {
        let mut seen_pools = Vec::new();
        let mut seen_backends = Vec::new();
        for pool in &stats.pools {
            let listen = pool.label.clone();
            let mut sum: Point = [now_ms, 0, 0, 0, 0];
            for b in &pool.backends {
                let key = format!("{listen}|{}|{}", b.name, b.addr);
                let (series, last) = self.backends.entry(key.clone()).or_insert_with(|| {
                    (
                        Series {
                            listen: listen.clone(),
                            name: Some(b.name.clone()),
                            addr: Some(b.addr.to_string()),
                            points: VecDeque::new(),
                        },
                        Totals {
                            total: b.total,
                            up: b.bytes_up,
                            down: b.bytes_down,
                        },
                    )
                });
                // Counters only grow; a smaller value means the slot was reused: count from it.
                let point = [
                    now_ms,
                    b.active,
                    b.total.saturating_sub(last.total),
                    b.bytes_up.saturating_sub(last.up),
                    b.bytes_down.saturating_sub(last.down),
                ];
                *last = Totals {
                    total: b.total,
                    up: b.bytes_up,
                    down: b.bytes_down,
                };
                push(&mut series.points, point, self.keep);
                for i in 1..5 {
                    sum[i] += point[i];
                }
                seen_backends.push(key);
            }
            let series = self.pools.entry(listen.clone()).or_insert_with(|| Series {
                listen: listen.clone(),
                name: None,
                addr: None,
                points: VecDeque::new(),
            });
            push(&mut series.points, sum, self.keep);
            seen_pools.push(listen);
        }
        self.pools.retain(|k, _| seen_pools.contains(k));
        self.backends.retain(|k, _| seen_backends.contains(k));
    }

    /// Every series, with only the points newer than `since_ms`.
    pub fn view(&self, since_ms: u64) -> HistoryView {
        let recent = |s: &Series| Series {
            points: s
                .points
                .iter()
                .filter(|p| p[0] > since_ms)
                .copied()
                .collect(),
            ..s.clone()
        };
        let mut pools: Vec<Series> = self.pools.values().map(recent).collect();
        pools.sort_by(|a, b| a.listen.cmp(&b.listen));
        let mut backends: Vec<Series> = self.backends.values().map(|(s, _)| recent(s)).collect();
        backends.sort_by(|a, b| (&a.listen, &a.name, &a.addr).cmp(&(&b.listen, &b.name, &b.addr)));
        HistoryView {
            interval_ms: INTERVAL.as_millis() as u64,
            columns: ["t_ms", "active", "new", "bytes_up", "bytes_down"],
            pools,
            backends,
        }
    }
}

fn push(points: &mut VecDeque<Point>, point: Point, keep: usize) {
    if points.len() == keep {
        points.pop_front();
    }
    points.push_back(point);
}

/// Samples the supervisor's figures once a second for as long as the web page runs. A slow
/// supervisor delays a sample; missed ticks are skipped rather than bunched up.
pub async fn sample_forever(sup: Supervisor, history: Arc<Mutex<History>>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let sup = sup.clone();
        let Ok(stats) = super::call(move || sup.stats()).await else {
            continue;
        };
        let now = crate::stats::now_ms();
        history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&stats, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::snapshot::{BackendStats, PoolStats};

    fn snapshot(backends: &[(&str, u64, u64, u64)]) -> StatsSnapshot {
        StatsSnapshot {
            workers: 1,
            capacity: 100,
            active: 0,
            lost_worker_died: 0,
            uptime_ms: 0,
            accept_pauses: 0,
            access_log_dropped: 0,
            data_path: Default::default(),
            udp_capacity: 0,
            udp_sessions: 0,
            pools: vec![PoolStats {
                listen: "0.0.0.0:8080".parse().unwrap(),
                label: "0.0.0.0:8080".into(),
                proto: Default::default(),
                evicted: 0,
                limits: Default::default(),
                accepted: 0,
                unrouted: 0,
                serving: "primary".into(),
                refused: Default::default(),
                backends: backends
                    .iter()
                    .map(|&(name, active, total, bytes)| BackendStats {
                        name: name.into(),
                        dest_ip: "127.0.0.1".into(),
                        dest_port: "9001".into(),
                        addr: "127.0.0.1:9001".parse().unwrap(),
                        state: "up".into(),
                        dns: None,
                        admin: "active".into(),
                        backup: false,
                        check: String::new(),
                        rise: 0,
                        slowstart_pct: None,
                        active,
                        lost_worker_died: 0,
                        total,
                        bytes_up: bytes,
                        bytes_down: bytes * 2,
                        spliced_up: 0,
                        spliced_down: 0,
                        in_kernel: 0,
                        connect_failures: 0,
                        last_error: String::new(),
                        last_error_ms: 0,
                        down_since_ms: 0,
                        retry_at_ms: 0,
                        last_check_ms: 0,
                        datagrams_up: 0,
                        datagrams_down: 0,
                        drops_up: 0,
                        drops_down: 0,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn totals_become_per_second_figures_and_the_buffer_is_bounded() {
        let mut h = History::new(3);
        h.record(&snapshot(&[("a", 1, 10, 100), ("b", 0, 5, 0)]), 1000);
        h.record(&snapshot(&[("a", 2, 13, 400), ("b", 1, 6, 50)]), 2000);
        let v = h.view(0);
        assert_eq!(v.pools.len(), 1);
        assert_eq!(
            v.pools[0].points.iter().copied().collect::<Vec<_>>(),
            vec![[1000, 1, 0, 0, 0], [2000, 3, 4, 350, 700]]
        );
        assert_eq!(v.backends[0].name.as_deref(), Some("a"));
        assert_eq!(v.backends[0].points[1], [2000, 2, 3, 300, 600]);
        for t in 3..=6 {
            h.record(&snapshot(&[("a", 0, 13, 400), ("b", 0, 6, 50)]), t * 1000);
        }
        let v = h.view(0);
        assert_eq!(v.pools[0].points.len(), 3);
        assert_eq!(v.pools[0].points[0][0], 4000);
        assert_eq!(h.view(5000).pools[0].points.len(), 1);
    }

    #[test]
    fn series_of_removed_rules_are_dropped() {
        let mut h = History::new(10);
        h.record(&snapshot(&[("a", 1, 1, 1), ("b", 1, 1, 1)]), 1000);
        h.record(&snapshot(&[("a", 1, 1, 1)]), 2000);
        assert_eq!(h.view(0).backends.len(), 1);
        h.record(
            &StatsSnapshot {
                pools: Vec::new(),
                ..snapshot(&[])
            },
            3000,
        );
        assert!(h.view(0).pools.is_empty());
    }
}
