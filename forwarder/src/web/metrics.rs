//! `GET /metrics`: the same figures in Prometheus text format, per pool and per backend, so the
//! forwarder can be scraped next to HAProxy or nginx.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::api::ApiError;
use super::shield::{Reason, ShieldFigures};
use super::{call, AppState};
use crate::rules::Proto;
use crate::stats::snapshot::StatsSnapshot;

pub async fn get_metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let sup = state.sup.clone();
    let stats = call(move || sup.stats()).await?;
    let mut text = render(&stats);
    text.push_str(&render_web(&state.shield.figures()));
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The page's own connections: open now, and refused or cut by reason (`shield::Reason`).
pub fn render_web(figures: &ShieldFigures) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP forwarder_web_connections Connections the web page holds now.\n\
         # TYPE forwarder_web_connections gauge\nforwarder_web_connections {}",
        figures.open
    );
    let _ = writeln!(
        out,
        "# HELP forwarder_web_connections_refused_total Web page connections refused at once, by reason.\n\
         # TYPE forwarder_web_connections_refused_total counter"
    );
    for reason in Reason::ALL.iter().filter(|r| r.is_refusal()) {
        let _ = writeln!(
            out,
            "forwarder_web_connections_refused_total{{reason=\"{}\"}} {}",
            reason.label(),
            figures.count(*reason)
        );
    }
    let _ = writeln!(
        out,
        "# HELP forwarder_web_connections_cut_total Web page connections closed by a time or size limit, by reason.\n\
         # TYPE forwarder_web_connections_cut_total counter"
    );
    for reason in Reason::ALL.iter().filter(|r| !r.is_refusal()) {
        let _ = writeln!(
            out,
            "forwarder_web_connections_cut_total{{reason=\"{}\"}} {}",
            reason.label(),
            figures.count(*reason)
        );
    }
    out
}

struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
}

