//! Service-level objectives (`--slo 'p99<20ms'`): parsed once from the command line, judged on
//! the run's summary (the corrected response times under `--rate`), shown in every output, and
//! turned into exit status 4 when one fails.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What an objective is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// A response-time statistic (ms): corrected under `--rate`, else as measured.
    Response(Stat),
    /// Time to open a connection (ms): TCP connect plus TLS handshake.
    Handshake(Stat),
    /// Connections that failed or were lost, as a share of all (`%`) or a count.
    Errors,
    /// Messages per second over the send window.
    Rate,
}

/// A statistic over a set of times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    Min,
    Avg,
    P50,
    P90,
    P99,
    P999,
    Max,
}

impl Stat {
    fn parse(s: &str) -> Option<Stat> {
        Some(match s {
            "min" => Stat::Min,
            "avg" | "mean" => Stat::Avg,
            "p50" | "median" => Stat::P50,
            "p90" => Stat::P90,
            "p99" => Stat::P99,
            "p999" | "p99.9" => Stat::P999,
            "max" => Stat::Max,
            _ => return None,
        })
    }

    /// The quantile, or `None` for min, avg and max.
    pub fn quantile(self) -> Option<f64> {
        match self {
            Stat::P50 => Some(0.5),
            Stat::P90 => Some(0.9),
            Stat::P99 => Some(0.99),
            Stat::P999 => Some(0.999),
            Stat::Min | Stat::Avg | Stat::Max => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
}

impl Op {
    fn holds(self, measured: f64, limit: f64) -> bool {
        match self {
            Op::Lt => measured < limit,
            Op::Le => measured <= limit,
            Op::Gt => measured > limit,
            Op::Ge => measured >= limit,
        }
    }
}

/// One objective, e.g. `p99<20ms`: `metric op limit`, the limit in the metric's unit (ms for
/// times, a share for `errors` with `%`, else a count, msg/s for `rate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// As the user wrote it.
    pub text: String,
    pub metric: Metric,
    pub op: Op,
    pub limit: f64,
    /// `errors` given as a percentage (else a count).
    pub percent: bool,
}

impl FromStr for Slo {
    type Err = String;

    fn from_str(text: &str) -> Result<Slo, String> {
        let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let (at, op, len) = ["<=", ">=", "<", ">"]
            .iter()
            .find_map(|o| t.find(o).map(|i| (i, *o, o.len())))
            .ok_or_else(|| format!("{text:?}: expected METRIC<LIMIT, e.g. p99<20ms"))?;
        let op = match op {
            "<=" => Op::Le,
            ">=" => Op::Ge,
            "<" => Op::Lt,
            _ => Op::Gt,
        };
        let (name, value) = (&t[..at], &t[at + len..]);
        let metric = match name.split_once('.') {
            _ if Stat::parse(name).is_some() => {
                Metric::Response(Stat::parse(name).ok_or_else(|| unknown(text, name))?)
            }
            None if name == "errors" => Metric::Errors,
            None if name == "rate" => Metric::Rate,
            None => Metric::Response(Stat::parse(name).ok_or_else(|| unknown(text, name))?),
            Some(("handshake", s)) => {
                Metric::Handshake(Stat::parse(s).ok_or_else(|| unknown(text, name))?)
            }
            Some(("response", s)) => {
                Metric::Response(Stat::parse(s).ok_or_else(|| unknown(text, name))?)
            }
            Some(_) => return Err(unknown(text, name)),
        };
        let split = value
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(value.len());
        let (number, unit) = value.split_at(split);
        let n: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
        let (limit, percent) = match (metric, unit) {
            (Metric::Response(_) | Metric::Handshake(_), "ms") => (n, false),
            (Metric::Response(_) | Metric::Handshake(_), "s") => (n * 1000.0, false),
            (Metric::Response(_) | Metric::Handshake(_), "us" | "µs") => (n / 1000.0, false),
            (Metric::Response(_) | Metric::Handshake(_), _) => {
                return Err(format!(
                    "{text:?}: a time needs a unit (ms, s or us), got {unit:?}"
                ))
            }
            (Metric::Errors, "%") => (n, true),
            (Metric::Errors, "") => (n, false),
            (Metric::Rate, "" | "/s") => (n, false),
            (_, _) => return Err(format!("{text:?}: unexpected unit {unit:?}")),
        };
        Ok(Slo {
            text: text.trim().to_string(),
            metric,
            op,
            limit,
            percent,
        })
    }
}

fn unknown(text: &str, name: &str) -> String {
    format!(
        "{text:?}: unknown figure {name:?} (p50, p90, p99, p99.9, avg, max, min, \
         handshake.p99 ..., errors, rate)"
    )
}

/// The figures an objective can be judged on.
pub trait Figures {
    /// A response-time statistic in ms (the corrected one under `--rate`).
    fn response_ms(&self, s: Stat) -> f64;
    /// Connect plus handshake time in ms, over the connections that opened.
    fn handshake_ms(&self, s: Stat) -> Option<f64>;
    /// Connections that failed or were lost, and all connections.
    fn errors(&self) -> (u64, u64);
    fn rate(&self) -> f64;
}

/// How one objective came out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub slo: String,
    /// The figure, in the objective's unit (ms, %, count, msg/s); `None` if the run has none
    /// (no connection opened): that fails.
    pub measured: Option<f64>,
    pub passed: bool,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let measured = self
            .measured
            .map_or("no figure".to_string(), |m| format!("{m:.3}"));
        let ok = if self.passed { "pass" } else { "FAIL" };
        write!(f, "{ok}  {} (measured {measured})", self.slo)
    }
}

