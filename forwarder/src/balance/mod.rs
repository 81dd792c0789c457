//! Backend choice for one pool. [`ServedPool`] is a pool as a worker serves it: the spec from the
//! supervisor plus what is computed once per reload (the smooth weighted order, the compiled
//! access list). Every strategy draws on counters in the shared mapping, so it holds across
//! workers: round robin on one counter per pool (k connections to k backends land on each once,
//! whichever worker accepted them), leastconn on the open-connection count of each backend,
//! source on a rendezvous hash of the client address. A pick reserves a place in the backend's
//! open count, which is what makes `max_conns` exact across workers. Backends in back-off are
//! skipped; when every backend is down one is tried anyway (fail open). Pools with `backup`,
//! `drain`/`disabled` or `slowstart` backends pick through [`tier`].

pub mod acl;
pub mod sni;
pub mod tier;

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;

use ipnet::IpNet;

use crate::control::PoolSpec;
use crate::rules::options::Balance;
use crate::stats::Shared;
use acl::Acl;
use tier::{Ranking, Tiers};

/// A pool as a worker serves it.
#[derive(Debug)]
pub struct ServedPool {
    pub spec: PoolSpec,
    pub acl: Acl,
    /// Backend indices in smooth weighted round-robin order, one period long; empty when every
    /// weight is equal (plain modulo then, as before weights existed).
    schedule: Vec<u16>,
    /// Routes by TLS server name, when rows of the pool carry `sni=`: a connection is then
    /// served by the group its ClientHello names ([`sni::SniRoutes::route`]).
    pub sni: Option<sni::SniRoutes>,
    /// A range steered to this pool's one listener by nftables: the pools of its ports.
    pub steered: Option<crate::ranges::SteeredPorts>,
    /// Primaries and backups, when a backend has `backup`, `drain`, `disabled` or `slowstart`;
    /// `None` keeps the plain pick.
    pub tiers: Option<Tiers>,
}

impl ServedPool {
    /// Compiles `spec` with the forwarder's default access lists (`--allow`, `--deny`).
    pub fn new(spec: PoolSpec, default_allow: &[IpNet], default_deny: &[IpNet]) -> ServedPool {
        let routes = sni::SniRoutes::build(&spec, |group| {
            Self::without_routes(group, default_allow, default_deny)
        });
        let steered = spec
            .steered
            .then(|| crate::ranges::SteeredPorts::new(spec.clone(), default_allow, default_deny));
        ServedPool {
            sni: routes,
            steered,
            ..Self::without_routes(spec, default_allow, default_deny)
        }
    }

    fn without_routes(
        spec: PoolSpec,
        default_allow: &[IpNet],
        default_deny: &[IpNet],
    ) -> ServedPool {
        let acl = Acl::build(
            &spec.options.allow,
            &spec.options.deny,
            default_allow,
            default_deny,
        );
        let weights: Vec<u32> = spec.backends.iter().map(|b| b.options.weight).collect();
        let schedule = if weights.windows(2).all(|w| w[0] == w[1]) {
            Vec::new()
        } else {
            smooth_schedule(&weights)
        };
        let tiers = Tiers::build(&spec.backends);
        ServedPool {
            spec,
            acl,
            schedule,
            sni: None,
            steered: None,
            tiers,
        }
    }
}

/// nginx's smooth weighted round robin, one period: each turn every backend gains its weight,
/// the richest is picked and pays the total. 5:1:1 gives a a b a c a a, not a a a a a b c;
/// 3:1 gives a a b a.
pub fn smooth_schedule(weights: &[u32]) -> Vec<u16> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, &w) in current.iter_mut().zip(weights) {
                *c += w as i64;
            }
            // max_by_key returns the last maximum; the first one is wanted on ties.
            let best = (0..current.len())
                .rev()
                .max_by_key(|&i| current[i])
                .unwrap_or(0);
            current[best] -= total;
            best as u16
        })
        .collect()
}

/// Why no backend was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The pool has no backend, or every one was tried.
    NoBackend,
    /// Every backend not yet tried holds `max_conns` connections.
    Full,
}

