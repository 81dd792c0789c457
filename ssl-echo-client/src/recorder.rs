//! What one process measures while it runs: live counters (read by the progress line), and the
//! response-time histograms and per-second timeline behind one lock. Memory does not grow with
//! the number of messages: histograms have fixed buckets, the timeline one entry per second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::backends::BackendMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Response times are recorded in microseconds, from 1 µs to one hour, 3 significant digits.
const HIST_MAX_US: u64 = 3_600_000_000;

/// A new, empty response-time histogram.
pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds (low >= 1, high >= 2 * low, sigfig <= 5): cannot fail.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// Counters shown while the run goes on (all cumulative except `open`).
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub up: AtomicU64,
    pub connect_failed: AtomicU64,
    pub open: AtomicU64,
    pub messages: AtomicU64,
    pub errors: AtomicU64,
}

/// A copy of [`LiveCounters`] at one moment; worker processes send these to the parent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSnapshot {
    pub up: u64,
    pub connect_failed: u64,
    pub open: u64,
    pub messages: u64,
    pub errors: u64,
}

impl LiveSnapshot {
    pub fn add(&mut self, other: &LiveSnapshot) {
        self.up += other.up;
        self.connect_failed += other.connect_failed;
        self.open += other.open;
        self.messages += other.messages;
        self.errors += other.errors;
    }

    /// Connections that finished phase 1 either way.
    pub fn phase1_done(&self) -> u64 {
        self.up + self.connect_failed
    }
}

/// One second of phase 2.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Second {
    pub messages: u64,
    pub errors: u64,
    pub response_us_sum: u64,
    pub response_us_max: u64,
}

impl Second {
    pub fn add(&mut self, other: &Second) {
        self.messages += other.messages;
        self.errors += other.errors;
        self.response_us_sum += other.response_us_sum;
        self.response_us_max = self.response_us_max.max(other.response_us_max);
    }
}

/// Adds `other` second by second into `into`, growing it as needed.
pub fn merge_timeline(into: &mut Vec<Second>, other: &[Second]) {
    if into.len() < other.len() {
        into.resize(other.len(), Second::default());
    }
    for (a, b) in into.iter_mut().zip(other) {
        a.add(b);
    }
}

/// Histograms and timeline of one process.
pub struct Tallies {
    pub response: Histogram<u64>,
    /// Response times measured from the intended send time (only filled with `--rate`).
    pub corrected: Histogram<u64>,
    pub timeline: Vec<Second>,
    /// One histogram per backend slot (see [`BackendMap::slot_of`]); empty without `--forwarder`.
    pub by_backend: Vec<Histogram<u64>>,
}

