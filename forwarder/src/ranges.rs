//! How a pool over a port range is served. A worker is handed one [`PoolSpec`] per pool; a
//! range pool becomes one spec per port here ([`port_specs`]), each with its backends' ports
//! moved to the same offset, all counting into the range's one pool slot and backend slots (one
//! series per rule on the page and in `/metrics`, one round-robin turn for the whole range).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use ipnet::IpNet;

use crate::balance::ServedPool;
use crate::control::PoolSpec;
use crate::rules::{Pool, Proto, RuleError, RuleSet, RulesError};
use crate::stats::{MAX_BACKENDS, MAX_POOLS};
use crate::steer::wants_steering;

/// The specs a worker listens with for `spec`: `spec` itself for a single port, else one per
/// port of the range, the k-th listening on the first port + k and sending to each backend's
/// port + k (or to its one port).
/// A steered range stays one spec (one listener; [`SteeredPorts`] finds the port's pool).
pub fn port_specs(spec: PoolSpec) -> Vec<PoolSpec> {
    if spec.ports <= 1 || spec.steered {
        return vec![spec];
    }
    (0..spec.ports).map(|k| port_spec(&spec, k)).collect()
}

/// The spec of the `k`-th port of range `spec`.
fn port_spec(spec: &PoolSpec, k: u16) -> PoolSpec {
    let mut one = spec.clone();
    one.listen = at_offset(spec.listen, k);
    one.ports = 1;
    one.steered = false;
    for b in &mut one.backends {
        if b.port_range {
            b.addr = at_offset(b.addr, k);
            b.port_range = false;
        }
    }
    one
}

/// Marks the specs of ranges that nftables steers (when `steering` is available).
pub fn mark_steered(specs: &mut [PoolSpec], set: &RuleSet, steering: bool) {
    for (spec, pool) in specs.iter_mut().zip(&set.pools) {
        spec.steered = steering && wants_steering(pool);
    }
}

/// A steered range as one worker serves it: the pool of each port the clients reach, made the
/// first time a client reaches it (a 20,000-port range mostly sees a few of them).
#[derive(Debug)]
pub struct SteeredPorts {
    spec: PoolSpec,
    default_allow: Vec<IpNet>,
    default_deny: Vec<IpNet>,
    by_port: RefCell<HashMap<u16, Rc<ServedPool>>>,
}

impl SteeredPorts {
    pub fn new(spec: PoolSpec, default_allow: &[IpNet], default_deny: &[IpNet]) -> SteeredPorts {
        SteeredPorts {
            spec,
            default_allow: default_allow.to_vec(),
            default_deny: default_deny.to_vec(),
            by_port: RefCell::default(),
        }
    }

    /// The pool serving `port` of the range; `None` for a port outside it.
    pub fn pool_for(&self, port: u16) -> Option<Rc<ServedPool>> {
        let k = port.checked_sub(self.spec.listen.port())?;
        if k >= self.spec.ports {
            return None;
        }
        let mut by_port = self.by_port.borrow_mut();
        let pool = by_port.entry(port).or_insert_with(|| {
            Rc::new(ServedPool::new(
                port_spec(&self.spec, k),
                &self.default_allow,
                &self.default_deny,
            ))
        });
        Some(Rc::clone(pool))
    }
}

/// Every address `pool` listens on, first port first (only the first when it is steered).
pub fn listen_addrs(pool: &Pool, steering: bool) -> impl Iterator<Item = SocketAddr> + '_ {
    let last = if steering && wants_steering(pool) {
        pool.ports.first
    } else {
        pool.ports.last
    };
    (pool.ports.first..=last).map(|port| SocketAddr::new(pool.listen.ip(), port))
}

/// Listening sockets each worker holds for `set`: one per port of every pool (TCP and UDP),
/// one for a steered range.
pub fn listeners_per_worker(set: &RuleSet, steering: bool) -> usize {
    set.pools.iter().map(|p| listeners(p, steering)).sum()
}

fn listeners(pool: &Pool, steering: bool) -> usize {
    if steering && wants_steering(pool) {
        1
    } else {
        pool.ports.len() as usize
    }
}