/// Picks and reserves the first backend to try for a connection from `client`: the reservation
/// counts it in the backend's open connections until [`release`].
pub fn pick_backend(
    pool: &ServedPool,
    shared: &Shared,
    worker: usize,
    now_ms: u64,
    client: IpAddr,
) -> Result<usize, Refusal> {
    let n = pool.spec.backends.len();
    if n == 0 {
        return Err(Refusal::NoBackend);
    }
    if let Some(tiers) = &pool.tiers {
        return pick_tiered(pool, tiers, shared, worker, now_ms, client, &[]);
    }
    let order = match pool.spec.options.balance {
        Balance::RoundRobin => {
            let turn = shared.pool(pool.spec.slot).next.fetch_add(1, Relaxed);
            let start = if pool.schedule.is_empty() {
                (turn % n as u64) as usize
            } else {
                pool.schedule[(turn % pool.schedule.len() as u64) as usize] as usize
            };
            Order::From(start)
        }
        Balance::LeastConn => Order::List(least_loaded(pool, shared).0),
        Balance::Source => Order::List(by_hash(pool, client)),
    };
    choose(pool, shared, worker, now_ms, order, &[])
}

/// After `tried` failed, the next backend to try, reserved: round robin goes on from the last
/// one tried, the others follow their own order again.
pub fn next_backend(
    pool: &ServedPool,
    shared: &Shared,
    worker: usize,
    now_ms: u64,
    client: IpAddr,
    tried: &[usize],
) -> Result<usize, Refusal> {
    let n = pool.spec.backends.len();
    let Some(&last) = tried.last() else {
        return pick_backend(pool, shared, worker, now_ms, client);
    };
    if let Some(tiers) = &pool.tiers {
        return pick_tiered(pool, tiers, shared, worker, now_ms, client, tried);
    }
    let order = match pool.spec.options.balance {
        Balance::RoundRobin => Order::From((last + 1) % n.max(1)),
        Balance::LeastConn => Order::List(least_loaded(pool, shared).0),
        Balance::Source => Order::List(by_hash(pool, client)),
    };
    choose(pool, shared, worker, now_ms, order, tried)
}

/// The pick for a pool with tiers: the strategy ranks, [`tier::choose`] decides.
fn pick_tiered(
    pool: &ServedPool,
    tiers: &Tiers,
    shared: &Shared,
    worker: usize,
    now_ms: u64,
    client: IpAddr,
    tried: &[usize],
) -> Result<usize, Refusal> {
    let backends = &pool.spec.backends;
    match pool.spec.options.balance {
        Balance::RoundRobin => {
            let turn = shared.pool(pool.spec.slot).next.fetch_add(1, Relaxed);
            tier::choose(
                tiers,
                backends,
                shared,
                worker,
                now_ms,
                Ranking::Turn(turn),
                tried,
            )
        }
        Balance::LeastConn => {
            let (list, turn) = least_loaded(pool, shared);
            let ranking = Ranking::List(&list, Some(turn));
            tier::choose(tiers, backends, shared, worker, now_ms, ranking, tried)
        }
        Balance::Source => {
            let list = by_hash(pool, client);
            let ranking = Ranking::List(&list, None);
            tier::choose(tiers, backends, shared, worker, now_ms, ranking, tried)
        }
    }
}

/// Takes back a reservation from [`pick_backend`] or [`next_backend`].
pub fn release(pool: &ServedPool, shared: &Shared, worker: usize, index: usize) {
    shared.release(worker, pool.spec.backends[index].slot);
}

/// The order in which backends are considered.
enum Order {
    /// Index order from here, wrapping.
    From(usize),
    List(Vec<usize>),
}

fn choose(
    pool: &ServedPool,
    shared: &Shared,
    worker: usize,
    now_ms: u64,
    order: Order,
    tried: &[usize],
) -> Result<usize, Refusal> {
    let n = pool.spec.backends.len();
    // The k-th candidate, without building an iterator (this runs for every connection).
    let nth = |k: usize| match &order {
        Order::From(start) => (start + k) % n,
        Order::List(list) => list[k],
    };
    let mut full = false;
    // Up backends first, then (fail open) the down ones not tried yet.
    for want_down in [false, true] {
        for k in 0..n {
            let i = nth(k);
            let b = &pool.spec.backends[i];
            if tried.contains(&i) || shared.backend(b.slot).is_down(now_ms) != want_down {
                continue;
            }
            if shared.reserve(worker, b.slot, b.options.max_conns) {
                return Ok(i);
            }
            full = true;
        }
    }
    Err(if full {
        Refusal::Full
    } else {
        Refusal::NoBackend
    })
}