impl Slo {
    pub fn judge(&self, figures: &impl Figures) -> Verdict {
        let measured = match self.metric {
            Metric::Response(s) => Some(figures.response_ms(s)),
            Metric::Handshake(s) => figures.handshake_ms(s),
            Metric::Errors => {
                let (bad, all) = figures.errors();
                Some(if self.percent {
                    if all == 0 {
                        0.0
                    } else {
                        100.0 * bad as f64 / all as f64
                    }
                } else {
                    bad as f64
                })
            }
            Metric::Rate => Some(figures.rate()),
        };
        Verdict {
            slo: self.text.clone(),
            measured,
            passed: measured.is_some_and(|m| self.op.holds(m, self.limit)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Figures for Fixed {
        fn response_ms(&self, s: Stat) -> f64 {
            match s {
                Stat::P99 => 19.0,
                Stat::Max => 40.0,
                _ => 1.0,
            }
        }
        fn handshake_ms(&self, s: Stat) -> Option<f64> {
            (s == Stat::P99).then_some(160.0)
        }
        fn errors(&self) -> (u64, u64) {
            (1, 2000)
        }
        fn rate(&self) -> f64 {
            5000.0
        }
    }

    fn judge(s: &str) -> Verdict {
        s.parse::<Slo>().unwrap().judge(&Fixed)
    }

    #[test]
    fn the_issue_examples_parse_and_judge() {
        let v = judge("p99<20ms");
        assert!(v.passed, "{v}");
        assert_eq!(v.measured, Some(19.0));
        let v = judge("errors<0.1%");
        assert!(v.passed, "0.05 % {v}");
        assert_eq!(v.measured, Some(0.05));
        let v = judge("handshake.p99<150ms");
        assert!(!v.passed, "{v}");
        assert_eq!(
            v.to_string(),
            "FAIL  handshake.p99<150ms (measured 160.000)"
        );
        assert!(!judge("max < 0.04s").passed, "40 ms is not below 40 ms");
        assert!(judge("max<=0.04s").passed);
        assert!(judge("p99.9<1500us").passed);
        assert!(judge("rate>=5000").passed);
        assert!(!judge("errors<1").passed, "one error is not below 1");
        // A figure the run does not have fails.
        assert!(!judge("handshake.p50<1s").passed);
    }

    #[test]
    fn bad_objectives_say_what_is_wrong() {
        let e = "p99 20ms".parse::<Slo>().unwrap_err();
        assert!(e.contains("expected METRIC<LIMIT"), "{e}");
        let e = "p98<20ms".parse::<Slo>().unwrap_err();
        assert!(e.contains("unknown figure \"p98\""), "{e}");
        let e = "p99<20".parse::<Slo>().unwrap_err();
        assert!(e.contains("a time needs a unit"), "{e}");
        let e = "p99<fast".parse::<Slo>().unwrap_err();
        assert!(e.contains("\"\" is not a number"), "{e}");
        let e = "errors<1ms".parse::<Slo>().unwrap_err();
        assert!(e.contains("unexpected unit \"ms\""), "{e}");
    }
}
