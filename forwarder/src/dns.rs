//! Backend host names, resolved in the background and never on a connection's path: the
//! supervisor's `dns` thread asks hickory-resolver again when an answer's TTL (clamped by
//! `--dns-min-ttl-s` / `--dns-max-ttl-s`) runs out, and a changed set of addresses becomes a
//! changed set of pool members. [`fold`] decides what a lookup does to the last answer: a failure
//! keeps the last good addresses (and is said once per failure streak).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::TokioResolver;

/// Which addresses of a name become members: `--dns-family`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    /// A and AAAA: every address is a member.
    Any,
    Ipv4,
    Ipv6,
    /// A records; AAAA only when there is no A.
    #[default]
    PreferIpv4,
    /// AAAA records; A only when there is no AAAA.
    PreferIpv6,
}

/// How names are re-resolved.
#[derive(Debug, Clone, Copy)]
pub struct DnsConfig {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub family: Family,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            family: Family::PreferIpv4,
        }
    }
}

/// What is known of one name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// The last good addresses, sorted (empty until the name first resolves).
    pub addrs: Vec<IpAddr>,
    /// Why the last lookup failed, while failures go on.
    pub error: Option<String>,
    /// Failed lookups in a row.
    pub failures: u64,
    /// When to ask again.
    pub next_at: Option<Instant>,
}

/// The answer of every name the rules use, by name.
pub type Answers = HashMap<String, Answer>;

/// What a lookup changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Same addresses as before.
    Same,
    /// The member set changed (or the name resolved for the first time).
    Changed,
    /// The first failure of a streak: say it (once).
    FailedFirst,
    /// A later failure of the same streak: stay quiet.
    FailedAgain,
}

/// The answer after a lookup `result` (sorted addresses and TTL, or why it failed).
pub fn fold(
    previous: Option<&Answer>,
    result: Result<(Vec<IpAddr>, Duration), String>,
    config: &DnsConfig,
    now: Instant,
) -> (Answer, Outcome) {
    let mut answer = previous.cloned().unwrap_or_default();
    match result {
        Ok((mut addrs, ttl)) => {
            addrs.sort();
            addrs.dedup();
            let outcome = if addrs == answer.addrs {
                Outcome::Same
            } else {
                Outcome::Changed
            };
            answer.addrs = addrs;
            answer.error = None;
            answer.failures = 0;
            answer.next_at = Some(now + ttl.clamp(config.min_ttl, config.max_ttl));
            (answer, outcome)
        }
        Err(why) => {
            answer.failures += 1;
            answer.error = Some(why);
            answer.next_at = Some(now + config.min_ttl);
            let outcome = if answer.failures == 1 {
                Outcome::FailedFirst
            } else {
                Outcome::FailedAgain
            };
            (answer, outcome)
        }
    }
}

/// A stub resolver of the system's configuration (`/etc/resolv.conf`, `/etc/hosts`) on its own
/// small runtime, for the supervisor's `dns` thread and `--check`.
pub struct Resolver {
    runtime: tokio::runtime::Runtime,
    inner: TokioResolver,
}

