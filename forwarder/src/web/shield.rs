//! Who gets one of the page's connection slots, and the figures of who was refused or cut. Every
//! address may hold at most [`Limits::per_address`] connections; strangers share all slots but a
//! reserve that only trusted clients (loopback, and addresses that proved the web token in the
//! last [`TRUST_FOR`]) may use, so a crowd of strangers cannot lock the operator out. Sans-IO:
//! the listener and the connections call in; tests drive it without sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use testbed::throttle::LogThrottle;

/// The page's connection limits, from the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// A request head (request line and headers) must arrive whole within this long, or the
    /// client gets 408 and is closed
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub web_head_timeout_ms: u64,

    /// A request body must arrive whole within this long after its head, or 408 and closed
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub web_body_timeout_ms: u64,

    /// A connection idle between requests is closed after this long
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub web_idle_timeout_ms: u64,

    /// Connections one client address may hold at once; more are refused at once
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub web_per_address: u64,

    /// Connections the page serves at once; the last eighth only for loopback and addresses
    /// that proved the web token
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(8..=8192))]
    pub web_max_connections: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            web_head_timeout_ms: 10_000,
            web_body_timeout_ms: 30_000,
            web_idle_timeout_ms: 5_000,
            web_per_address: 16,
            web_max_connections: 512,
        }
    }
}

impl Limits {
    pub fn head(&self) -> Duration {
        Duration::from_millis(self.web_head_timeout_ms)
    }
    pub fn body(&self) -> Duration {
        Duration::from_millis(self.web_body_timeout_ms)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.web_idle_timeout_ms)
    }
    /// Slots strangers may not take: an eighth, so at 512 a trusted client has 64 left.
    fn reserved(&self) -> usize {
        (self.web_max_connections as usize / 8).max(1)
    }
}

/// How long an address that sent the right web token counts as trusted.
pub const TRUST_FOR: Duration = Duration::from_secs(600);

/// Most addresses remembered as trusted; beyond it the oldest proof is forgotten first.
const TRUSTED_LIMIT: usize = 1024;

/// Why a connection was refused or cut: the label of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Refused: its address already held `--web-per-address` connections.
    PerAddress,
    /// Refused: every slot open to it was taken.
    Full,
    /// Cut with 408: the request head did not arrive within `--web-head-timeout-ms`.
    HeadTimeout,
    /// Cut with 408: the body did not arrive within `--web-body-timeout-ms`.
    BodyTimeout,
    /// Cut with 431: the request head grew past [`super::guard::HEAD_LIMIT_BYTES`].
    HeadTooLarge,
    /// Closed: idle between requests for `--web-idle-timeout-ms` (normal for browsers).
    Idle,
    /// Cut: the TLS handshake did not finish in time.
    Handshake,
    /// Cut: neither read nor wrote for the stall limit (a client that stops reading its answer).
    Stalled,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::PerAddress,
        Reason::Full,
        Reason::HeadTimeout,
        Reason::BodyTimeout,
        Reason::HeadTooLarge,
        Reason::Idle,
        Reason::Handshake,
        Reason::Stalled,
    ];

    /// The label in `/metrics` and the key in `/api/stats`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::PerAddress => "per_address",
            Reason::Full => "full",
            Reason::HeadTimeout => "head_timeout",
            Reason::BodyTimeout => "body_timeout",
            Reason::HeadTooLarge => "head_too_large",
            Reason::Idle => "idle",
            Reason::Handshake => "handshake_timeout",
            Reason::Stalled => "stalled",
        }
    }

    /// Refused before being served, as opposed to cut while open.
    pub fn is_refusal(self) -> bool {
        matches!(self, Reason::PerAddress | Reason::Full)
    }

    /// Worth a log line: idle closes are what browsers expect, not an event.
    fn is_logged(self) -> bool {
        self != Reason::Idle
    }

    fn describe(self, limits: &Limits) -> String {
        match self {
            Reason::PerAddress => format!(
                "refused: it already holds {} connections (--web-per-address)",
                limits.web_per_address
            ),
            Reason::Full => format!(
                "refused: all {} slots open to it are taken (--web-max-connections {})",
                limits.web_max_connections as usize - limits.reserved(),
                limits.web_max_connections
            ),
            Reason::HeadTimeout => format!(
                "cut with 408: the request head took over {} ms (--web-head-timeout-ms)",
                limits.web_head_timeout_ms
            ),
            Reason::BodyTimeout => format!(
                "cut with 408: the request body took over {} ms (--web-body-timeout-ms)",
                limits.web_body_timeout_ms
            ),
            Reason::HeadTooLarge => "cut with 431: request head too large".to_string(),
            Reason::Idle => "closed: idle between requests".to_string(),
            Reason::Handshake => "cut: the TLS handshake took too long".to_string(),
            Reason::Stalled => "cut: no progress reading or writing".to_string(),
        }
    }
}

