//! The numbers a run is judged by, computed once from the joined outcome and shown three ways:
//! the table on stderr, `--json` on stdout, and the report's Summary sheet.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::Workload;
use crate::coordinator::{Lost, Outcome};
use crate::failure::{count_by_cause, Failure};
use crate::session::ConnectionRecord;

/// Response-time statistics in milliseconds. All zero when no message was answered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub min: f64,
    pub avg: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// The statistics with the names the report uses, in report order.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("avg", self.avg),
            ("p50", self.p50),
            ("p90", self.p90),
            ("p99", self.p99),
            ("p99.9", self.p999),
            ("max", self.max),
            ("min", self.min),
        ]
    }

    /// From a histogram of microseconds. Percentiles are the histogram's (3 significant digits);
    /// min and max are exact to the same precision.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            min: ms(h.min()),
            avg: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One part of the run: an agent (client PC) or a backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub connections: u64,
    pub connections_ok: u64,
    pub connections_failed: u64,
    pub connections_lost: u64,
    pub messages: u64,
    pub messages_per_sec: f64,
    pub response_ms: Latency,
}

impl Group {
    /// Counts from `records`, response times from `h` (the group's own merged histogram).
    pub fn of<'a>(
        name: &str,
        records: impl Iterator<Item = &'a ConnectionRecord>,
        h: &Histogram<u64>,
        exchange_s: f64,
    ) -> Group {
        let mut g = Group {
            name: name.to_string(),
            connections: 0,
            connections_ok: 0,
            connections_failed: 0,
            connections_lost: 0,
            messages: 0,
            messages_per_sec: 0.0,
            response_ms: Latency::of(h),
        };
        for r in records {
            g.connections += 1;
            if r.established() {
                g.connections_ok += 1;
                g.connections_lost += u64::from(r.failure.is_some());
            } else {
                g.connections_failed += 1;
            }
            g.messages += r.messages;
        }
        g.messages_per_sec = per_sec(g.messages, exchange_s);
        g
    }
}

/// The run's summary; also the `--json` document (field names are relied on by scripts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub host: String,
    pub port: u16,
    pub server_name: String,
    pub tls: bool,
    pub message: String,
    pub message_bytes: u64,
    /// Messages per connection asked for (`--count`), if so.
    pub count: Option<u64>,
    /// Seconds of phase 2 asked for (`--duration`), if so.
    pub duration_asked_s: Option<f64>,
    pub rate: Option<f64>,
    pub connect_rate: f64,
    pub processes: u64,
    pub started_at: String,
    pub ended_at: String,
    pub connections: u64,
    /// Connections that got through connect and handshake.
    pub connections_ok: u64,
    /// Connections that did not.
    pub connections_failed: u64,
    /// Connections that were up but failed while exchanging messages.
    pub connections_lost: u64,
    pub messages: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Phase 1: opening every connection, until the barrier.
    pub connect_s: f64,
    /// Phase 2: from the barrier until the last connection finished.
    pub duration_s: f64,
    pub messages_per_sec: f64,
    pub response_ms: Latency,
    /// Measured from the intended send time (only with `--rate`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub corrected_response_ms: Option<Latency>,
    /// Failures by cause; every cause is present.
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    /// Where the spreadsheet was written (`None` if writing it failed).
    pub report: Option<String>,
    /// Per agent (client PC), with `--agents`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub agents: Vec<Group>,
    /// Agents (or worker processes) lost or too slow for the barrier, and why.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub agents_lost: Vec<Lost>,
    /// Per backend, as the forwarder reported them (`--forwarder`); `unknown` last, if any.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub backends: Vec<Group>,
    /// Why the forwarder could not be asked.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backends_error: Option<String>,
}

