//! The agent's control port against strangers (issue 24): what a connection that has not said a
//! valid hello may cost, decided without sockets so tests drive it with their own clock. A
//! connection is admitted only while its address holds fewer than [`Limits::per_address`]
//! unfinished greetings and the port fewer than [`Limits::pending_total`]; everything refused or
//! cut is counted by [`Reason`], and the log says so at most once per address per minute.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The documented limits of the control port (docs/tls-load.md, "Agents' control port").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The hello line must arrive whole within this (nginx's `client_header_timeout`).
    pub hello_timeout: Duration,
    /// After the welcome, the plans must arrive within this (the coordinator greets every agent
    /// first, each within its own 10 s, so this is longer).
    pub plans_timeout: Duration,
    /// Longest hello line; a coordinator's is about 100 bytes.
    pub hello_bytes: usize,
    /// Longest plans line (the message text travels in it).
    pub plans_bytes: usize,
    /// Connections from one address that may be greeting at once.
    pub per_address: usize,
    /// Connections that may be greeting at once in all.
    pub pending_total: usize,
    /// Shortest gap between two log lines about one address.
    pub log_every: Duration,
}

pub const LIMITS: Limits = Limits {
    hello_timeout: Duration::from_secs(5),
    plans_timeout: Duration::from_secs(30),
    hello_bytes: 64 * 1024,
    plans_bytes: 16 * 1024 * 1024,
    per_address: 8,
    pending_total: 256,
    log_every: Duration::from_secs(60),
};

/// Why a connection was refused or cut before (or instead of) a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Its address already had [`Limits::per_address`] greetings open.
    PerAddress,
    /// The port already had [`Limits::pending_total`] greetings open.
    Full,
    /// No whole hello (or plans) line within its limit.
    Slow,
    /// A line longer than its limit.
    TooLong,
    /// Not a hello, wrong token, other protocol version.
    Refused,
    /// A valid coordinator while another one's run is on.
    Busy,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::PerAddress => "too many from this address",
            Reason::Full => "too many greeting at once",
            Reason::Slow => "too slow",
            Reason::TooLong => "line too long",
            Reason::Refused => "refused",
            Reason::Busy => "busy with another coordinator",
        }
    }
}

/// What one address did since its last log line.
#[derive(Debug, Default)]
struct Unlogged {
    last_line: Option<Instant>,
    counts: BTreeMap<Reason, u64>,
}

/// The control port's bookkeeping.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    /// Unfinished greetings per address (an address with none is removed).
    pending: HashMap<IpAddr, usize>,
    pending_total: usize,
    /// Everything refused or cut since the agent started, by reason.
    totals: BTreeMap<Reason, u64>,
    unlogged: HashMap<IpAddr, Unlogged>,
}

impl Gate {
    pub fn new(limits: Limits) -> Gate {
        Gate {
            limits,
            pending: HashMap::new(),
            pending_total: 0,
            totals: BTreeMap::new(),
            unlogged: HashMap::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A new connection from `ip`: admitted (call [`Gate::release`] when its greeting ends) or
    /// refused at once.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Reason> {
        let mine = self.pending.get(&ip).copied().unwrap_or(0);
        if mine >= self.limits.per_address {
            return Err(Reason::PerAddress);
        }
        if self.pending_total >= self.limits.pending_total {
            return Err(Reason::Full);
        }
        *self.pending.entry(ip).or_insert(0) += 1;
        self.pending_total += 1;
        Ok(())
    }

    /// The greeting of a connection admitted from `ip` is over (it said hello, or it was cut).
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.pending.get_mut(&ip) {
            *n -= 1;
            self.pending_total -= 1;
            if *n == 0 {
                self.pending.remove(&ip);
            }
        }
    }

    /// Counts a refusal or cut of a connection from `ip` at `now`; returns the log line when one
    /// is due for this address (its first event, then at most one a minute, with what happened
    /// meanwhile).
    pub fn count(&mut self, ip: IpAddr, reason: Reason, now: Instant) -> Option<String> {
        *self.totals.entry(reason).or_insert(0) += 1;
        let entry = self.unlogged.entry(ip).or_default();
        *entry.counts.entry(reason).or_insert(0) += 1;
        if entry
            .last_line
            .is_some_and(|t| now.saturating_duration_since(t) < self.limits.log_every)
        {
            return None;
        }
        entry.last_line = Some(now);
        let what: Vec<String> = std::mem::take(&mut entry.counts)
            .into_iter()
            .map(|(r, n)| format!("{n} {}", r.name()))
            .collect();
        Some(format!(
            "control port: {ip}: connections refused or cut: {} (next line about {ip} in {} s at \
             the earliest; totals since start: {})",
            what.join(", "),
            self.limits.log_every.as_secs(),
            self.totals_line()
        ))
    }

    /// Everything refused or cut since start, by reason.
    pub fn totals(&self) -> &BTreeMap<Reason, u64> {
        &self.totals
    }

    fn totals_line(&self) -> String {
        self.totals
            .iter()
            .map(|(r, n)| format!("{n} {}", r.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Greetings open from `ip` now.
    pub fn pending_from(&self, ip: IpAddr) -> usize {
        self.pending.get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn small() -> Limits {
        Limits {
            per_address: 2,
            pending_total: 3,
            ..LIMITS
        }
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let mut g = Gate::new(small());
        assert_eq!(g.admit(ip(2)), Ok(()));
        assert_eq!(g.admit(ip(2)), Ok(()));
        assert_eq!(g.admit(ip(2)), Err(Reason::PerAddress));
        // Another address still gets in, until the port is full.
        assert_eq!(g.admit(ip(1)), Ok(()));
        assert_eq!(g.admit(ip(3)), Err(Reason::Full));
        g.release(ip(2));
        assert_eq!(g.pending_from(ip(2)), 1);
        assert_eq!(g.admit(ip(3)), Ok(()));
        for _ in 0..5 {
            g.release(ip(2)); // extra releases do not underflow
        }
        assert_eq!(g.pending_from(ip(2)), 0);
        assert_eq!(g.admit(ip(2)), Ok(()));
    }

    #[test]
    fn the_log_speaks_once_per_address_per_minute_and_keeps_counting() {
        let mut g = Gate::new(small());
        let t0 = Instant::now();
        let first = g
            .count(ip(9), Reason::Slow, t0)
            .expect("first event is logged");
        assert!(
            first.contains("127.0.0.9: connections refused or cut: 1 too slow"),
            "{first}"
        );
        for s in 1..60 {
            assert_eq!(
                g.count(ip(9), Reason::PerAddress, t0 + Duration::from_secs(s)),
                None
            );
        }
        // Another address has its own minute.
        assert!(g
            .count(ip(8), Reason::Refused, t0 + Duration::from_secs(5))
            .is_some());
        let next = g
            .count(ip(9), Reason::Slow, t0 + Duration::from_secs(60))
            .expect("a minute later");
        assert!(
            next.contains("59 too many from this address, 1 too slow"),
            "{next}"
        );
        assert_eq!(g.totals()[&Reason::PerAddress], 59);
        assert_eq!(g.totals()[&Reason::Slow], 2);
        assert_eq!(g.totals()[&Reason::Refused], 1);
    }
}
