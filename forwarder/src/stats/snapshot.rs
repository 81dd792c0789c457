//! The figures the web page, the metrics and SIGUSR1 show: one read of the shared counters for
//! the rules in force ([`read`]), as plain serialisable structs.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

use crate::control::PoolSpec;
use crate::dns::Answers;
use crate::rules::options::{Admin, Balance};
use crate::rules::{self, Pool, Proto, RuleSet};
use crate::stats::health::Health;
use crate::stats::{describe_error, now_ms, Shared};
use crate::tcp::data_path::Choice;

/// Where a pool's and a backend's counters are in the shared mapping (the supervisor's slot
/// table answers).
pub trait SlotLookup {
    fn pool_slot(&self, pool: &Pool) -> Option<usize>;
    fn backend_slot(&self, pool: &Pool, dest: SocketAddr) -> Option<usize>;
}

/// The planned sizes, which the counters do not hold.
#[derive(Debug, Clone, Copy)]
pub struct Sizes<'a> {
    pub workers: usize,
    pub capacity: usize,
    pub udp_capacity: usize,
    /// The data path chosen at start.
    pub data_path: &'a Choice,
}

/// Everything the web page shows about the forwarder, read from the shared counters.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub workers: usize,
    pub capacity: usize,
    /// TCP connections open now.
    pub active: u64,
    #[serde(default)]
    pub udp_capacity: usize,
    /// UDP sessions live now.
    #[serde(default)]
    pub udp_sessions: u64,
    /// Connections that were open in a worker when it died.
    pub lost_worker_died: u64,
    pub uptime_ms: u64,
    pub accept_pauses: u64,
    /// Access log lines lost to a full queue or a failed write.
    pub access_log_dropped: u64,
    /// How established connections move their bytes, and why (`--data-path`).
    pub data_path: Choice,
    pub pools: Vec<PoolStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolStats {
    pub listen: SocketAddr,
    /// How the rows name the pool: `0.0.0.0:8080`, `0.0.0.0:53/udp`.
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub proto: Proto,
    /// Connections accepted; for UDP, sessions made.
    pub accepted: u64,
    /// Connections no backend took; for UDP, datagrams dropped for want of a session.
    pub unrouted: u64,
    /// Connections the pool's options refused, by reason.
    pub refused: Refusals,
    /// UDP sessions evicted to make room (always 0 for TCP).
    #[serde(default)]
    pub evicted: u64,
    /// Bandwidth limits in force and what they held back.
    #[serde(default)]
    pub limits: crate::rate::LimitStats,
    /// Which tier takes new connections now: `primary`, `backup` or `none`.
    #[serde(default)]
    pub serving: String,
    pub backends: Vec<BackendStats>,
}

/// Connections a pool refused before relaying a byte.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Refusals {
    /// By the access list (`allow`/`deny`, `--allow`/`--deny`).
    pub denied: u64,
    /// Every backend held its `max_conns`.
    pub max_conns: u64,
    /// The client's address held the pool's `max_conns_per_ip`.
    pub max_conns_per_ip: u64,
    /// `accept_proxy`: no valid PROXY header within the connect timeout.
    pub proxy_header: u64,
    /// `sni=`: the server name asked for has no row and the pool no default row.
    pub no_sni_route: u64,
    /// `sni=`: no readable ClientHello within the connect timeout.
    pub tls_hello: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendStats {
    pub name: String,
    pub dest_ip: String,
    pub dest_port: String,
    pub addr: SocketAddr,
    /// Health: `up`, `down` or `unknown` (nothing tried yet), as [`crate::stats::health`] says.
    pub state: String,
    /// For a row with a host name: what its last lookup said (`resolved to a, b` or why not).
    #[serde(default)]
    pub dns: Option<String>,
    /// `active`, `drain` or `disabled` (the operator's, from the rules file).
    #[serde(default)]
    pub admin: String,
    /// A `backup`: serves only while no primary of its pool can.
    #[serde(default)]
    pub backup: bool,
    /// What tells its health: `tcp connect`, `passive (connects)`, ...
    #[serde(default)]
    pub check: String,
    /// While down: good checks in a row so far (it is up at 2).
    #[serde(default)]
    pub rise: u64,
    /// In slow start: the percentage of its weight it takes now.
    #[serde(default)]
    pub slowstart_pct: Option<u32>,
    /// Connections (TCP) or sessions (UDP) open now.
    pub active: u64,
    /// Connections that were open when their worker died.
    pub lost_worker_died: u64,
    pub total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Of the bytes each way, those moved with splice(2).
    pub spliced_up: u64,
    pub spliced_down: u64,
    /// Connections handed to the kernel (sockmap data path).
    pub in_kernel: u64,
    pub connect_failures: u64,
    pub last_error: String,
    pub last_error_ms: u64,
    pub down_since_ms: u64,
    /// While down: when the backend will next be tried (unix ms).
    pub retry_at_ms: u64,
    pub last_check_ms: u64,
    /// UDP only: datagrams each way, and those dropped because a socket buffer was full toward
    /// the backend (up) or the client (down).
    #[serde(default)]
    pub datagrams_up: u64,
    #[serde(default)]
    pub datagrams_down: u64,
    #[serde(default)]
    pub drops_up: u64,
    #[serde(default)]
    pub drops_down: u64,
}