/// The slot counts, by address. Pure bookkeeping: no clock, no sockets.
#[derive(Debug)]
pub struct Admission {
    per_address: usize,
    max: usize,
    reserved: usize,
    by_address: HashMap<IpAddr, usize>,
    total: usize,
    /// Slots held by connections admitted as strangers (they may not use the reserve).
    strangers: usize,
}

impl Admission {
    pub fn new(limits: &Limits) -> Admission {
        Admission {
            per_address: limits.web_per_address as usize,
            max: limits.web_max_connections as usize,
            reserved: limits.reserved(),
            by_address: HashMap::new(),
            total: 0,
            strangers: 0,
        }
    }

    /// Takes a slot for `ip`, or says why not. `trusted` clients may use the reserve.
    pub fn admit(&mut self, ip: IpAddr, trusted: bool) -> Result<(), Reason> {
        let held = self.by_address.get(&ip).copied().unwrap_or(0);
        if held >= self.per_address {
            return Err(Reason::PerAddress);
        }
        if self.total >= self.max || (!trusted && self.strangers >= self.max - self.reserved) {
            return Err(Reason::Full);
        }
        *self.by_address.entry(ip).or_insert(0) += 1;
        self.total += 1;
        if !trusted {
            self.strangers += 1;
        }
        Ok(())
    }

    /// Gives back a slot taken by [`Admission::admit`] with the same `trusted`.
    pub fn release(&mut self, ip: IpAddr, trusted: bool) {
        if let Some(held) = self.by_address.get_mut(&ip) {
            *held -= 1;
            if *held == 0 {
                self.by_address.remove(&ip);
            }
            self.total -= 1;
            if !trusted {
                self.strangers -= 1;
            }
        }
    }

    pub fn open(&self) -> usize {
        self.total
    }
}

/// Counts by reason, for `/metrics` and the page.
#[derive(Debug, Serialize, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShieldFigures {
    /// Connections the page holds now.
    pub open: u64,
    pub refused_per_address: u64,
    pub refused_full: u64,
    pub cut_head_timeout: u64,
    pub cut_body_timeout: u64,
    pub cut_head_too_large: u64,
    pub cut_handshake_timeout: u64,
    pub cut_stalled: u64,
    pub closed_idle: u64,
}

impl ShieldFigures {
    /// The count for one reason.
    pub fn count(&self, reason: Reason) -> u64 {
        match reason {
            Reason::PerAddress => self.refused_per_address,
            Reason::Full => self.refused_full,
            Reason::HeadTimeout => self.cut_head_timeout,
            Reason::BodyTimeout => self.cut_body_timeout,
            Reason::HeadTooLarge => self.cut_head_too_large,
            Reason::Idle => self.closed_idle,
            Reason::Handshake => self.cut_handshake_timeout,
            Reason::Stalled => self.cut_stalled,
        }
    }
}

/// The shared state of the page's defences: slots, trusted addresses, counters, log throttle.
#[derive(Debug)]
pub struct Shield {
    limits: Limits,
    admission: Mutex<Admission>,
    /// Addresses that sent the right web token, and when they last did.
    trusted: Mutex<HashMap<IpAddr, Instant>>,
    throttle: Mutex<LogThrottle>,
    counts: [AtomicU64; Reason::ALL.len()],
}

/// A slot held by one connection; gives it back when dropped.
#[derive(Debug)]
pub struct Ticket {
    shield: Arc<Shield>,
    ip: IpAddr,
    trusted: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.shield.admission).release(self.ip, self.trusted);
    }
}