/// Shared by every connection task of one process.
pub struct Recorder {
    pub live: LiveCounters,
    phase1_changed: Notify,
    go: OnceLock<Instant>,
    /// Which backend serves which connection, when the parent asked the forwarder.
    backends: OnceLock<BackendMap>,
    tallies: Mutex<Tallies>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            live: LiveCounters::default(),
            phase1_changed: Notify::new(),
            go: OnceLock::new(),
            backends: OnceLock::new(),
            tallies: Mutex::new(Tallies {
                response: new_histogram(),
                corrected: new_histogram(),
                timeline: Vec::new(),
                by_backend: Vec::new(),
            }),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Recorder {
    pub fn snapshot(&self) -> LiveSnapshot {
        let l = &self.live;
        LiveSnapshot {
            up: l.up.load(Ordering::Relaxed),
            connect_failed: l.connect_failed.load(Ordering::Relaxed),
            open: l.open.load(Ordering::Relaxed),
            messages: l.messages.load(Ordering::Relaxed),
            errors: l.errors.load(Ordering::Relaxed),
        }
    }

    /// A connection finished phase 1 (`ok` = it is open).
    pub fn phase1_done(&self, ok: bool) {
        if ok {
            self.live.up.fetch_add(1, Ordering::Relaxed);
            self.live.open.fetch_add(1, Ordering::Relaxed);
        } else {
            self.live.connect_failed.fetch_add(1, Ordering::Relaxed);
            self.live.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.phase1_changed.notify_waiters();
    }

    /// Waits until `n` connections finished phase 1.
    pub async fn wait_phase1(&self, n: u64) {
        loop {
            let changed = self.phase1_changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a notification between check and await is not lost.
            changed.as_mut().enable();
            if self.snapshot().phase1_done() >= n {
                return;
            }
            changed.await;
        }
    }

    /// Marks the barrier: phase 2 starts now (the timeline counts from here).
    pub fn set_go(&self, at: Instant) {
        let _ = self.go.set(at);
    }

    /// Who serves which connection (set before the go, once).
    pub fn set_backends(&self, map: BackendMap) {
        let slots = map.slots();
        if self.backends.set(map).is_ok() {
            self.lock().by_backend = (0..slots).map(|_| new_histogram()).collect();
        }
    }

    pub fn backends(&self) -> Option<&BackendMap> {
        self.backends.get()
    }

    fn second_of(&self, at: Instant) -> usize {
        let go = self.go.get().copied().unwrap_or(at);
        at.saturating_duration_since(go).as_secs() as usize
    }

    /// One echo arrived at `at` after `response`; `corrected` is measured from the intended send
    /// time when sending on a schedule; `backend` is the connection's backend slot, if known.
    pub fn message(
        &self,
        at: Instant,
        response: Duration,
        corrected: Option<Duration>,
        backend: Option<usize>,
    ) {
        self.live.messages.fetch_add(1, Ordering::Relaxed);
        let us = micros(response);
        let second = self.second_of(at);
        let mut t = self.lock();
        t.response.saturating_record(us);
        if let Some(h) = backend.and_then(|b| t.by_backend.get_mut(b)) {
            h.saturating_record(us);
        }
        if let Some(c) = corrected {
            t.corrected.saturating_record(micros(c));
        }
        let s = bucket(&mut t.timeline, second);
        s.messages += 1;
        s.response_us_sum += us;
        s.response_us_max = s.response_us_max.max(us);
    }

    /// A connection failed during phase 2 at `at`.
    pub fn exchange_failed(&self, at: Instant) {
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        let second = self.second_of(at);
        bucket(&mut self.lock().timeline, second).errors += 1;
    }

    /// An open connection was closed (for whatever reason).
    pub fn closed(&self) {
        self.live.open.fetch_sub(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tallies> {
        // A panic while holding the lock cannot leave the tallies half-updated in a way that
        // matters more than losing them, so keep going with the inner value.
        self.tallies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the tallies at the end of the run.
    pub fn take(&self) -> Tallies {
        let mut t = self.lock();
        Tallies {
            response: std::mem::replace(&mut t.response, new_histogram()),
            corrected: std::mem::replace(&mut t.corrected, new_histogram()),
            timeline: std::mem::take(&mut t.timeline),
            by_backend: std::mem::take(&mut t.by_backend),
        }
    }
}

fn bucket(timeline: &mut Vec<Second>, second: usize) -> &mut Second {
    if timeline.len() <= second {
        timeline.resize(second + 1, Second::default());
    }
    &mut timeline[second]
}

/// A histogram as (value, count) pairs, the form it travels in between processes.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramDump(pub Vec<(u64, u64)>);

impl HistogramDump {
    pub fn of(h: &Histogram<u64>) -> HistogramDump {
        HistogramDump(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    /// Adds the recorded values into `into`.
    pub fn merge_into(&self, into: &mut Histogram<u64>) {
        for &(value, count) in &self.0 {
            // In range by construction (dumped from a histogram with the same bounds); saturate
            // rather than fail if a foreign dump says otherwise.
            if into.record_n(value, count).is_err() {
                into.saturating_record(value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_counts_by_second_since_go() {
        let r = Recorder::default();
        let go = Instant::now();
        r.set_go(go);
        r.message(
            go + Duration::from_millis(10),
            Duration::from_millis(2),
            None,
            None,
        );
        r.message(
            go + Duration::from_millis(900),
            Duration::from_millis(4),
            None,
            None,
        );
        r.message(
            go + Duration::from_millis(2100),
            Duration::from_millis(1),
            None,
            None,
        );
        r.exchange_failed(go + Duration::from_millis(2500));
        let t = r.take();
        assert_eq!(t.timeline.len(), 3);
        assert_eq!(t.timeline[0].messages, 2);
        assert_eq!(t.timeline[0].response_us_sum, 6000);
        assert_eq!(t.timeline[0].response_us_max, 4000);
        assert_eq!(t.timeline[1], Second::default());
        assert_eq!(t.timeline[2].messages, 1);
        assert_eq!(t.timeline[2].errors, 1);
        assert_eq!(t.response.len(), 3);
        assert_eq!(r.snapshot().messages, 3);
        assert_eq!(r.snapshot().errors, 1);
    }

    #[test]
    fn histograms_survive_the_trip_between_processes() {
        let mut h = new_histogram();
        for v in [1, 150, 150, 2_000, 75_000, 1_500_000] {
            h.record(v).unwrap();
        }
        let json = serde_json::to_string(&HistogramDump::of(&h)).unwrap();
        let dump: HistogramDump = serde_json::from_str(&json).unwrap();
        let mut back = new_histogram();
        dump.merge_into(&mut back);
        dump.merge_into(&mut back);
        assert_eq!(back.len(), 12);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert!(back.equivalent(back.max(), h.max()));
    }

    #[test]
    fn merged_dumps_give_the_percentiles_of_the_combined_samples() {
        // Two processes (or agents) with different loads; the parent merges their dumps.
        let (mut a, mut b, mut all) = (new_histogram(), new_histogram(), new_histogram());
        for i in 0..5_000u64 {
            let fast = 200 + (i * 7919) % 3_000; // 0.2-3.2 ms
            let slow = 40_000 + (i * 104_729) % 900_000; // 40-940 ms
            a.record(fast).unwrap();
            all.record(fast).unwrap();
            if i % 3 == 0 {
                b.record(slow).unwrap();
                all.record(slow).unwrap();
            }
        }
        let mut merged = new_histogram();
        for h in [&a, &b] {
            let json = serde_json::to_string(&HistogramDump::of(h)).unwrap();
            serde_json::from_str::<HistogramDump>(&json)
                .unwrap()
                .merge_into(&mut merged);
        }
        assert_eq!(merged.len(), all.len());
        for q in [0.0, 0.1, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.value_at_quantile(q),
                all.value_at_quantile(q),
                "q {q}"
            );
        }
        assert_eq!((merged.min(), merged.max()), (all.min(), all.max()));
        assert_eq!(merged.mean(), all.mean());
    }

    #[test]
    fn timelines_merge_second_by_second() {
        let mut a = vec![Second {
            messages: 1,
            errors: 0,
            response_us_sum: 10,
            response_us_max: 10,
        }];
        let b = vec![
            Second {
                messages: 2,
                errors: 1,
                response_us_sum: 30,
                response_us_max: 20,
            },
            Second {
                messages: 5,
                ..Second::default()
            },
        ];
        merge_timeline(&mut a, &b);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].messages, 3);
        assert_eq!(a[0].errors, 1);
        assert_eq!(a[0].response_us_sum, 40);
        assert_eq!(a[0].response_us_max, 20);
        assert_eq!(a[1].messages, 5);
    }
}