pub fn render(stats: &StatsSnapshot) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let head = |out: &mut String, f: &Family| {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
    };
    let process: [(Family, u64); 8] = [
        (
            Family {
                name: "forwarder_workers",
                kind: "gauge",
                help: "Worker processes.",
            },
            stats.workers as u64,
        ),
        (
            Family {
                name: "forwarder_capacity_connections",
                kind: "gauge",
                help: "Connections the workers can hold within the open-file limit.",
            },
            stats.capacity as u64,
        ),
        (
            Family {
                name: "forwarder_active_connections",
                kind: "gauge",
                help: "Connections open now, all rules.",
            },
            stats.active,
        ),
        (
            Family {
                name: "forwarder_capacity_udp_sessions",
                kind: "gauge",
                help: "UDP sessions the workers hold before evicting the least recently active.",
            },
            stats.udp_capacity as u64,
        ),
        (
            Family {
                name: "forwarder_active_udp_sessions",
                kind: "gauge",
                help: "UDP sessions live now, all rules.",
            },
            stats.udp_sessions,
        ),
        (
            Family {
                name: "forwarder_accept_pauses_total",
                kind: "counter",
                help: "Accepts refused for lack of file descriptors.",
            },
            stats.accept_pauses,
        ),
        (
            Family {
                name: "forwarder_access_log_dropped_total",
                kind: "counter",
                help:
                    "Access log lines lost to a full queue or a failed write (connections are not).",
            },
            stats.access_log_dropped,
        ),
        (
            Family {
                name: "forwarder_uptime_seconds",
                kind: "gauge",
                help: "Seconds since the forwarder started.",
            },
            stats.uptime_ms / 1000,
        ),
    ];
    for (family, value) in &process {
        head(&mut out, family);
        let _ = writeln!(out, "{} {value}", family.name);
    }
    let info = Family {
        name: "forwarder_data_path_info",
        kind: "gauge",
        help: "The data path established connections use (path) and what was asked for (asked: auto when a calibration at start chose).",
    };
    head(&mut out, &info);
    let _ = writeln!(
        out,
        "{}{{path=\"{}\",asked=\"{}\"}} 1",
        info.name,
        stats.data_path.path.name(),
        stats.data_path.asked.name()
    );
    let calibrated = [
        ("copy", stats.data_path.copy_ms_per_gb),
        ("splice", stats.data_path.splice_ms_per_gb),
    ];
    if calibrated.iter().any(|(_, v)| v.is_some()) {
        let cost = Family {
            name: "forwarder_data_path_calibration_cpu_ms_per_gb",
            kind: "gauge",
            help: "CPU per GB each user-space path took in the calibration at start (--data-path auto).",
        };
        head(&mut out, &cost);
        for (path, ms) in calibrated {
            if let Some(ms) = ms {
                let _ = writeln!(out, "{}{{path=\"{path}\"}} {ms:.1}", cost.name);
            }
        }
    }
    let lost = Family {
        name: "forwarder_connections_lost_total",
        kind: "counter",
        help: "Connections that ended without either side closing them, by reason.",
    };
    head(&mut out, &lost);
    let _ = writeln!(
        out,
        "{}{{reason=\"worker_died\"}} {}",
        lost.name, stats.lost_worker_died
    );

    type PoolGet = fn(&crate::stats::snapshot::PoolStats) -> u64;
    let pool_families: [(Family, PoolGet); 2] = [
        (
            Family {
                name: "forwarder_pool_accepted_total",
                kind: "counter",
                help: "Connections accepted on the listening address.",
            },
            |p| p.accepted,
        ),
        (
            Family {
                name: "forwarder_pool_unrouted_total",
                kind: "counter",
                help: "Connections closed because no backend of the pool could be reached.",
            },
            |p| p.unrouted,
        ),
    ];
    let refused = Family {
        name: "forwarder_pool_refused_total",
        kind: "counter",
        help: "Connections the pool's options refused before any byte was relayed, by reason.",
    };
    head(&mut out, &refused);
    for p in &stats.pools {
        for (reason, n) in [
            ("denied", p.refused.denied),
            ("max_conns", p.refused.max_conns),
            ("max_conns_per_ip", p.refused.max_conns_per_ip),
            ("proxy_header", p.refused.proxy_header),
            ("no_sni_route", p.refused.no_sni_route),
            ("tls_hello", p.refused.tls_hello),
        ] {
            let _ = writeln!(
                out,
                "{}{{listen=\"{}\",reason=\"{reason}\"}} {n}",
                refused.name, p.listen
            );
        }
    }
    for (family, get) in &pool_families {
        head(&mut out, family);
        for p in &stats.pools {
            let _ = writeln!(
                out,
                "{}{{listen=\"{}\"{}}} {}",
                family.name,
                escape(&p.listen.to_string()),
                proto_label(p.proto),
                get(p)
            );
        }
    }

    type BackendGet = fn(&crate::stats::snapshot::BackendStats) -> u64;
    let backend_families: [(Family, BackendGet); 10] = [
        (
            Family {
                name: "forwarder_backend_up",
                kind: "gauge",
                help: "1 when the backend's health is up; 0 when down or unknown (forwarder_backend_health).",
            },
            |b| u64::from(b.state == "up"),
        ),
        (
            Family {
                name: "forwarder_backend_active_connections",
                kind: "gauge",
                help: "Connections open now to the backend.",
            },
            |b| b.active,
        ),
        (
            Family {
                name: "forwarder_backend_connections_lost_total",
                kind: "counter",
                help: "Connections to the backend that were open when their worker died.",
            },
            |b| b.lost_worker_died,
        ),
        (
            Family {
                name: "forwarder_backend_connections_total",
                kind: "counter",
                help: "Connections sent to the backend.",
            },
            |b| b.total,
        ),
        (
            Family {
                name: "forwarder_backend_bytes_up_total",
                kind: "counter",
                help: "Bytes from clients to the backend.",
            },
            |b| b.bytes_up,
        ),
        (
            Family {
                name: "forwarder_backend_bytes_down_total",
                kind: "counter",
                help: "Bytes from the backend to clients.",
            },
            |b| b.bytes_down,
        ),
        (
            Family {
                name: "forwarder_backend_spliced_bytes_up_total",
                kind: "counter",
                help: "Of the bytes from clients to the backend, those moved with splice(2).",
            },
            |b| b.spliced_up,
        ),
        (
            Family {
                name: "forwarder_backend_spliced_bytes_down_total",
                kind: "counter",
                help: "Of the bytes from the backend to clients, those moved with splice(2).",
            },
            |b| b.spliced_down,
        ),
        (
            Family {
                name: "forwarder_backend_sockmap_connections_total",
                kind: "counter",
                help: "Connections whose bytes the kernel moved (--data-path sockmap).",
            },
            |b| b.in_kernel,
        ),
        (
            Family {
                name: "forwarder_backend_connect_failures_total",
                kind: "counter",
                help: "Connects to the backend that failed or timed out.",
            },
            |b| b.connect_failures,
        ),
    ];
    for (family, get) in &backend_families {
        head(&mut out, family);
        for p in &stats.pools {
            for b in &p.backends {
                let _ = writeln!(
                    out,
                    "{}{{listen=\"{}\",name=\"{}\",backend=\"{}\"{}}} {}",
                    family.name,
                    escape(&p.listen.to_string()),
                    escape(&b.name),
                    escape(&b.addr.to_string()),
                    proto_label(p.proto),
                    get(b)
                );
            }
        }
    }
    render_states(stats, &mut out, head);
    render_udp(stats, &mut out, head);
    crate::rate::render_metrics(stats, &mut out, |out, name, kind, help| {
        head(out, &Family { name, kind, help })
    });
    out
}

