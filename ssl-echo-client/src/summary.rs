//! The numbers a run is judged by, computed once from the joined outcome and shown three ways:
//! the table on stderr, `--json` on stdout, and the report's Summary sheet.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::Workload;
use crate::coordinator::{Lost, Outcome, ProcessCpu};
use crate::failure::{count_by_cause, Failure};
use crate::fairness::Fairness;
use crate::recorder::new_histogram;
use crate::session::ConnectionRecord;
use crate::slo::{Figures, Slo, Stat, Verdict};

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
    /// From the intended send time (only with `--rate`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub corrected_response_ms: Option<Latency>,
    /// Messages per connection over the group's connections that were up.
    #[serde(default)]
    pub fairness: Fairness,
}

impl Group {
    /// Counts from `records`, response times from `h` (the group's own merged histogram) and
    /// `corrected` (with `--rate`); msg/s over the send window `window_s`.
    pub fn of<'a>(
        name: &str,
        records: impl Iterator<Item = &'a ConnectionRecord>,
        h: &Histogram<u64>,
        corrected: Option<&Histogram<u64>>,
        window_s: f64,
    ) -> Group {
        let records: Vec<&ConnectionRecord> = records.collect();
        let mut g = Group {
            name: name.to_string(),
            connections: 0,
            connections_ok: 0,
            connections_failed: 0,
            connections_lost: 0,
            messages: 0,
            messages_per_sec: 0.0,
            response_ms: Latency::of(h),
            corrected_response_ms: corrected.map(Latency::of),
            fairness: fairness_of(records.iter().copied()),
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
        g.messages_per_sec = per_sec(g.messages, window_s);
        g
    }

    /// The latency the group is judged by: corrected under `--rate`.
    pub fn headline(&self) -> &Latency {
        self.corrected_response_ms
            .as_ref()
            .unwrap_or(&self.response_ms)
    }
}

/// Messages per connection over the connections that were up for phase 2.
fn fairness_of<'a>(records: impl Iterator<Item = &'a ConnectionRecord>) -> Fairness {
    Fairness::of(records.filter(|r| r.established()).map(|r| r.messages))
}

/// The closed-loop reading of Little's law: with N connections each waiting for its echo
/// before sending again, the mean response time is N / throughput, whatever the server does:
/// the latency of a closed loop is set by the number of connections.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LittlesLaw {
    pub connections: u64,
    /// N / msg/s, in ms.
    pub predicted_avg_ms: f64,
    pub measured_avg_ms: f64,
}

impl LittlesLaw {
    pub fn line(&self, rate: f64) -> String {
        format!(
            "closed loop: {} connections / {:.0} msg/s = {:.1} ms mean response by Little's law \
             (measured {:.1} ms); the latency is set by the connection count, use --rate R for \
             the latency at a given load",
            self.connections, rate, self.predicted_avg_ms, self.measured_avg_ms
        )
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
    /// Messages answered per second over the send window (from the go to the end of sending).
    pub messages_per_sec: f64,
    /// The steady window: from the go to the end of sending (the deadline with `--duration`,
    /// the last echo with `--count`).
    #[serde(default)]
    pub send_window_s: f64,
    /// From the end of sending to the last echo, and the echoes that came in it.
    #[serde(default)]
    pub drain_s: f64,
    #[serde(default)]
    pub messages_drained: u64,
    /// With `--rate`: what was asked (connections up × rate) and the scheduled sends that
    /// failed with their connection.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offered_messages_per_sec: Option<f64>,
    #[serde(default)]
    pub sends_failed: u64,
    /// Keep-alive messages echoed at the barrier (`--keepalive-s`), not in the figures.
    #[serde(default)]
    pub keepalives: u64,
    /// Closed loop only: N / rate against the measured mean.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub littles_law: Option<LittlesLaw>,
    /// Messages per connection (connections up): min, p1, median, max, Jain's index.
    #[serde(default)]
    pub fairness: Fairness,
    /// Connect plus handshake per connection that opened, ms.
    #[serde(default)]
    pub handshake_ms: Latency,
    /// How late the client's hiccup timer fired (1 ms timer): the client's own stalls.
    #[serde(default)]
    pub hiccup_ms: Latency,
    /// CPU per client process over phase 2 (% of one core).
    #[serde(default)]
    pub client_cpu: Vec<ProcessCpu>,
    /// Seconds in which a client process used more than 90 % of what its threads can get.
    #[serde(default)]
    pub client_saturated_seconds: u64,
    /// The objectives (`--slo`), judged on the corrected figures under `--rate`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub slo: Vec<Verdict>,
    /// Why `--json-lines` or `--hdr-log` is incomplete.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub streams_error: Option<String>,
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
    /// What the TLS handshakes negotiated (TLS runs only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub negotiated: Option<TlsNegotiated>,
    /// Handshake capacity (`--churn` runs only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub churn: Option<ChurnFigures>,
}

/// Counts of what the handshakes settled on, over every connection that finished one.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsNegotiated {
    pub handshakes: u64,
    /// By version (`TLSv1.3`, `TLSv1.2`).
    pub versions: BTreeMap<String, u64>,
    /// By rustls suite name.
    pub suites: BTreeMap<String, u64>,
    /// By ALPN protocol; `none` when the server chose none.
    pub alpn: BTreeMap<String, u64>,
    /// Handshakes the server resumed from an earlier session (`--resume`).
    pub resumed: u64,
    /// resumed / handshakes, in percent.
    pub resumed_pct: f64,
}