impl Ticket {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
    pub fn shield(&self) -> &Arc<Shield> {
        &self.shield
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The address as the kernel reports it for an IPv4 client on a dual-stack socket, unmapped.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Shield {
    pub fn new(limits: Limits) -> Arc<Shield> {
        Arc::new(Shield {
            admission: Mutex::new(Admission::new(&limits)),
            limits,
            trusted: Mutex::new(HashMap::new()),
            throttle: Mutex::new(LogThrottle::default()),
            counts: Default::default(),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A slot for a new connection from `ip`, or the reason it is refused (counted and logged).
    pub fn admit(self: &Arc<Shield>, ip: IpAddr) -> Result<Ticket, Reason> {
        let ip = canonical(ip);
        let trusted = self.is_trusted(ip, Instant::now());
        let admitted = lock(&self.admission).admit(ip, trusted);
        match admitted {
            Ok(()) => Ok(Ticket {
                shield: Arc::clone(self),
                ip,
                trusted,
            }),
            Err(reason) => {
                self.record(ip, reason);
                Err(reason)
            }
        }
    }

    /// Loopback, or proved the web token within [`TRUST_FOR`].
    pub fn is_trusted(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = canonical(ip);
        ip.is_loopback()
            || lock(&self.trusted)
                .get(&ip)
                .is_some_and(|at| now.duration_since(*at) < TRUST_FOR)
    }

    /// Remembers that `ip` sent the right web token.
    pub fn trust(&self, ip: IpAddr) {
        let ip = canonical(ip);
        let now = Instant::now();
        let mut trusted = lock(&self.trusted);
        if trusted.len() >= TRUSTED_LIMIT && !trusted.contains_key(&ip) {
            trusted.retain(|_, at| now.duration_since(*at) < TRUST_FOR);
            if trusted.len() >= TRUSTED_LIMIT {
                if let Some(oldest) = trusted.iter().min_by_key(|(_, at)| **at).map(|(a, _)| *a) {
                    trusted.remove(&oldest);
                }
            }
        }
        trusted.insert(ip, now);
    }

    /// Counts a refused or cut connection from `ip`, and logs it when the throttle allows.
    pub fn record(&self, ip: IpAddr, reason: Reason) {
        let index = Reason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        if !reason.is_logged() {
            return;
        }
        let unlogged = lock(&self.throttle).note(canonical(ip), Instant::now());
        if let Some(unlogged) = unlogged {
            let since = if unlogged > 0 {
                format!(" ({unlogged} more from it since its last line)")
            } else {
                String::new()
            };
            tracing::warn!(
                "web page: connection from {ip} {}{since}; its next ones are logged at most once a minute",
                reason.describe(&self.limits)
            );
        }
    }

    pub fn figures(&self) -> ShieldFigures {
        let c = |r: Reason| {
            let i = Reason::ALL.iter().position(|x| *x == r).unwrap_or_default();
            self.counts[i].load(Ordering::Relaxed)
        };
        ShieldFigures {
            open: lock(&self.admission).open() as u64,
            refused_per_address: c(Reason::PerAddress),
            refused_full: c(Reason::Full),
            cut_head_timeout: c(Reason::HeadTimeout),
            cut_body_timeout: c(Reason::BodyTimeout),
            cut_head_too_large: c(Reason::HeadTooLarge),
            cut_handshake_timeout: c(Reason::Handshake),
            cut_stalled: c(Reason::Stalled),
            closed_idle: c(Reason::Idle),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_address: u64, max: u64) -> Limits {
        Limits {
            web_per_address: per_address,
            web_max_connections: max,
            ..Limits::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_gets_at_most_its_share_and_gets_it_back() {
        let mut a = Admission::new(&limits(3, 64));
        for _ in 0..3 {
            assert_eq!(a.admit(ip("10.0.0.1"), false), Ok(()));
        }
        assert_eq!(a.admit(ip("10.0.0.1"), false), Err(Reason::PerAddress));
        assert_eq!(a.admit(ip("10.0.0.2"), false), Ok(()));
        a.release(ip("10.0.0.1"), false);
        assert_eq!(a.admit(ip("10.0.0.1"), false), Ok(()));
        assert_eq!(a.open(), 4);
    }

    #[test]
    fn strangers_cannot_take_the_reserve_but_trusted_clients_can() {
        // 16 slots, 2 reserved: 14 strangers fill what is open to them.
        let mut a = Admission::new(&limits(1, 16));
        for i in 0..14 {
            assert_eq!(a.admit(ip(&format!("10.0.0.{i}")), false), Ok(()), "{i}");
        }
        assert_eq!(a.admit(ip("10.0.0.99"), false), Err(Reason::Full));
        assert_eq!(a.admit(ip("127.0.0.1"), true), Ok(()));
        assert_eq!(a.admit(ip("192.0.2.7"), true), Ok(()));
        assert_eq!(a.admit(ip("192.0.2.8"), true), Err(Reason::Full));
        // A stranger leaving frees a stranger's slot, not the reserve.
        a.release(ip("10.0.0.3"), false);
        assert_eq!(a.admit(ip("10.0.0.99"), false), Ok(()));
        assert_eq!(a.open(), 16);
    }

    #[test]
    fn the_shield_counts_by_reason_and_trusts_a_token_holder() {
        let shield = Shield::new(limits(1, 16));
        let stranger = ip("192.0.2.1");
        let first = shield.admit(stranger).unwrap();
        assert_eq!(shield.admit(stranger).unwrap_err(), Reason::PerAddress);
        shield.record(stranger, Reason::HeadTimeout);
        let f = shield.figures();
        assert_eq!(
            (f.open, f.refused_per_address, f.cut_head_timeout),
            (1, 1, 1)
        );
        drop(first);
        assert_eq!(shield.figures().open, 0);

        assert!(shield.is_trusted(ip("127.0.0.9"), Instant::now()));
        assert!(shield.is_trusted(ip("::ffff:127.0.0.1"), Instant::now()));
        assert!(!shield.is_trusted(stranger, Instant::now()));
        shield.trust(stranger);
        assert!(shield.is_trusted(stranger, Instant::now()));
        assert!(!shield.is_trusted(stranger, Instant::now() + TRUST_FOR));
    }
}