/// The limits a rules file must fit, checked the same way by `--check`, at start and on every
/// live edit (page, file, SIGHUP), so that none of them accepts what another refuses:
/// - every port listened on costs each worker one descriptor; together they must leave room
///   for connections: at most `listen_budget` (see `capacity::listen_budget`);
/// - the shared counters hold [`MAX_POOLS`] pools (a range is one pool, however many ports)
///   and [`MAX_BACKENDS`] rows.
///
/// The error names the line of the pool that goes over.
/// `steering` says whether large TCP ranges are steered (then they count one socket), or why
/// not (named in the error).
pub fn check_limits(
    set: &RuleSet,
    file: &str,
    listen_budget: usize,
    steering: Result<(), &str>,
) -> Result<(), RulesError> {
    let mut errors = Vec::new();
    let mut total = 0usize;
    let mut backends = 0usize;
    for (i, pool) in set.pools.iter().enumerate() {
        let line = pool.rules.first().map_or(0, |r| r.line);
        let before = total;
        total += listeners(pool, steering.is_ok());
        if total > listen_budget && before <= listen_budget {
            let why = match steering {
                Err(why) if wants_steering(pool) => {
                    format!("; it cannot be steered to one socket: {why}")
                }
                _ if pool.proto == Proto::Udp && !pool.ports.is_single() => {
                    "; UDP ranges are always served port by port".to_string()
                }
                _ => String::new(),
            };
            errors.push(RuleError {
                file: file.to_string(),
                line,
                field: "listen_port".into(),
                message: format!(
                    "{} needs {} listening sockets per worker, {total} with the rows before it; \
                     each worker has room for {listen_budget} (its open-file \
                     limit less what connections need); use fewer or smaller ranges{why}",
                    pool.label(),
                    pool.ports.len(),
                ),
            });
        }
        let before = backends;
        backends += pool.rules.len();
        if backends > MAX_BACKENDS && before <= MAX_BACKENDS {
            errors.push(RuleError {
                file: file.to_string(),
                line: pool
                    .rules
                    .get(MAX_BACKENDS - before)
                    .map_or(line, |r| r.line),
                field: "row".into(),
                message: format!("too many rows: at most {MAX_BACKENDS} destinations"),
            });
        }
        if i == MAX_POOLS {
            errors.push(RuleError {
                file: file.to_string(),
                line,
                field: "listen_port".into(),
                message: format!("too many pools: at most {MAX_POOLS} listen ports or ranges"),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RulesError(errors))
    }
}

/// The pool of the port a steered connection reached; `None` (and the connection dropped) when
/// conntrack does not know it or it is outside the range.
pub fn reached_pool(ports: &SteeredPorts, client: &mio::net::TcpStream) -> Option<Rc<ServedPool>> {
    use std::os::fd::AsRawFd;
    let v6 = client.local_addr().is_ok_and(|a| a.is_ipv6());
    match crate::steer::original_dst(client.as_raw_fd(), v6) {
        Ok(reached) => ports.pool_for(reached.port()),
        Err(e) => {
            tracing::debug!("steered connection without an original destination: {e}");
            None
        }
    }
}

/// `addr` with its port moved up by `k` (validation made sure the range fits below 65,536).
fn at_offset(addr: SocketAddr, k: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port().saturating_add(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::parse;
    use crate::stats::Shared;
    use crate::supervisor::slots::Slots;

    #[test]
    fn a_range_pool_is_one_spec_per_port_sharing_its_slots() {
        let set = parse(
            "game,27000-27099,127.0.0.9,28000-28099\nweb,8000-8999,127.0.0.5,443\nweb2,8000-8999,127.0.0.6,8000-8999\nssh,22,127.0.0.1,2222\n",
            "f",
        )
        .unwrap();
        let shared = Shared::create().unwrap();
        let specs = Slots::default()
            .assign(&set, &Default::default(), &shared)
            .unwrap();
        let game = port_specs(specs[0].clone());
        assert_eq!(game.len(), 100);
        assert_eq!(game[0].listen, "0.0.0.0:27000".parse().unwrap());
        assert_eq!(game[99].listen, "0.0.0.0:27099".parse().unwrap());
        assert_eq!(
            game[42].backends[0].addr,
            "127.0.0.9:28042".parse().unwrap()
        );
        assert!(game.iter().all(|s| s.slot == specs[0].slot && s.ports == 1));
        let web = port_specs(specs[1].clone());
        assert_eq!(web.len(), 1000);
        assert_eq!(web[7].listen, "0.0.0.0:8007".parse().unwrap());
        assert_eq!(web[7].backends[0].addr, "127.0.0.5:443".parse().unwrap());
        assert_eq!(web[7].backends[1].addr, "127.0.0.6:8007".parse().unwrap());
        assert_eq!(web[7].backends[1].slot, specs[1].backends[1].slot);
        assert_eq!(port_specs(specs[2].clone()), vec![specs[2].clone()]);
        assert_eq!(listeners_per_worker(&set, false), 1101);
        assert_eq!(
            listeners_per_worker(&set, true),
            102,
            "the 1000-port range is steered"
        );
    }

    #[test]
    fn limits_count_ports_against_the_budget_and_name_the_line() {
        let set = parse(
            "a,7000,127.0.0.1,1\nb,10000-10099,127.0.0.1,2\nc,20000-20999,127.0.0.1,3\n",
            "entries.csv",
        )
        .unwrap();
        assert!(check_limits(&set, "entries.csv", 1101, Err("no nft")).is_ok());
        assert!(check_limits(&set, "entries.csv", 102, Ok(())).is_ok());
        let e = check_limits(&set, "entries.csv", 1000, Err("no nft")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "entries.csv:3: listen_port: 0.0.0.0:20000-20999 needs 1000 listening sockets per \
             worker, 1101 with the rows before it; each worker has room for 1000 (its open-file \
             limit less what connections need); use fewer or smaller ranges; it cannot be \
             steered to one socket: no nft"
        );
    }
}