impl Summary {
    pub fn of(outcome: &Outcome) -> Summary {
        let c = &outcome.config;
        let records = &outcome.records;
        let connections_ok = records.iter().filter(|r| r.established()).count() as u64;
        let connections_lost = records
            .iter()
            .filter(|r| r.established() && r.failure.is_some())
            .count() as u64;
        let messages: u64 = records.iter().map(|r| r.messages).sum();
        let failures: Vec<&Failure> = records.iter().filter_map(|r| r.failure.as_ref()).collect();
        let errors: BTreeMap<String, u64> = count_by_cause(failures.iter().copied())
            .into_iter()
            .map(|(cause, n)| (cause.name().to_string(), n))
            .collect();
        Summary {
            host: c.host.clone(),
            port: c.addr.port(),
            server_name: c.server_name.clone(),
            tls: c.tls(),
            message: c.message.clone(),
            message_bytes: c.message.len() as u64,
            count: match c.workload {
                Workload::Count(m) => Some(m),
                Workload::DurationSecs(_) => None,
            },
            duration_asked_s: match c.workload {
                Workload::DurationSecs(s) => Some(s),
                Workload::Count(_) => None,
            },
            rate: c.rate,
            connect_rate: c.connect_rate,
            processes: outcome.processes,
            started_at: outcome
                .started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, false),
            ended_at: outcome
                .ended_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, false),
            connections: records.len() as u64,
            connections_ok,
            connections_failed: records.len() as u64 - connections_ok,
            connections_lost,
            messages,
            bytes_sent: records.iter().map(|r| r.bytes_sent).sum(),
            bytes_received: records.iter().map(|r| r.bytes_received).sum(),
            connect_s: outcome.connect_s,
            duration_s: outcome.exchange_s,
            messages_per_sec: per_sec(messages, outcome.exchange_s),
            response_ms: Latency::of(&outcome.response),
            corrected_response_ms: c.rate.map(|_| Latency::of(&outcome.corrected)),
            errors_total: failures.len() as u64,
            errors,
            report: None,
            agents: outcome
                .agents
                .iter()
                .map(|a| {
                    let mine = records.iter().filter(|r| r.agent.as_ref() == Some(&a.name));
                    Group::of(&a.name, mine, &a.response, outcome.exchange_s)
                })
                .collect(),
            agents_lost: outcome.lost.clone(),
            backends: backend_groups(outcome),
            backends_error: outcome.backends_error.clone(),
        }
    }

    /// The table printed on stderr at the end.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<22} {v}");
        };
        row(
            "target",
            format!(
                "{}:{} ({})",
                self.host,
                self.port,
                if self.tls { "TLS" } else { "plain TCP" }
            ),
        );
        row(
            "connections",
            format!(
                "{} ({} up, {} failed to open, {} lost) over {} process{}",
                self.connections,
                self.connections_ok,
                self.connections_failed,
                self.connections_lost,
                self.processes,
                if self.processes == 1 { "" } else { "es" }
            ),
        );
        row("connect phase", format!("{:.2} s", self.connect_s));
        row(
            "messages",
            format!(
                "{} in {:.2} s = {:.0} msg/s ({} bytes sent, {} received)",
                self.messages,
                self.duration_s,
                self.messages_per_sec,
                self.bytes_sent,
                self.bytes_received
            ),
        );
        let lat = |l: &Latency| {
            format!(
                "avg {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                l.avg, l.p50, l.p90, l.p99, l.p999, l.max
            )
        };
        row("response ms", lat(&self.response_ms));
        if let Some(c) = &self.corrected_response_ms {
            row("corrected ms", lat(c));
        }
        let errors: Vec<String> = self
            .errors
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        row(
            "errors",
            if errors.is_empty() {
                "none".to_string()
            } else {
                format!("{} ({})", self.errors_total, errors.join(", "))
            },
        );
        let group = |g: &Group| {
            format!(
                "{} connections ({} up), {} messages = {:.0} msg/s, avg {:.3} p50 {:.3} p99 {:.3} ms",
                g.connections,
                g.connections_ok,
                g.messages,
                g.messages_per_sec,
                g.response_ms.avg,
                g.response_ms.p50,
                g.response_ms.p99
            )
        };
        for a in &self.agents {
            row(&format!("agent {}", a.name), group(a));
        }
        for l in &self.agents_lost {
            row("lost", format!("{}: {}", l.who, l.reason));
        }
        for b in &self.backends {
            row(&format!("backend {}", b.name), group(b));
        }
        if let Some(e) = &self.backends_error {
            row("backends", e.clone());
        }
        if let Some(r) = &self.report {
            row("report", r.clone());
        }
        t
    }
}

/// One group per backend the forwarder named, then `unknown` if any connection was not listed.
fn backend_groups(outcome: &Outcome) -> Vec<Group> {
    let Some((map, hists)) = &outcome.backends else {
        return Vec::new();
    };
    (0..map.slots())
        .filter_map(|slot| {
            let name = map.name(slot);
            let mine: Vec<&ConnectionRecord> = outcome
                .records
                .iter()
                .filter(|r| r.backend.as_deref() == Some(name))
                .collect();
            let known = slot < map.names.len();
            (known || !mine.is_empty())
                .then(|| Group::of(name, mine.into_iter(), &hists[slot], outcome.exchange_s))
        })
        .collect()
}

/// Rate over a duration; 0 for an empty duration instead of infinity.
pub fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::new_histogram;

    #[test]
    fn percentiles_of_one_to_a_thousand_ms() {
        let mut h = new_histogram();
        for ms in 1..=1000u64 {
            h.record(ms * 1000).unwrap();
        }
        let l = Latency::of(&h);
        // 3 significant digits: each value is within 0.1% of the exact answer.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1e-9;
        assert!(near(l.min, 1.0), "{l:?}");
        assert!(near(l.p50, 500.0), "{l:?}");
        assert!(near(l.p90, 900.0), "{l:?}");
        assert!(near(l.p99, 990.0), "{l:?}");
        assert!(near(l.p999, 999.0), "{l:?}");
        assert!(near(l.max, 1000.0), "{l:?}");
        assert!(near(l.avg, 500.5), "{l:?}");
    }

    #[test]
    fn empty_histogram_gives_zeros_and_rates_never_divide_by_zero() {
        assert_eq!(Latency::of(&new_histogram()), Latency::default());
        assert_eq!(per_sec(10, 0.0), 0.0);
        assert_eq!(per_sec(771_047, 15.0), 771_047.0 / 15.0);
    }

    #[test]
    fn a_skewed_tail_shows_in_the_high_percentiles_only() {
        let mut h = new_histogram();
        h.record_n(2_000, 990).unwrap(); // 2 ms
        h.record_n(400_000, 10).unwrap(); // 400 ms
        let l = Latency::of(&h);
        assert_eq!(l.p50, 2.0);
        assert_eq!(l.p90, 2.0);
        assert!((l.p999 - 400.0).abs() < 0.5, "{l:?}");
        assert!((l.avg - (2.0 * 0.99 + 400.0 * 0.01)).abs() < 0.5, "{l:?}");
    }
}