impl TlsNegotiated {
    /// From the records; `None` when no connection finished a TLS handshake.
    pub fn of(records: &[ConnectionRecord]) -> Option<TlsNegotiated> {
        let mut n = TlsNegotiated::default();
        for t in records.iter().filter_map(ConnectionRecord::tls) {
            n.handshakes += 1;
            *n.versions.entry(t.version.clone()).or_insert(0) += 1;
            *n.suites.entry(t.suite.clone()).or_insert(0) += 1;
            let alpn = t.alpn.clone().unwrap_or_else(|| "none".into());
            *n.alpn.entry(alpn).or_insert(0) += 1;
            n.resumed += u64::from(t.resumed);
        }
        n.resumed_pct = 100.0 * n.resumed as f64 / n.handshakes.max(1) as f64;
        (n.handshakes > 0).then_some(n)
    }

    /// The terminal's short line: `TLSv1.3 ×40 · TLS13_AES_256_GCM_SHA384 ×40 · ALPN h2 ×40 ·
    /// resumed 38 of 40 (95.0 %)`.
    pub fn line(&self) -> String {
        let counts = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} ×{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{} · {} · ALPN {} · resumed {} of {} ({:.1} %)",
            counts(&self.versions),
            counts(&self.suites),
            counts(&self.alpn),
            self.resumed,
            self.handshakes,
            self.resumed_pct
        )
    }
}

/// Handshake capacity: what `--churn` asked for and what the server gave.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChurnFigures {
    /// New connections per second asked for, and over how many seconds.
    pub asked_per_sec: f64,
    pub window_s: f64,
    /// Connections started (all of them unless the run was stopped).
    pub opened: u64,
    /// Connections that finished connect and handshake.
    pub established: u64,
    pub failed: u64,
    /// Established connections per second, between the first and the last to finish their
    /// handshake (a server that falls behind stretches that span, so this drops).
    pub achieved_per_sec: f64,
    /// achieved / asked, in percent.
    pub achieved_pct: f64,
    /// TLS handshake times (for plain TCP: connect times).
    pub handshake_ms: Latency,
    pub connect_ms: Latency,
    /// Starts more than [`crate::churn::LATE_START`] behind schedule (the client fell behind,
    /// or ran out of descriptors), and the worst lag.
    pub started_late: u64,
    pub start_lag_max_ms: f64,
}