/// Backends by open connections per unit of weight, fewest first; ties keep index order rotated
/// by the pool's counter, so an idle pool is still served in turn. Also returns the counter's
/// turn.
fn least_loaded(pool: &ServedPool, shared: &Shared) -> (Vec<usize>, u64) {
    let n = pool.spec.backends.len();
    let drawn = shared.pool(pool.spec.slot).next.fetch_add(1, Relaxed);
    let turn = drawn as usize % n;
    let mut order: Vec<(u128, usize, usize)> = pool
        .spec
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let open = shared.backend(b.slot).open_now.load(Relaxed) as u128;
            // open / weight, compared without division: scale by the largest possible weight.
            let load = open * crate::rules::options::MAX_WEIGHT as u128 / b.options.weight as u128;
            (load, (i + n - turn) % n, i)
        })
        .collect();
    order.sort_unstable();
    (order.into_iter().map(|(_, _, i)| i).collect(), drawn)
}

/// Backends by rendezvous (highest random weight) score for `client`, best first. A backend's
/// score depends only on the client and that backend's address, so adding a backend moves only
/// the clients it now wins (about 1/n), and removing one moves only its own clients. Weights
/// scale the score (`w / -ln(u)`), which keeps both properties.
fn by_hash(pool: &ServedPool, client: IpAddr) -> Vec<usize> {
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
        v4 => v4,
    };
    let c = hash_ip(client);
    let mut scored: Vec<(f64, usize)> = pool
        .spec
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let h = mix(c ^ mix(hash_ip(b.addr.ip()) ^ b.addr.port() as u64));
            // A uniform number in (0, 1): 53 bits, never 0.
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (b.options.weight as f64 / -u.ln(), i)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => mix(u32::from(a) as u64 | 4 << 32),
        IpAddr::V6(a) => {
            let x = u128::from(a);
            mix(mix(x as u64) ^ (x >> 64) as u64 ^ 6)
        }
    }
}

