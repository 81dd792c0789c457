//! Is the client the bottleneck? Each process runs one meter task during phase 2: a hiccup meter
//! (as jHiccup: a timer that should fire every millisecond, and how late it fires — the time a
//! ready task waits for this process's run queue or for a CPU), and the process's CPU use. Every
//! second it hands the interval's response-time histograms, hiccups and CPU to the parent as an
//! [`IntervalReport`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::recorder::{micros, new_histogram, HistogramDump, Recorder};

/// How often the hiccup timer should fire.
pub const HICCUP_TICK: Duration = Duration::from_millis(1);

/// How often an interval is reported (one `--json-lines` record, one `--hdr-log` line).
pub const INTERVAL: Duration = Duration::from_secs(1);

/// One process's second of phase 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalReport {
    /// 0-based second since the go.
    pub second: u64,
    /// Length of the interval (the last one is usually shorter).
    pub length_s: f64,
    /// Response times answered in the interval (µs).
    pub response: HistogramDump,
    /// From the intended send time (`--rate`), failed sends included.
    pub corrected: HistogramDump,
    /// How late the hiccup timer fired (µs).
    pub hiccup: HistogramDump,
    /// The process's CPU time (user + system) over the interval, in % of one core.
    pub cpu_pct: f64,
    /// Threads running connections in the process: 100 % × threads is all it can get.
    pub threads: u32,
}

/// The meter's totals at the end of phase 2.
pub struct MeterTotals {
    pub hiccup: Histogram<u64>,
    /// Average CPU over phase 2, % of one core.
    pub cpu_pct_avg: f64,
    /// Highest one-second CPU, % of one core.
    pub cpu_pct_max: f64,
    pub threads: u32,
}

/// CPU time this process has used so far (user + system).
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU used over `wall`, in % of one core.
pub fn cpu_pct(cpu: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        0.0
    } else {
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    }
}

/// Runs the meter from `go` until `end` fires, emitting one report per [`INTERVAL`] (and the
/// last, partial one), then returns the totals.
pub async fn run(
    go: Instant,
    recorder: Arc<Recorder>,
    emit: impl Fn(IntervalReport),
    mut end: oneshot::Receiver<()>,
) -> MeterTotals {
    let threads = tokio::runtime::Handle::current().metrics().num_workers() as u32;
    let mut total = new_histogram();
    let mut interval = new_histogram();
    let (cpu_at_go, mut cpu_last) = (process_cpu(), process_cpu());
    let mut cpu_pct_max: f64 = 0.0;
    let mut second = 0u64;
    let mut second_start = go;
    let mut next_tick = Instant::now() + HICCUP_TICK;
    let mut report = |now: Instant, interval: &mut Histogram<u64>, second: u64, start: Instant| {
        let cpu = process_cpu();
        let pct = cpu_pct(cpu.saturating_sub(cpu_last), now - start);
        cpu_last = cpu;
        cpu_pct_max = cpu_pct_max.max(pct);
        let taken = recorder.take_interval();
        emit(IntervalReport {
            second,
            length_s: (now - start).as_secs_f64(),
            response: HistogramDump::of(&taken.response),
            corrected: HistogramDump::of(&taken.corrected),
            hiccup: HistogramDump::of(interval),
            cpu_pct: pct,
            threads,
        });
        interval.reset();
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_tick.into()) => {}
            _ = &mut end => break,
        }
        let now = Instant::now();
        let late = micros(now.saturating_duration_since(next_tick));
        interval.saturating_record(late);
        total.saturating_record(late);
        next_tick = now + HICCUP_TICK;
        let boundary = go + INTERVAL * (second as u32 + 1);
        if now >= boundary {
            report(now, &mut interval, second, second_start);
            second += 1;
            second_start = now;
        }
    }
    let now = Instant::now();
    if now > second_start {
        report(now, &mut interval, second, second_start);
    }
    MeterTotals {
        hiccup: total,
        cpu_pct_avg: cpu_pct(process_cpu().saturating_sub(cpu_at_go), now - go),
        cpu_pct_max,
        threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_a_share_of_one_core() {
        assert_eq!(
            cpu_pct(Duration::from_millis(500), Duration::from_secs(1)),
            50.0
        );
        assert_eq!(
            cpu_pct(Duration::from_secs(3), Duration::from_secs(2)),
            150.0
        );
        assert_eq!(cpu_pct(Duration::from_secs(1), Duration::ZERO), 0.0);
        // This test process has used some CPU already.
        assert!(process_cpu() > Duration::ZERO);
    }
}