impl ChurnFigures {
    pub fn of(churn: &crate::config::Churn, records: &[ConnectionRecord]) -> ChurnFigures {
        let mut handshake = crate::recorder::new_histogram();
        let mut connect = crate::recorder::new_histogram();
        let us = |ms: f64| (ms * 1000.0).round().max(1.0) as u64;
        let mut done: Vec<f64> = Vec::new();
        let late_ms = crate::churn::LATE_START.as_secs_f64() * 1000.0;
        let mut f = ChurnFigures {
            asked_per_sec: churn.rate,
            window_s: churn.window_s,
            ..ChurnFigures::default()
        };
        for r in records.iter().filter(|r| r.churn_start().is_some()) {
            f.opened += 1;
            let lag = r.churn_start().map_or(0.0, |c| c.start_lag_ms);
            f.started_late += u64::from(lag > late_ms);
            f.start_lag_max_ms = f.start_lag_max_ms.max(lag);
            let Some(at) = r.established_ms() else {
                f.failed += 1;
                continue;
            };
            f.established += 1;
            done.push(at);
            if let Some(c) = r.connect_ms {
                connect.saturating_record(us(c));
            }
            if let Some(h) = r.handshake_ms.or(r.connect_ms) {
                handshake.saturating_record(us(h));
            }
        }
        done.sort_by(f64::total_cmp);
        if let (Some(first), Some(last)) = (done.first(), done.last()) {
            let span_s = (last - first) / 1000.0;
            if done.len() >= 2 && span_s > 0.0 {
                f.achieved_per_sec = (done.len() - 1) as f64 / span_s;
            }
        }
        f.achieved_pct = 100.0 * f.achieved_per_sec / churn.rate;
        f.handshake_ms = Latency::of(&handshake);
        f.connect_ms = Latency::of(&connect);
        f
    }