/// splitmix64's finaliser: a fixed function, so every worker and every restart agrees.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::BackendSpec;
    use crate::rules::options::BackendOptions;

    fn pool(weights: &[u32], balance: Balance) -> ServedPool {
        let mut spec = PoolSpec {
            listen: "0.0.0.0:1".parse().unwrap(),
            ports: 1,
            steered: false,
            proto: Default::default(),
            slot: 0,
            options: Default::default(),
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| BackendSpec {
                    name: format!("b{i}"),
                    addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    slot: i,
                    options: BackendOptions {
                        weight,
                        ..Default::default()
                    },
                    port_range: false,
                    line: 0,
                })
                .collect(),
        };
        spec.options.balance = balance;
        ServedPool::new(spec, &[], &[])
    }

    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn picks(p: &ServedPool, shared: &Shared, k: usize) -> Vec<usize> {
        (0..k)
            .map(|_| {
                let i = pick_backend(p, shared, 0, 0, C).unwrap();
                release(p, shared, 0, i);
                i
            })
            .collect()
    }

    #[test]
    fn strict_round_robin_over_three() {
        let shared = Shared::create().unwrap();
        assert_eq!(
            picks(&pool(&[1, 1, 1], Balance::RoundRobin), &shared, 6),
            [0, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn weights_are_smooth_and_exact_per_period() {
        assert_eq!(smooth_schedule(&[3, 1]), [0, 0, 1, 0]);
        assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        let shared = Shared::create().unwrap();
        let got = picks(&pool(&[3, 1], Balance::RoundRobin), &shared, 400);
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 300);
        assert!(got.windows(4).all(|w| w.contains(&1)), "never a a a a");
    }

    #[test]
    fn down_backends_are_skipped_and_all_down_fails_open() {
        let shared = Shared::create().unwrap();
        let p = pool(&[1, 1, 1], Balance::RoundRobin);
        shared.backend(1).record_failure(111, 1000);
        let got: Vec<_> = (0..3)
            .map(|_| pick_backend(&p, &shared, 0, 1500, C).unwrap())
            .collect();
        assert_eq!(got, [0, 2, 2]);
        assert_eq!(next_backend(&p, &shared, 0, 1500, C, &[0]), Ok(2));
        assert_eq!(
            next_backend(&p, &shared, 0, 1500, C, &[0, 2]),
            Ok(1),
            "fail open"
        );
        assert_eq!(
            next_backend(&p, &shared, 0, 1500, C, &[0, 2, 1]),
            Err(Refusal::NoBackend)
        );
        shared.backend(0).record_failure(111, 1000);
        shared.backend(2).record_failure(111, 1000);
        assert!(
            pick_backend(&p, &shared, 0, 1500, C).is_ok(),
            "all down still tries one"
        );
    }

    #[test]
    fn max_conns_skips_a_full_backend_and_refuses_when_all_are_full() {
        let shared = Shared::create().unwrap();
        let mut p = pool(&[1, 1], Balance::RoundRobin);
        p.spec.backends[0].options.max_conns = 2;
        p.spec.backends[1].options.max_conns = 1;
        let got: Vec<_> = (0..3)
            .map(|_| pick_backend(&p, &shared, 0, 0, C).unwrap())
            .collect();
        assert_eq!(got, [0, 1, 0]);
        assert_eq!(pick_backend(&p, &shared, 0, 0, C), Err(Refusal::Full));
        assert_eq!(
            shared.backend(0).open_now.load(Relaxed),
            2,
            "refusal reserved nothing"
        );
        release(&p, &shared, 0, 1);
        assert_eq!(pick_backend(&p, &shared, 0, 0, C), Ok(1));
    }

    #[test]
    fn leastconn_picks_the_least_loaded_per_weight() {
        let shared = Shared::create().unwrap();
        let p = pool(&[1, 1, 1], Balance::LeastConn);
        // Ten held on 0, two on 1, none on 2: the next three go to 2, 2, then 1 or 2.
        for _ in 0..10 {
            shared.reserve(0, 0, 0);
        }
        for _ in 0..2 {
            shared.reserve(0, 1, 0);
        }
        let a = pick_backend(&p, &shared, 0, 0, C).unwrap();
        let b = pick_backend(&p, &shared, 0, 0, C).unwrap();
        assert_eq!((a, b), (2, 2));
        let c = pick_backend(&p, &shared, 0, 0, C).unwrap();
        assert_ne!(c, 0);
        // Weighted: 4 open on a weight-4 backend weigh as 1 on a weight-1 one.
        let shared = Shared::create().unwrap();
        let w = pool(&[4, 1], Balance::LeastConn);
        for _ in 0..3 {
            shared.reserve(0, 0, 0);
        }
        shared.reserve(0, 1, 0);
        assert_eq!(pick_backend(&w, &shared, 0, 0, C), Ok(0));
    }

    #[test]
    fn source_hash_is_stable_and_adding_a_backend_moves_about_one_in_n() {
        let shared = Shared::create().unwrap();
        let four = pool(&[1, 1, 1, 1], Balance::Source);
        let five = pool(&[1, 1, 1, 1, 1], Balance::Source);
        let clients: Vec<IpAddr> = (0..4000u32)
            .map(|i| IpAddr::V4((0x0a00_0000 + i * 7).into()))
            .collect();
        let mut moved = 0;
        let mut per = [0usize; 4];
        for &c in &clients {
            let a = pick_backend(&four, &shared, 0, 0, c).unwrap();
            assert_eq!(pick_backend(&four, &shared, 0, 0, c).unwrap(), a, "stable");
            per[a] += 1;
            let b = pick_backend(&five, &shared, 0, 0, c).unwrap();
            if a != b {
                assert_eq!(b, 4, "a client only moves to the new backend");
                moved += 1;
            }
        }
        // 1/5 of 4000 = 800 expected.
        assert!((650..=950).contains(&moved), "moved {moved}");
        assert!(per.iter().all(|&k| (800..=1200).contains(&k)), "{per:?}");
    }
}
