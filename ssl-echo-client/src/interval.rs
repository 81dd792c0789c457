//! The coordinator's side of the per-second reports: joins every process's [`IntervalReport`]
//! for the same second (histograms added bucket by bucket), then writes one `--json-lines`
//! record and one `--hdr-log` interval per second, and keeps what the live line shows (CPU per
//! process, hiccups, whether the client is saturated).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::meter::IntervalReport;
use crate::recorder::new_histogram;

/// A process whose one-second CPU is above this share of what its threads can get is saturated:
/// the figures may then be the client's limit, not the target's (Locust warns at 90 % too).
pub const SATURATED_PCT: f64 = 90.0;

/// Intervals shorter than this (the last, partial one) are not judged for saturation.
const MIN_JUDGED_S: f64 = 0.5;

/// One second, every process joined.
struct Joined {
    seen: usize,
    length_s: f64,
    response: Histogram<u64>,
    corrected: Histogram<u64>,
    hiccup: Histogram<u64>,
    /// (process, CPU %, threads)
    cpu: Vec<(usize, f64, u32)>,
}

/// Percentiles of one interval, in ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(h: &Histogram<u64>) -> Spread {
        if h.is_empty() {
            return Spread::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Spread {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// One `--json-lines` record.
#[derive(Debug, Clone, Serialize)]
pub struct SecondRecord {
    /// 1-based second of phase 2 (as the Timeline sheet).
    pub second: u64,
    pub length_s: f64,
    pub messages: u64,
    pub messages_per_sec: f64,
    /// As measured from the send.
    pub response_ms: Spread,
    /// From the intended send time (`--rate` only), failed sends included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_ms: Option<Spread>,
    /// How late the hiccup timer fired, worst process.
    pub hiccup_ms: Spread,
    /// CPU per process, % of one core, by process number.
    pub cpu_pct: Vec<f64>,
    /// A process used more than 90 % of what its threads can get.
    pub client_saturated: bool,
    /// Connections open and errors so far (all processes).
    pub open: u64,
    pub errors: u64,
}

/// What the live line shows of the latest joined second.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latest {
    pub cpu_pct_max: f64,
    pub hiccup_p99_ms: f64,
    pub saturated: bool,
}

/// The `--hdr-log` file: HdrHistogram's interval-log format (the crate's own writer), one
/// interval per second; under `--rate` the untagged histograms are the corrected ones and the
/// measured ones are tagged `uncorrected`.
struct HdrLog {
    out: BufWriter<File>,
    serializer: V2DeflateSerializer,
}

pub struct Intervals {
    shards: usize,
    pending: BTreeMap<u64, Joined>,
    corrected: bool,
    json_lines: Option<BufWriter<File>>,
    hdr_log: Option<HdrLog>,
    latest: Latest,
    /// Seconds in which some process was saturated.
    pub saturated_seconds: u64,
    problem: Option<String>,
}

impl Intervals {
    /// `shards` processes report; `corrected`: the run has a schedule (`--rate`).
    pub fn new(
        shards: usize,
        corrected: bool,
        json_lines: Option<&Path>,
        hdr_log: Option<&Path>,
    ) -> anyhow::Result<Intervals> {
        let create = |p: &Path, flag: &str| -> anyhow::Result<BufWriter<File>> {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("{flag} {}: creating its folder", p.display()))?;
            }
            Ok(BufWriter::new(File::create(p).with_context(|| {
                format!("{flag} {}: cannot create it", p.display())
            })?))
        };
        let json_lines = json_lines.map(|p| create(p, "--json-lines")).transpose()?;
        let hdr_log = match hdr_log {
            Some(p) => {
                let mut out = create(p, "--hdr-log")?;
                let mut serializer = V2DeflateSerializer::new();
                IntervalLogWriterBuilder::new()
                    .add_comment("ssl-echo-client response times in microseconds")
                    .add_comment(if corrected {
                        "untagged: from the intended send time (--rate); Tag=uncorrected: from the send"
                    } else {
                        "untagged: from the send"
                    })
                    .with_start_time(SystemTime::now())
                    .begin_log_with(&mut out, &mut serializer)
                    .with_context(|| format!("--hdr-log {}: writing", p.display()))?;
                writeln!(
                    out,
                    "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
                )?;
                Some(HdrLog { out, serializer })
            }
            None => None,
        };
        Ok(Intervals {
            shards: shards.max(1),
            pending: BTreeMap::new(),
            corrected,
            json_lines,
            hdr_log,
            latest: Latest::default(),
            saturated_seconds: 0,
            problem: None,
        })
    }

    /// What the live line shows.
    pub fn latest(&self) -> Latest {
        self.latest
    }

    /// Process `shard` reported a second; `live` = (open, errors) so far.
    pub fn add(&mut self, shard: usize, r: IntervalReport, live: (u64, u64)) {
        let j = self.pending.entry(r.second).or_insert_with(|| Joined {
            seen: 0,
            length_s: 0.0,
            response: new_histogram(),
            corrected: new_histogram(),
            hiccup: new_histogram(),
            cpu: Vec::new(),
        });
        j.seen += 1;
        j.length_s = j.length_s.max(r.length_s);
        r.response.merge_into(&mut j.response);
        r.corrected.merge_into(&mut j.corrected);
        r.hiccup.merge_into(&mut j.hiccup);
        j.cpu.push((shard, r.cpu_pct, r.threads));
        // A second is complete when every process sent it, or when a later one is well under
        // way (a process that is lost or late does not hold the stream back).
        let newest = *self.pending.keys().next_back().unwrap_or(&0);
        let ready: Vec<u64> = self
            .pending
            .iter()
            .filter(|(s, j)| j.seen >= self.shards || **s + 2 <= newest)
            .map(|(s, _)| *s)
            .collect();
        for s in ready {
            self.flush(s, live);
        }
    }

    /// Writes every second still pending (the run ended) and flushes the files.
    pub fn finish(&mut self, live: (u64, u64)) -> Option<String> {
        let all: Vec<u64> = self.pending.keys().copied().collect();
        for s in all {
            self.flush(s, live);
        }
        if let Some(w) = &mut self.json_lines {
            if let Err(e) = w.flush() {
                self.problem.get_or_insert(format!("--json-lines: {e}"));
            }
        }
        if let Some(h) = &mut self.hdr_log {
            if let Err(e) = h.out.flush() {
                self.problem.get_or_insert(format!("--hdr-log: {e}"));
            }
        }
        self.problem.take()
    }

    fn flush(&mut self, second: u64, (open, errors): (u64, u64)) {
        let Some(j) = self.pending.remove(&second) else {
            return;
        };
        let mut cpu: Vec<(usize, f64, u32)> = j.cpu.clone();
        cpu.sort_by_key(|c| c.0);
        // A short last interval (the closes at the end) says little: judged on whole seconds.
        let saturated = j.length_s >= MIN_JUDGED_S
            && cpu
                .iter()
                .any(|&(_, pct, threads)| pct > SATURATED_PCT * f64::from(threads.max(1)));
        self.saturated_seconds += u64::from(saturated);
        let hiccup = Spread::of(&j.hiccup);
        self.latest = Latest {
            cpu_pct_max: cpu.iter().map(|c| c.1).fold(0.0, f64::max),
            hiccup_p99_ms: hiccup.p99,
            saturated,
        };
        let length = j.length_s.max(1e-3);
        if let Some(w) = &mut self.json_lines {
            let record = SecondRecord {
                second: second + 1,
                length_s: j.length_s,
                messages: j.response.len(),
                messages_per_sec: j.response.len() as f64 / length,
                response_ms: Spread::of(&j.response),
                corrected_ms: self.corrected.then(|| Spread::of(&j.corrected)),
                hiccup_ms: hiccup,
                cpu_pct: cpu.iter().map(|c| (c.1 * 10.0).round() / 10.0).collect(),
                client_saturated: saturated,
                open,
                errors,
            };
            // Our own plain data: serialising cannot fail.
            let line = serde_json::to_string(&record).expect("record serialises");
            if let Err(e) = writeln!(w, "{line}").and_then(|()| w.flush()) {
                self.problem.get_or_insert(format!("--json-lines: {e}"));
            }
        }
        if let Some(h) = &mut self.hdr_log {
            let start = Duration::from_secs(second);
            let length = Duration::from_secs_f64(j.length_s.max(0.0));
            let main = if self.corrected {
                &j.corrected
            } else {
                &j.response
            };
            let mut written = IntervalLogWriterBuilder::new()
                .begin_log_with(&mut h.out, &mut h.serializer)
                .map_err(|e| e.to_string())
                .and_then(|mut w| {
                    w.write_histogram(main, start, length, None)
                        .map_err(|e| e.to_string())?;
                    if self.corrected {
                        w.write_histogram(&j.response, start, length, Tag::new("uncorrected"))
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                });
            if written.is_ok() {
                written = h.out.flush().map_err(|e| e.to_string());
            }
            if let Err(e) = written {
                self.problem.get_or_insert(format!("--hdr-log: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::HistogramDump;

    fn report(second: u64, us: &[u64], cpu: f64) -> IntervalReport {
        let mut h = new_histogram();
        for &v in us {
            h.record(v).unwrap();
        }
        IntervalReport {
            second,
            length_s: 1.0,
            response: HistogramDump::of(&h),
            corrected: HistogramDump::of(&h),
            hiccup: HistogramDump::of(&h),
            cpu_pct: cpu,
            threads: 1,
        }
    }

    #[test]
    fn seconds_are_joined_over_processes_and_written_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (jl, hl) = (dir.path().join("s.jsonl"), dir.path().join("s.hlog"));
        let mut i = Intervals::new(2, true, Some(&jl), Some(&hl)).unwrap();
        i.add(0, report(0, &[1000, 2000], 50.0), (4, 0));
        i.add(0, report(1, &[3000], 95.0), (4, 0));
        // Second 0 waits for process 1.
        assert_eq!(std::fs::read_to_string(&jl).unwrap(), "");
        i.add(1, report(0, &[4000], 20.0), (4, 0));
        assert!(i.finish((3, 1)).is_none());
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&jl)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["second"], 1);
        assert_eq!(lines[0]["messages"], 3);
        assert_eq!(lines[0]["cpu_pct"], serde_json::json!([50.0, 20.0]));
        assert_eq!(lines[0]["client_saturated"], false);
        assert_eq!(lines[1]["second"], 2);
        assert_eq!(lines[1]["client_saturated"], true);
        assert_eq!(lines[1]["errors"], 1);
        assert!((lines[0]["response_ms"]["max"].as_f64().unwrap() - 4.0).abs() < 0.01);
        assert_eq!(i.saturated_seconds, 1);

        // The log reads back with the crate's own reader: two seconds, each tagged twice.
        let log = std::fs::read(&hl).unwrap();
        let entries: Vec<_> =
            hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log)
                .filter_map(|e| match e.unwrap() {
                    hdrhistogram::serialization::interval_log::LogEntry::Interval(h) => Some((
                        h.tag().map(|t| t.as_str().to_string()),
                        h.start_timestamp().as_secs(),
                    )),
                    _ => None,
                })
                .collect();
        assert_eq!(
            entries,
            [
                (None, 0),
                (Some("uncorrected".to_string()), 0),
                (None, 1),
                (Some("uncorrected".to_string()), 1)
            ]
        );
    }
}
