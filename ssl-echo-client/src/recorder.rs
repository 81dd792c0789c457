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
    /// Measured from the intended send time (only with `--rate`).
    #[serde(default)]
    pub corrected_us_sum: u64,
    #[serde(default)]
    pub corrected_us_max: u64,
    /// Scheduled sends (`--rate`) whose connection failed before it could send them, counted in
    /// the second they were due.
    #[serde(default)]
    pub sends_failed: u64,
}

impl Second {
    pub fn add(&mut self, other: &Second) {
        self.messages += other.messages;
        self.errors += other.errors;
        self.response_us_sum += other.response_us_sum;
        self.response_us_max = self.response_us_max.max(other.response_us_max);
        self.corrected_us_sum += other.corrected_us_sum;
        self.corrected_us_max = self.corrected_us_max.max(other.corrected_us_max);
        self.sends_failed += other.sends_failed;
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
    /// The same per backend, from the intended send time (with `--rate`).
    pub by_backend_corrected: Vec<Histogram<u64>>,
}

impl Tallies {
    fn new() -> Tallies {
        Tallies {
            response: new_histogram(),
            corrected: new_histogram(),
            timeline: Vec::new(),
            by_backend: Vec::new(),
            by_backend_corrected: Vec::new(),
        }
    }

    /// Adds `other` into `self` (same bounds: exact).
    fn absorb(&mut self, other: Tallies) {
        let _ = self.response.add(&other.response);
        let _ = self.corrected.add(&other.corrected);
        merge_timeline(&mut self.timeline, &other.timeline);
        for (mine, theirs) in [
            (&mut self.by_backend, other.by_backend),
            (&mut self.by_backend_corrected, other.by_backend_corrected),
        ] {
            if mine.len() < theirs.len() {
                mine.resize_with(theirs.len(), new_histogram);
            }
            for (a, b) in mine.iter_mut().zip(&theirs) {
                let _ = a.add(b);
            }
        }
    }
}

/// What one stripe of the recorder holds: the run's tallies and the current interval's
/// histograms (taken every second for `--json-lines` and `--hdr-log`).
struct Stripe {
    tallies: Tallies,
    interval: Interval,
}

/// The response times recorded since the last [`Recorder::take_interval`].
pub struct Interval {
    pub response: Histogram<u64>,
    pub corrected: Histogram<u64>,
}

impl Interval {
    pub fn new() -> Interval {
        Interval {
            response: new_histogram(),
            corrected: new_histogram(),
        }
    }
}

impl Default for Interval {
    fn default() -> Self {
        Interval::new()
    }
}

/// Connections record into one of this many stripes (by connection id), each behind its own
/// lock, so the runtime's threads do not queue on one lock per message; the stripes are merged
/// when the interval or the run ends (histograms with the same bounds add up exactly).
const STRIPES: usize = 16;

/// Shared by every connection task of one process.
pub struct Recorder {
    pub live: LiveCounters,
    phase1_changed: Notify,
    go: OnceLock<Instant>,
    /// Which backend serves which connection, when the parent asked the forwarder.
    backends: OnceLock<BackendMap>,
    stripes: Box<[Mutex<Stripe>]>,
    /// The latest echo of the run, in µs after the go (the end of the drain).
    last_answer_us: AtomicU64,
    /// Echoes that arrived after the end of sending (`--duration`): the drain.
    drained: AtomicU64,
    /// The latest moment a connection stopped sending, in µs after the go.
    send_end_us: AtomicU64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            live: LiveCounters::default(),
            phase1_changed: Notify::new(),
            go: OnceLock::new(),
            backends: OnceLock::new(),
            stripes: (0..STRIPES)
                .map(|_| {
                    Mutex::new(Stripe {
                        tallies: Tallies::new(),
                        interval: Interval::new(),
                    })
                })
                .collect(),
            last_answer_us: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            send_end_us: AtomicU64::new(0),
        }
    }
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// One answered message, as a connection reports it to the [`Recorder`].
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// The connection (chooses the stripe).
    pub conn: u64,
    /// When the echo was complete.
    pub at: Instant,
    pub response: Duration,
    /// From the intended send time, when sending on a schedule.
    pub corrected: Option<Duration>,
    /// The connection's backend slot, if known.
    pub backend: Option<usize>,
    /// The echo came after the end of sending (counts in the drain).
    pub drained: bool,
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

    /// The barrier instant, once given.
    pub fn go(&self) -> Option<Instant> {
        self.go.get().copied()
    }

    /// Who serves which connection (set before the go, once).
    pub fn set_backends(&self, map: BackendMap) {
        let slots = map.slots();
        if self.backends.set(map).is_ok() {
            for stripe in self.stripes.iter() {
                let t = &mut lock(stripe).tallies;
                t.by_backend = (0..slots).map(|_| new_histogram()).collect();
                t.by_backend_corrected = (0..slots).map(|_| new_histogram()).collect();
            }
        }
    }

    pub fn backends(&self) -> Option<&BackendMap> {
        self.backends.get()
    }

    fn second_of(&self, at: Instant) -> usize {
        let go = self.go.get().copied().unwrap_or(at);
        at.saturating_duration_since(go).as_secs() as usize
    }

    fn stripe(&self, conn: u64) -> std::sync::MutexGuard<'_, Stripe> {
        lock(&self.stripes[(conn % STRIPES as u64) as usize])
    }

    /// One echo arrived.
    pub fn message(&self, a: Answer) {
        self.live.messages.fetch_add(1, Ordering::Relaxed);
        let us = micros(a.response);
        let second = self.second_of(a.at);
        if let Some(go) = self.go() {
            self.last_answer_us.fetch_max(
                micros(a.at.saturating_duration_since(go)),
                Ordering::Relaxed,
            );
        }
        if a.drained {
            self.drained.fetch_add(1, Ordering::Relaxed);
        }
        let corrected_us = a.corrected.map(micros);
        let mut stripe = self.stripe(a.conn);
        let Stripe {
            tallies: t,
            interval,
        } = &mut *stripe;
        t.response.saturating_record(us);
        interval.response.saturating_record(us);
        if let Some(h) = a.backend.and_then(|b| t.by_backend.get_mut(b)) {
            h.saturating_record(us);
        }
        if let Some(c) = corrected_us {
            t.corrected.saturating_record(c);
            interval.corrected.saturating_record(c);
            if let Some(h) = a.backend.and_then(|b| t.by_backend_corrected.get_mut(b)) {
                h.saturating_record(c);
            }
        }
        let s = bucket(&mut t.timeline, second);
        s.messages += 1;
        s.response_us_sum += us;
        s.response_us_max = s.response_us_max.max(us);
        if let Some(c) = corrected_us {
            s.corrected_us_sum += c;
            s.corrected_us_max = s.corrected_us_max.max(c);
        }
    }

    /// Scheduled sends of connection `conn` that will never happen because it failed: each is
    /// due at one of `due` and counts in the corrected figures as a response of `counted_as`
    /// (the `--timeout-ms` a message may take before it is called failed), so the corrected
    /// tail is not cut off when a connection dies.
    pub fn sends_failed(
        &self,
        conn: u64,
        due: impl Iterator<Item = Instant>,
        counted_as: Duration,
        backend: Option<usize>,
    ) {
        let us = micros(counted_as);
        let mut stripe = self.stripe(conn);
        let Stripe {
            tallies: t,
            interval,
        } = &mut *stripe;
        for at in due {
            let second = self.second_of(at);
            t.corrected.saturating_record(us);
            interval.corrected.saturating_record(us);
            if let Some(h) = backend.and_then(|b| t.by_backend_corrected.get_mut(b)) {
                h.saturating_record(us);
            }
            bucket(&mut t.timeline, second).sends_failed += 1;
        }
    }

    /// A connection failed during phase 2 at `at`.
    pub fn exchange_failed(&self, conn: u64, at: Instant) {
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        let second = self.second_of(at);
        bucket(&mut self.stripe(conn).tallies.timeline, second).errors += 1;
    }

    /// An open connection was closed (for whatever reason).
    pub fn closed(&self) {
        self.live.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The response times recorded since the last call, every stripe merged.
    pub fn take_interval(&self) -> Interval {
        let mut all = Interval::new();
        for stripe in self.stripes.iter() {
            let mut s = lock(stripe);
            let _ = all.response.add(&s.interval.response);
            let _ = all.corrected.add(&s.interval.corrected);
            s.interval.response.reset();
            s.interval.corrected.reset();
        }
        all
    }

    /// The latest echo, in seconds after the go (0 before any).
    pub fn last_answer_s(&self) -> f64 {
        self.last_answer_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// A connection stopped sending at `at` (its deadline, its last echo, a failure or a stop).
    pub fn sending_ended(&self, at: Instant) {
        if let Some(go) = self.go() {
            self.send_end_us
                .fetch_max(micros(at.saturating_duration_since(go)), Ordering::Relaxed);
        }
    }

    /// From the go to the moment the last connection stopped sending, in seconds.
    pub fn send_window_s(&self) -> f64 {
        self.send_end_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Echoes that arrived after the end of sending.
    pub fn drained(&self) -> u64 {
        self.drained.load(Ordering::Relaxed)
    }

    /// Takes the tallies at the end of the run, every stripe merged.
    pub fn take(&self) -> Tallies {
        let mut all = Tallies::new();
        for stripe in self.stripes.iter() {
            let mut s = lock(stripe);
            all.absorb(std::mem::replace(&mut s.tallies, Tallies::new()));
        }
        all
    }
}

fn lock(stripe: &Mutex<Stripe>) -> std::sync::MutexGuard<'_, Stripe> {
    // A panic while holding the lock cannot leave the tallies half-updated in a way that
    // matters more than losing them, so keep going with the inner value.
    stripe.lock().unwrap_or_else(|p| p.into_inner())
}

fn bucket(timeline: &mut Vec<Second>, second: usize) -> &mut Second {
    if timeline.len() <= second {
        timeline.resize(second + 1, Second::default());
    }
    &mut timeline[second]
}

/// A histogram in the form it travels in between processes and agents: HdrHistogram's own V2
/// compressed encoding (what its interval logs hold), base64. Exact: every bucket and count.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramDump(pub String);

impl HistogramDump {
    pub fn of(h: &Histogram<u64>) -> HistogramDump {
        use base64::Engine as _;
        use hdrhistogram::serialization::{Serializer as _, V2DeflateSerializer};
        let mut bytes = Vec::new();
        // Serialising into memory cannot fail for a histogram of our own bounds.
        V2DeflateSerializer::new()
            .serialize(h, &mut bytes)
            .expect("histogram serialises");
        HistogramDump(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// Decodes the histogram.
    pub fn decode(&self) -> anyhow::Result<Histogram<u64>> {
        use anyhow::Context as _;
        use base64::Engine as _;
        if self.0.is_empty() {
            return Ok(new_histogram());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.0)
            .context("histogram is not base64")?;
        hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("histogram does not decode: {e:?}"))
    }

    /// Adds the recorded values into `into`; a dump that does not decode is logged and skipped.
    pub fn merge_into(&self, into: &mut Histogram<u64>) {
        match self.decode() {
            Ok(h) => {
                if into.add(&h).is_err() {
                    // Another peer's bounds: add value by value, saturating.
                    for v in h.iter_recorded() {
                        for _ in 0..v.count_at_value().min(1_000_000) {
                            into.saturating_record(v.value_iterated_to());
                        }
                    }
                }
            }
            Err(e) => tracing::error!("{e:#}"),
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
        let answer = |conn, at_ms, ms| Answer {
            conn,
            at: go + Duration::from_millis(at_ms),
            response: Duration::from_millis(ms),
            corrected: None,
            backend: None,
            drained: false,
        };
        r.message(answer(0, 10, 2));
        r.message(answer(1, 900, 4));
        r.message(answer(2, 2100, 1));
        r.exchange_failed(3, go + Duration::from_millis(2500));
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
            ..Second::default()
        }];
        let b = vec![
            Second {
                messages: 2,
                errors: 1,
                response_us_sum: 30,
                response_us_max: 20,
                ..Second::default()
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