    /// The terminal's line.
    pub fn line(&self) -> String {
        format!(
            "asked {:.1}/s for {:.1} s: {} opened, {} up, {} failed; achieved {:.1}/s ({:.1} % of \
             asked); handshake p50 {:.3} p99 {:.3} max {:.3} ms; {} started late (max lag {:.1} ms)",
            self.asked_per_sec,
            self.window_s,
            self.opened,
            self.established,
            self.failed,
            self.achieved_per_sec,
            self.achieved_pct,
            self.handshake_ms.p50,
            self.handshake_ms.p99,
            self.handshake_ms.max,
            self.started_late,
            self.start_lag_max_ms
        )
    }
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
            message: c.payload_name(),
            message_bytes: c.payload_bytes().map_or(0, |p| p.len() as u64),
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
            messages_per_sec: per_sec(messages, outcome.window.send_window_s),
            send_window_s: outcome.window.send_window_s,
            drain_s: outcome.window.drain_s,
            messages_drained: outcome.window.drained,
            offered_messages_per_sec: c.rate.map(|r| r * connections_ok as f64),
            sends_failed: records.iter().map(|r| r.sends_failed).sum(),
            keepalives: records.iter().map(|r| r.keepalives).sum(),
            littles_law: (c.rate.is_none() && messages > 0).then(|| {
                let active = records.iter().filter(|r| r.established()).count() as u64;
                LittlesLaw {
                    connections: active,
                    predicted_avg_ms: 1000.0 * active as f64
                        / per_sec(messages, outcome.window.send_window_s).max(1e-9),
                    measured_avg_ms: outcome.response.mean() / 1000.0,
                }
            }),
            fairness: fairness_of(records.iter()),
            handshake_ms: handshake_latency(records),
            hiccup_ms: Latency::of(&outcome.hiccup),
            client_cpu: outcome.cpu.clone(),
            client_saturated_seconds: outcome.saturated_seconds,
            slo: Vec::new(),
            streams_error: outcome.streams_error.clone(),
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
                    Group::of(
                        &a.name,
                        mine,
                        &a.response,
                        c.rate.map(|_| &a.corrected),
                        outcome.window.send_window_s,
                    )
                })
                .collect(),
            agents_lost: outcome.lost.clone(),
            backends: backend_groups(outcome),
            backends_error: outcome.backends_error.clone(),
            negotiated: TlsNegotiated::of(records),
            churn: c
                .churn
                .as_ref()
                .map(|churn| ChurnFigures::of(churn, records)),
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
        row(
            "connect phase",
            if self.keepalives > 0 {
                format!(
                    "{:.2} s ({} keep-alive echoes at the barrier)",
                    self.connect_s, self.keepalives
                )
            } else {
                format!("{:.2} s", self.connect_s)
            },
        );
        row(
            "messages",
            format!(
                "{} in the {:.2} s send window = {:.0} msg/s ({} bytes sent, {} received)",
                self.messages,
                self.send_window_s,
                self.messages_per_sec,
                self.bytes_sent,
                self.bytes_received
            ),
        );
        row(
            "drain",
            format!(
                "{:.2} s after the end of sending, {} echoes (phase 2 {:.2} s in all)",
                self.drain_s, self.messages_drained, self.duration_s
            ),
        );
        if let Some(offered) = self.offered_messages_per_sec {
            row(
                "offered vs achieved",
                format!(
                    "{:.0} msg/s asked, {:.0} achieved ({:.1} %), {} scheduled sends failed",
                    offered,
                    self.messages_per_sec,
                    if offered > 0.0 {
                        100.0 * self.messages_per_sec / offered
                    } else {
                        0.0
                    },
                    self.sends_failed
                ),
            );
        }
        let f = &self.fairness;
        row(
            "per connection",
            format!(
                "messages min {}  p1 {}  median {}  max {}  Jain's index {:.3}",
                f.min, f.p1, f.median, f.max, f.jain
            ),
        );
        let lat = |l: &Latency| {
            format!(
                "avg {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                l.avg, l.p50, l.p90, l.p99, l.p999, l.max
            )
        };
        match &self.corrected_response_ms {
            Some(c) => {
                row(
                    "response ms",
                    format!("{} (from the intended send)", lat(c)),
                );
                row("uncorrected ms", lat(&self.response_ms));
            }
            None => row("response ms", lat(&self.response_ms)),
        }
        if let Some(l) = &self.littles_law {
            row("little's law", l.line(self.messages_per_sec));
        }
        if self.handshake_ms.max > 0.0 {
            row("open ms", lat(&self.handshake_ms));
        }
        row(
            "client",
            format!(
                "hiccup p50 {:.3}  p99 {:.3}  max {:.3} ms; cpu {}",
                self.hiccup_ms.p50,
                self.hiccup_ms.p99,
                self.hiccup_ms.max,
                self.client_cpu
                    .iter()
                    .map(|c| format!("{:.0}% (max {:.0}%)", c.avg_pct, c.max_pct))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        if let Some(w) = self.saturation_warning() {
            row("WARNING", w);
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
            let l = g.headline();
            format!(
                "{} connections ({} up), {} messages = {:.0} msg/s, avg {:.3} p50 {:.3} p99 {:.3} ms{}, per connection min {} median {} max {} Jain {:.3}",
                g.connections,
                g.connections_ok,
                g.messages,
                g.messages_per_sec,
                l.avg,
                l.p50,
                l.p99,
                if g.corrected_response_ms.is_some() { " (corrected)" } else { "" },
                g.fairness.min,
                g.fairness.median,
                g.fairness.max,
                g.fairness.jain
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
        if let Some(n) = &self.negotiated {
            row("negotiated", n.line());
        }
        if let Some(c) = &self.churn {
            row("churn", c.line());
        }
        for v in &self.slo {
            row("slo", v.to_string());
        }
        if let Some(e) = &self.streams_error {
            row("streams", e.clone());
        }
        if let Some(r) = &self.report {
            row("report", r.clone());
        }
        t
    }

    /// The latency the run is judged by: corrected under `--rate`.
    pub fn headline(&self) -> &Latency {
        self.corrected_response_ms
            .as_ref()
            .unwrap_or(&self.response_ms)
    }

    /// Judges the objectives and keeps the verdicts; true when every one passed.
    pub fn judge(&mut self, slos: &[Slo]) -> bool {
        self.slo = slos.iter().map(|s| s.judge(&*self)).collect();
        self.slo.iter().all(|v| v.passed)
    }

    /// Said when a client process was saturated: the figures may be the client's limit.
    pub fn saturation_warning(&self) -> Option<String> {
        (self.client_saturated_seconds > 0).then(|| {
            format!(
                "the client was saturated (a process above 90 % CPU) for {} s of phase 2: the \
                 figures may be the client's limit, not the target's; spread the load over \
                 more processes or agents",
                self.client_saturated_seconds
            )
        })
    }
}

impl Figures for Summary {
    fn response_ms(&self, s: Stat) -> f64 {
        stat_of(self.headline(), s)
    }

    fn handshake_ms(&self, s: Stat) -> Option<f64> {
        (self.connections_ok > 0).then(|| stat_of(&self.handshake_ms, s))
    }

    fn errors(&self) -> (u64, u64) {
        (self.errors_total, self.connections)
    }

    fn rate(&self) -> f64 {
        self.messages_per_sec
    }
}

fn stat_of(l: &Latency, s: Stat) -> f64 {
    match s {
        Stat::Min => l.min,
        Stat::Avg => l.avg,
        Stat::P50 => l.p50,
        Stat::P90 => l.p90,
        Stat::P99 => l.p99,
        Stat::P999 => l.p999,
        Stat::Max => l.max,
    }
}

/// Connect plus handshake time of every connection that opened.
fn handshake_latency(records: &[ConnectionRecord]) -> Latency {
    let mut h = new_histogram();
    for r in records.iter().filter(|r| {
        r.failure
            .as_ref()
            .is_none_or(|f| f.phase == crate::failure::Phase::Exchange)
    }) {
        if let Some(c) = r.connect_ms {
            let ms = c + r.handshake_ms.unwrap_or(0.0);
            h.saturating_record(((ms * 1000.0) as u64).max(1));
        }
    }
    Latency::of(&h)
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
            let corrected = outcome
                .config
                .rate
                .and_then(|_| outcome.backends_corrected.get(slot));
            (known || !mine.is_empty()).then(|| {
                Group::of(
                    name,
                    mine.into_iter(),
                    &hists[slot],
                    corrected,
                    outcome.window.send_window_s,
                )
            })
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

    fn churned(id: u64, started_ms: f64, handshake_ms: Option<f64>) -> ConnectionRecord {
        let mut r = ConnectionRecord::new(id, 0);
        r.opening_mut().churn = Some(crate::session::ChurnStart {
            started_ms,
            start_lag_ms: if id == 3 { 25.0 } else { 0.5 },
        });
        r.connect_ms = Some(1.0);
        r.handshake_ms = handshake_ms;
        if handshake_ms.is_none() {
            r.failure = Some(Failure::timeout(crate::failure::Phase::Handshake, 10));
        }
        r
    }

    #[test]
    fn churn_rate_is_measured_between_the_first_and_last_handshake() {
        let churn = crate::config::Churn {
            rate: 10.0,
            window_s: 0.5,
        };
        // Five due every 100 ms; the server gets slower, so they finish further apart.
        let records: Vec<ConnectionRecord> = vec![
            churned(0, 0.0, Some(2.0)),
            churned(1, 100.0, Some(2.0)),
            churned(2, 200.0, Some(52.0)),
            churned(3, 325.0, Some(102.0)),
            churned(4, 400.0, None),
        ];
        let f = ChurnFigures::of(&churn, &records);
        assert_eq!((f.opened, f.established, f.failed), (5, 4, 1));
        // Done at 3, 103, 253, 428 ms: 3 intervals over 425 ms.
        assert!((f.achieved_per_sec - 3.0 / 0.425).abs() < 1e-9, "{f:?}");
        assert!((f.achieved_pct - 100.0 * 3.0 / 0.425 / 10.0).abs() < 1e-9);
        assert_eq!((f.started_late, f.start_lag_max_ms), (1, 25.0));
        assert!((f.handshake_ms.max - 102.0).abs() < 0.2, "{f:?}");
    }

    #[test]
    fn negotiated_counts_and_the_resumed_share() {
        let mut records = Vec::new();
        for i in 0..4 {
            let mut r = ConnectionRecord::new(i, 0);
            r.opening_mut().tls = Some(crate::tls::Negotiated {
                version: if i == 0 { "TLSv1.2" } else { "TLSv1.3" }.into(),
                suite: "S".into(),
                alpn: (i % 2 == 0).then(|| "h2".to_string()),
                resumed: i > 0,
            });
            records.push(r);
        }
        records.push(ConnectionRecord::new(9, 0)); // failed before its handshake
        let n = TlsNegotiated::of(&records).unwrap();
        assert_eq!(n.handshakes, 4);
        assert_eq!(n.versions["TLSv1.3"], 3);
        assert_eq!(n.alpn["none"], 2);
        assert_eq!(n.resumed, 3);
        assert_eq!(n.resumed_pct, 75.0);
        assert_eq!(
            n.line(),
            "TLSv1.2 ×1, TLSv1.3 ×3 · S ×4 · ALPN h2 ×2, none ×2 · resumed 3 of 4 (75.0 %)"
        );
        assert_eq!(TlsNegotiated::of(&records[4..]), None);
    }

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