impl Resolver {
    pub fn new(config: &DnsConfig) -> anyhow::Result<Resolver> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut builder = TokioResolver::builder_tokio()
            .map_err(|e| anyhow::anyhow!("reading the system's resolver configuration: {e}"))?;
        let opts = builder.options_mut();
        opts.ip_strategy = match config.family {
            Family::Any => LookupIpStrategy::Ipv4AndIpv6,
            Family::Ipv4 => LookupIpStrategy::Ipv4Only,
            Family::Ipv6 => LookupIpStrategy::Ipv6Only,
            Family::PreferIpv4 => LookupIpStrategy::Ipv4thenIpv6,
            Family::PreferIpv6 => LookupIpStrategy::Ipv6thenIpv4,
        };
        // Our own TTL handling decides when to ask again; a cache would only answer from memory.
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        // Names in the rules are meant as written (no search-domain guessing).
        opts.ndots = 0;
        let inner = builder.build();
        Ok(Resolver { runtime, inner })
    }

    /// The addresses of `host` and how long they are valid (the records' TTL).
    pub fn lookup(&self, host: &str) -> Result<(Vec<IpAddr>, Duration), String> {
        let name = if host.ends_with('.') {
            host.to_string()
        } else {
            format!("{host}.")
        };
        match self.runtime.block_on(self.inner.lookup_ip(name.as_str())) {
            Ok(found) => {
                let addrs: Vec<IpAddr> = found.iter().collect();
                if addrs.is_empty() {
                    return Err("no address records".into());
                }
                let ttl = found
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                Ok((addrs, ttl))
            }
            Err(e) if e.is_nx_domain() => Err("no such name (NXDOMAIN)".into()),
            Err(e) if e.is_no_records_found() => Err("no address records".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What the page says about a name: `resolved to a, b`, or why it does not resolve.
pub fn describe(host: &str, answer: Option<&Answer>) -> String {
    match answer {
        None => format!("{host}: not looked up yet"),
        Some(a) if a.addrs.is_empty() => format!(
            "{host} does not resolve ({}): down until it does",
            a.error.as_deref().unwrap_or("no answer yet")
        ),
        Some(a) => match &a.error {
            None => format!("{host} resolved to {}", list(&a.addrs)),
            Some(e) => format!(
                "{host}: lookup failed ({e}); keeping the last answer {}",
                list(&a.addrs)
            ),
        },
    }
}

/// `a, b` for the logs.
pub fn list(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        return "no address".into();
    }
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ttl_is_clamped_and_a_new_set_is_a_change() {
        let config = DnsConfig {
            min_ttl: Duration::from_secs(2),
            max_ttl: Duration::from_secs(60),
            family: Family::Any,
        };
        let now = Instant::now();
        let (a, o) = fold(
            None,
            Ok((vec![ip("10.0.0.2"), ip("10.0.0.1")], Duration::ZERO)),
            &config,
            now,
        );
        assert_eq!(o, Outcome::Changed);
        assert_eq!(a.addrs, [ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(a.next_at, Some(now + Duration::from_secs(2)), "min TTL");
        let (b, o) = fold(
            Some(&a),
            Ok((
                vec![ip("10.0.0.1"), ip("10.0.0.2")],
                Duration::from_secs(3600),
            )),
            &config,
            now,
        );
        assert_eq!(o, Outcome::Same, "order does not matter");
        assert_eq!(b.next_at, Some(now + Duration::from_secs(60)), "max TTL");
        let (c, o) = fold(
            Some(&b),
            Ok((vec![ip("10.0.0.3")], Duration::from_secs(5))),
            &config,
            now,
        );
        assert_eq!(o, Outcome::Changed);
        assert_eq!(c.addrs, [ip("10.0.0.3")]);
    }

    #[test]
    fn a_failure_keeps_the_last_answer_and_is_said_once_per_streak() {
        let config = DnsConfig::default();
        let now = Instant::now();
        let (a, _) = fold(
            None,
            Ok((vec![ip("10.0.0.1")], Duration::ZERO)),
            &config,
            now,
        );
        let (b, o) = fold(Some(&a), Err("NXDOMAIN".into()), &config, now);
        assert_eq!(o, Outcome::FailedFirst);
        assert_eq!(b.addrs, a.addrs, "last good answer kept");
        let (c, o) = fold(Some(&b), Err("NXDOMAIN".into()), &config, now);
        assert_eq!((o, c.failures), (Outcome::FailedAgain, 2));
        let (d, o) = fold(
            Some(&c),
            Ok((vec![ip("10.0.0.1")], Duration::ZERO)),
            &config,
            now,
        );
        assert_eq!((o, d.failures, d.error.clone()), (Outcome::Same, 0, None));
        let (_, o) = fold(Some(&d), Err("timeout".into()), &config, now);
        assert_eq!(o, Outcome::FailedFirst, "a new streak is said again");
        let (never, o) = fold(None, Err("NXDOMAIN".into()), &config, now);
        assert!(never.addrs.is_empty());
        assert_eq!(o, Outcome::FailedFirst);
    }
}