/// The backends' health and operator state, and the tier each pool serves from, as one series
/// per possible value (1 for the current one): the same words the page and the API use.
fn render_states(stats: &StatsSnapshot, out: &mut String, head: impl Fn(&mut String, &Family)) {
    use crate::stats::health::Health;
    type StateOf = fn(&crate::stats::snapshot::BackendStats) -> &str;
    let states: [(Family, &[&str], StateOf); 3] = [
        (
            Family {
                name: "forwarder_backend_health",
                kind: "gauge",
                help: "1 for the backend's health now: up, down, or unknown (nothing tried yet).",
            },
            &[
                Health::ALL[0].as_str(),
                Health::ALL[1].as_str(),
                Health::ALL[2].as_str(),
            ],
            |b| b.state.as_str(),
        ),
        (
            Family {
                name: "forwarder_backend_admin",
                kind: "gauge",
                help: "1 for the backend's operator state: active, drain or disabled.",
            },
            &["active", "drain", "disabled"],
            |b| b.admin.as_str(),
        ),
        (
            Family {
                name: "forwarder_backend_tier",
                kind: "gauge",
                help: "1 for the backend's tier: primary or backup.",
            },
            &["primary", "backup"],
            |b| if b.backup { "backup" } else { "primary" },
        ),
    ];
    for (family, values, get) in &states {
        head(out, family);
        for p in &stats.pools {
            for b in &p.backends {
                for value in values.iter() {
                    let _ = writeln!(
                        out,
                        "{}{{listen=\"{}\",name=\"{}\",backend=\"{}\"{},state=\"{value}\"}} {}",
                        family.name,
                        escape(&p.listen.to_string()),
                        escape(&b.name),
                        escape(&b.addr.to_string()),
                        proto_label(p.proto),
                        u64::from(get(b) == *value)
                    );
                }
            }
        }
    }
    let serving = Family {
        name: "forwarder_pool_serving_tier",
        kind: "gauge",
        help: "1 for the tier taking the pool's new connections: primary, backup or none.",
    };
    head(out, &serving);
    for p in &stats.pools {
        for tier in ["primary", "backup", "none"] {
            let _ = writeln!(
                out,
                "{}{{listen=\"{}\"{},tier=\"{tier}\"}} {}",
                serving.name,
                escape(&p.listen.to_string()),
                proto_label(p.proto),
                u64::from(p.serving == tier)
            );
        }
    }
}

/// The label that tells a UDP pool's series from a TCP pool's on the same port. TCP series carry
/// none, so they stay the series they were before UDP existed.
fn proto_label(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "",
        Proto::Udp => ",proto=\"udp\"",
    }
}