/// What the rules become in the workers: the members (a host name's addresses), the answers
/// behind them, and whether active checks run.
pub struct Members<'a> {
    pub specs: &'a [PoolSpec],
    pub answers: &'a Answers,
    pub active_checks: bool,
}

/// Reads the counters of every pool and backend of `rules`.
pub fn read(
    shared: &Shared,
    rules: &RuleSet,
    slots: &impl SlotLookup,
    sizes: Sizes<'_>,
    members: Members<'_>,
) -> StatsSnapshot {
    let inner = &members;
    let now = now_ms();
    let header = shared.header();
    let mut active = 0;
    let mut udp_sessions = 0;
    let pools = rules
        .pools
        .iter()
        .filter_map(|pool| {
            let pool_slot = slots.pool_slot(pool)?;
            let p = shared.pool(pool_slot);
            let serving = inner
                .specs
                .iter()
                .find(|s| s.slot == pool_slot)
                .map_or("none", |s| {
                    crate::balance::tier::serving_tier(&s.backends, shared, now)
                });
            Some(PoolStats {
                listen: pool.listen,
                label: pool.label(),
                proto: pool.proto,
                accepted: p.accepted.load(Relaxed),
                unrouted: p.unrouted.load(Relaxed),
                refused: Refusals {
                    denied: p.denied.load(Relaxed),
                    max_conns: p.full.load(Relaxed),
                    max_conns_per_ip: p.per_ip_full.load(Relaxed),
                    proxy_header: p.bad_header.load(Relaxed),
                    no_sni_route: p.no_sni_route.load(Relaxed),
                    tls_hello: p.bad_hello.load(Relaxed),
                },
                evicted: p.evicted.load(Relaxed),
                limits: crate::rate::LimitStats::of(p),
                serving: serving.to_string(),
                backends: pool
                    .rules
                    .iter()
                    .flat_map(|rule| {
                        // A row with a host name has one member per address it resolved to.
                        let members: Vec<(SocketAddr, usize)> = match &rule.host {
                            None => slots
                                .backend_slot(pool, rule.dest)
                                .map(|slot| (rule.dest, slot))
                                .into_iter()
                                .collect(),
                            Some(_) => inner
                                .specs
                                .iter()
                                .filter(|s| s.slot == pool_slot)
                                .flat_map(|s| s.backends.iter())
                                .filter(|b| b.line == rule.line && b.name == rule.entry.name)
                                .map(|b| (b.addr, b.slot))
                                .collect(),
                        };
                        let dns = rule
                            .host
                            .as_ref()
                            .map(|h| crate::dns::describe(h, inner.answers.get(h)));
                        let unresolved = (members.is_empty() && rule.host.is_some())
                            .then(|| unresolved_stats(rule, dns.clone().unwrap_or_default()));
                        members
                            .into_iter()
                            .map(|(addr, slot)| {
                                let s = shared.backend(slot);
                                let open = shared.active(slot);
                                match pool.proto {
                                    Proto::Tcp => active += open,
                                    Proto::Udp => udp_sessions += open,
                                }
                                let down = s.is_down(now);
                                let health = crate::stats::health::health(s);
                                let o = &rule.options;
                                let spec = crate::control::BackendSpec {
                                    name: String::new(),
                                    addr,
                                    slot,
                                    options: o.clone(),
                                    line: rule.line,
                                    port_range: false,
                                };
                                let ramp = crate::balance::tier::ramp_share(&spec, s, now)
                                    .filter(|_| pool.options.balance != Balance::Source);
                                BackendStats {
                                    name: rule.entry.name.clone(),
                                    dest_ip: rule.entry.dest_ip.clone(),
                                    dest_port: rule.entry.dest_port.clone(),
                                    addr,
                                    dns: dns.clone(),
                                    state: health.as_str().into(),
                                    admin: o.admin.as_str().into(),
                                    backup: o.backup,
                                    check: crate::stats::health::check_kind(
                                        pool.proto == Proto::Udp,
                                        inner.active_checks,
                                        o.admin == Admin::Disabled,
                                    )
                                    .into(),
                                    rise: if health == Health::Down {
                                        s.rise.load(Relaxed)
                                    } else {
                                        0
                                    },
                                    slowstart_pct: ramp.map(|f| (f * 100.0) as u32),
                                    active: open,
                                    lost_worker_died: s.lost.load(Relaxed),
                                    total: s.total.load(Relaxed),
                                    bytes_up: s.bytes_up.load(Relaxed),
                                    bytes_down: s.bytes_down.load(Relaxed),
                                    spliced_up: s.spliced_up.load(Relaxed),
                                    spliced_down: s.spliced_down.load(Relaxed),
                                    in_kernel: s.in_kernel.load(Relaxed),
                                    connect_failures: s.connect_failures.load(Relaxed),
                                    last_error: describe_error(s.last_error.load(Relaxed)),
                                    last_error_ms: s.last_error_ms.load(Relaxed),
                                    down_since_ms: if down {
                                        s.down_since_ms.load(Relaxed)
                                    } else {
                                        0
                                    },
                                    retry_at_ms: if down {
                                        s.down_until_ms.load(Relaxed)
                                    } else {
                                        0
                                    },
                                    last_check_ms: s.last_check_ms.load(Relaxed),
                                    datagrams_up: s.datagrams_up.load(Relaxed),
                                    datagrams_down: s.datagrams_down.load(Relaxed),
                                    drops_up: s.drops_up.load(Relaxed),
                                    drops_down: s.drops_down.load(Relaxed),
                                }
                            })
                            .chain(unresolved)
                            .collect::<Vec<_>>()
                    })
                    .collect(),
            })
        })
        .collect();
    StatsSnapshot {
        workers: sizes.workers,
        capacity: sizes.capacity,
        active,
        udp_capacity: sizes.udp_capacity,
        udp_sessions,
        lost_worker_died: header.lost_worker_died.load(Relaxed),
        uptime_ms: now.saturating_sub(header.started_ms.load(Relaxed)),
        accept_pauses: header.accept_pauses.load(Relaxed),
        access_log_dropped: header.access_log_dropped.load(Relaxed),
        data_path: sizes.data_path.clone(),
        pools,
    }
}

/// The figures of a row whose host name has not resolved yet: down, saying why.
fn unresolved_stats(rule: &rules::Rule, why: String) -> BackendStats {
    BackendStats {
        name: rule.entry.name.clone(),
        dest_ip: rule.entry.dest_ip.clone(),
        dest_port: rule.entry.dest_port.clone(),
        addr: rule.dest,
        dns: Some(why.clone()),
        state: Health::Down.as_str().into(),
        admin: rule.options.admin.as_str().into(),
        backup: rule.options.backup,
        check: "dns".into(),
        rise: 0,
        slowstart_pct: None,
        active: 0,
        lost_worker_died: 0,
        total: 0,
        bytes_up: 0,
        bytes_down: 0,
        spliced_up: 0,
        spliced_down: 0,
        in_kernel: 0,
        connect_failures: 0,
        last_error: why,
        last_error_ms: 0,
        down_since_ms: 0,
        retry_at_ms: 0,
        last_check_ms: 0,
        datagrams_up: 0,
        datagrams_down: 0,
        drops_up: 0,
        drops_down: 0,
    }
}