/// Families only UDP pools have: evictions, datagrams each way, drops by cause.
fn render_udp(stats: &StatsSnapshot, out: &mut String, head: impl Fn(&mut String, &Family)) {
    let udp = || stats.pools.iter().filter(|p| p.proto == Proto::Udp);
    let evicted = Family {
        name: "forwarder_pool_udp_sessions_evicted_total",
        kind: "counter",
        help: "UDP sessions ended early because the session table was full.",
    };
    head(out, &evicted);
    for p in udp() {
        let _ = writeln!(
            out,
            "{}{{listen=\"{}\",proto=\"udp\"}} {}",
            evicted.name,
            escape(&p.listen.to_string()),
            p.evicted
        );
    }
    type Get = fn(&crate::stats::snapshot::BackendStats) -> u64;
    let families: [(Family, &str, Get); 4] = [
        (
            Family {
                name: "forwarder_backend_datagrams_total",
                kind: "counter",
                help: "UDP datagrams passed, by direction (up: client to backend).",
            },
            "direction=\"up\"",
            |b| b.datagrams_up,
        ),
        (
            Family {
                name: "forwarder_backend_datagrams_total",
                kind: "",
                help: "",
            },
            "direction=\"down\"",
            |b| b.datagrams_down,
        ),
        (
            Family {
                name: "forwarder_backend_datagrams_dropped_total",
                kind: "counter",
                help: "UDP datagrams dropped, by cause (a full socket buffer toward the backend or the client).",
            },
            "cause=\"backend_buffer_full\"",
            |b| b.drops_up,
        ),
        (
            Family {
                name: "forwarder_backend_datagrams_dropped_total",
                kind: "",
                help: "",
            },
            "cause=\"client_buffer_full\"",
            |b| b.drops_down,
        ),
    ];
    for (family, label, get) in &families {
        if !family.kind.is_empty() {
            head(out, family);
        }
        for p in udp() {
            for b in &p.backends {
                let _ = writeln!(
                    out,
                    "{}{{listen=\"{}\",name=\"{}\",backend=\"{}\",proto=\"udp\",{label}}} {}",
                    family.name,
                    escape(&p.listen.to_string()),
                    escape(&b.name),
                    escape(&b.addr.to_string()),
                    get(b)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::snapshot::{BackendStats, PoolStats};

    #[test]
    fn names_are_escaped_and_every_family_is_typed() {
        let stats = StatsSnapshot {
            workers: 2,
            capacity: 9000,
            active: 1,
            lost_worker_died: 4,
            uptime_ms: 5500,
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
                accepted: 7,
                unrouted: 1,
                serving: "backup".into(),
                refused: crate::stats::snapshot::Refusals {
                    denied: 5,
                    max_conns: 2,
                    max_conns_per_ip: 0,
                    proxy_header: 0,
                    no_sni_route: 0,
                    tls_hello: 0,
                },
                backends: vec![BackendStats {
                    name: "a\"b\\c".into(),
                    dest_ip: "127.0.0.1".into(),
                    dest_port: "9001".into(),
                    addr: "127.0.0.1:9001".parse().unwrap(),
                    state: "up".into(),
                    dns: None,
                    admin: "drain".into(),
                    backup: true,
                    check: String::new(),
                    rise: 0,
                    slowstart_pct: None,
                    active: 1,
                    lost_worker_died: 3,
                    total: 6,
                    bytes_up: 10,
                    bytes_down: 20,
                    spliced_up: 0,
                    spliced_down: 16,
                    in_kernel: 0,
                    connect_failures: 1,
                    last_error: String::new(),
                    last_error_ms: 0,
                    down_since_ms: 0,
                    retry_at_ms: 0,
                    last_check_ms: 0,
                    datagrams_up: 0,
                    datagrams_down: 0,
                    drops_up: 0,
                    drops_down: 0,
                }],
            }],
        };
        let text = render(&stats);
        assert!(text.contains("forwarder_uptime_seconds 5\n"));
        assert!(text.contains("forwarder_connections_lost_total{reason=\"worker_died\"} 4\n"));
        assert!(text.contains(
            "forwarder_backend_connections_lost_total{listen=\"0.0.0.0:8080\",name=\"a\\\"b\\\\c\",backend=\"127.0.0.1:9001\"} 3\n"
        ));
        assert!(text.contains("forwarder_pool_accepted_total{listen=\"0.0.0.0:8080\"} 7\n"));
        assert!(text.contains(
            "forwarder_backend_bytes_down_total{listen=\"0.0.0.0:8080\",name=\"a\\\"b\\\\c\",backend=\"127.0.0.1:9001\"} 20\n"
        ));
        assert!(text.contains(
            "forwarder_pool_refused_total{listen=\"0.0.0.0:8080\",reason=\"denied\"} 5\n"
        ));
        assert!(text.contains(
            "forwarder_pool_refused_total{listen=\"0.0.0.0:8080\",reason=\"max_conns\"} 2\n"
        ));
        // A data path given by flag: its info line, no calibration figures.
        assert!(text.contains("forwarder_data_path_info{path=\"copy\",asked=\"copy\"} 1\n"));
        assert!(!text.contains("forwarder_data_path_calibration"));
        assert!(text.contains(
            "forwarder_backend_admin{listen=\"0.0.0.0:8080\",name=\"a\\\"b\\\\c\",backend=\"127.0.0.1:9001\",state=\"drain\"} 1\n"
        ));
        assert!(text.contains(
            "forwarder_backend_health{listen=\"0.0.0.0:8080\",name=\"a\\\"b\\\\c\",backend=\"127.0.0.1:9001\",state=\"unknown\"} 0\n"
        ));
        assert!(text
            .contains("forwarder_pool_serving_tier{listen=\"0.0.0.0:8080\",tier=\"backup\"} 1\n"));
        assert_eq!(text.matches("# TYPE ").count(), 34);
        assert_eq!(text.matches("# HELP ").count(), 34);
        let mut families: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        families.sort();
        families.dedup();
        assert_eq!(families.len(), 34, "every family once");
    }
}
