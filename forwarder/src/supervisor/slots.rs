//! Which shared stats slot counts which pool and backend. Slots stay with a pool or backend
//! across reloads (so its counters keep running) and are reused only once their rule is gone and
//! no connection still counts into them.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::control::{BackendSpec, PoolSpec};
use crate::dns::Answers;
use crate::rules::{Pool, Proto, RuleSet};
use crate::stats::{Shared, MAX_BACKENDS, MAX_POOLS};

#[derive(Debug, Clone, Default)]
pub struct Slots {
    pools: HashMap<(SocketAddr, Proto), usize>,
    backends: HashMap<(SocketAddr, Proto, SocketAddr), usize>,
    free_pools: Vec<usize>,
    free_backends: Vec<usize>,
    /// Backend slots whose rule is gone but which may still count live connections.
    retired: Vec<usize>,
    next_pool: usize,
    next_backend: usize,
}

/// More distinct pools or backends than the shared mapping holds.
#[derive(Debug, thiserror::Error)]
#[error("too many rules: at most {MAX_POOLS} listening ports and {MAX_BACKENDS} destinations")]
pub struct SlotsExhausted;

impl Slots {
    /// The worker view of `rules`, giving slots to new pools and backends and retiring the slots
    /// of those that are gone. A row with a host name becomes one member per address of its
    /// last good answer in `answers` (none until it resolves); an address two rows of a pool
    /// reach is one member, the first row's.
    pub fn assign(
        &mut self,
        rules: &RuleSet,
        answers: &Answers,
        shared: &Shared,
    ) -> Result<Vec<PoolSpec>, SlotsExhausted> {
        self.reclaim(shared);
        let mut specs = Vec::new();
        let mut pools_kept = HashMap::new();
        let mut backends_kept = HashMap::new();
        for pool in &rules.pools {
            let slot = match self.pools.get(&(pool.listen, pool.proto)) {
                Some(&s) => s,
                None => {
                    let s = take(&mut self.free_pools, &mut self.next_pool, MAX_POOLS)?;
                    shared.pool(s).reset();
                    s
                }
            };
            pools_kept.insert((pool.listen, pool.proto), slot);
            let mut backends: Vec<BackendSpec> = Vec::new();
            for (rule, addr) in pool.rules.iter().flat_map(|rule| {
                let addrs: Vec<SocketAddr> = match &rule.host {
                    None => vec![rule.dest],
                    Some(host) => answers.get(host).map_or(Vec::new(), |a| {
                        a.addrs
                            .iter()
                            .map(|&ip| SocketAddr::new(ip, rule.dest.port()))
                            .collect()
                    }),
                };
                addrs.into_iter().map(move |addr| (rule, addr))
            }) {
                if backends.iter().any(|b| b.addr == addr) {
                    continue;
                }
                let key = (pool.listen, pool.proto, addr);
                let bslot = match self.backends.get(&key) {
                    Some(&s) => s,
                    None => {
                        let s = take(
                            &mut self.free_backends,
                            &mut self.next_backend,
                            MAX_BACKENDS,
                        )?;
                        shared.backend(s).reset();
                        s
                    }
                };
                backends_kept.insert(key, bslot);
                backends.push(BackendSpec {
                    name: rule.entry.name.clone(),
                    addr,
                    slot: bslot,
                    options: rule.options.clone(),
                    port_range: !rule.dest_ports.is_single(),
                    line: rule.line,
                });
            }
            specs.push(PoolSpec {
                listen: pool.listen,
                ports: pool.ports.len(),
                steered: false,
                proto: pool.proto,
                slot,
                options: pool.options.clone(),
                backends,
            });
        }
        for (addr, slot) in self.pools.drain() {
            if !pools_kept.contains_key(&addr) {
                self.free_pools.push(slot);
            }
        }
        for (key, slot) in self.backends.drain() {
            if !backends_kept.contains_key(&key) {
                self.retired.push(slot);
            }
        }
        self.pools = pools_kept;
        self.backends = backends_kept;
        Ok(specs)
    }

    /// The slot counting `pool`, if it is in the rules.
    pub fn pool_slot(&self, pool: &Pool) -> Option<usize> {
        self.pools.get(&(pool.listen, pool.proto)).copied()
    }

    /// The slot counting backend `dest` of `pool`, if it is in the rules.
    pub fn backend_slot(&self, pool: &Pool, dest: SocketAddr) -> Option<usize> {
        self.backends.get(&(pool.listen, pool.proto, dest)).copied()
    }

    fn reclaim(&mut self, shared: &Shared) {
        let (idle, busy): (Vec<usize>, Vec<usize>) =
            self.retired.iter().partition(|&&s| shared.active(s) == 0);
        self.free_backends.extend(idle);
        self.retired = busy;
    }
}

fn take(free: &mut Vec<usize>, next: &mut usize, max: usize) -> Result<usize, SlotsExhausted> {
    if let Some(s) = free.pop() {
        return Ok(s);
    }
    if *next >= max {
        return Err(SlotsExhausted);
    }
    *next += 1;
    Ok(*next - 1)
}

impl crate::stats::snapshot::SlotLookup for Slots {
    fn pool_slot(&self, pool: &Pool) -> Option<usize> {
        Slots::pool_slot(self, pool)
    }

    fn backend_slot(&self, pool: &Pool, dest: SocketAddr) -> Option<usize> {
        Slots::backend_slot(self, pool, dest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::rules::parse;

    #[test]
    fn slots_survive_reloads_and_are_reused_when_idle() {
        let shared = Shared::create().unwrap();
        let mut slots = Slots::default();
        let a = slots
            .assign(
                &parse("a,8080,127.0.0.1,1\nb,8080,127.0.0.1,2\n", "f").unwrap(),
                &Default::default(),
                &shared,
            )
            .unwrap();
        shared
            .backend(a[0].backends[1].slot)
            .total
            .store(7, Relaxed);
        let b = slots
            .assign(
                &parse(
                    "a,8080,127.0.0.1,1\nb,8080,127.0.0.1,2\nc,9090,127.0.0.1,3\n",
                    "f",
                )
                .unwrap(),
                &Default::default(),
                &shared,
            )
            .unwrap();
        assert_eq!(a[0], b[0], "unchanged pool keeps its slots");
        assert_eq!(shared.backend(b[0].backends[1].slot).total.load(Relaxed), 7);
        // Drop b (slot 1) while it still has a live connection: not reused yet.
        shared.open(0, 1).store(1, Relaxed);
        slots
            .assign(
                &parse("a,8080,127.0.0.1,1\nc,9090,127.0.0.1,3\n", "f").unwrap(),
                &Default::default(),
                &shared,
            )
            .unwrap();
        let d = slots
            .assign(
                &parse(
                    "a,8080,127.0.0.1,1\nc,9090,127.0.0.1,3\nd,9090,127.0.0.1,4\n",
                    "f",
                )
                .unwrap(),
                &Default::default(),
                &shared,
            )
            .unwrap();
        assert_ne!(d[1].backends[1].slot, 1);
        shared.open(0, 1).store(0, Relaxed);
        let e = slots
            .assign(&parse("a,8080,127.0.0.1,1\nc,9090,127.0.0.1,3\nd,9090,127.0.0.1,4\ne,7070,127.0.0.1,5\n", "f").unwrap(), &Default::default(), &shared)
            .unwrap();
        assert_eq!(e[2].backends[0].slot, 1, "idle retired slot reused");
        assert_eq!(shared.backend(1).total.load(Relaxed), 0, "and reset");
    }

    #[test]
    fn a_host_name_is_one_member_per_address_and_none_until_it_resolves() {
        let shared = Shared::create().unwrap();
        let mut slots = Slots::default();
        let rules = parse("w,8080,web.lab,80\nx,8080,10.0.0.2,80\n", "f").unwrap();
        let none = slots.assign(&rules, &Default::default(), &shared).unwrap();
        let addrs = |specs: &[PoolSpec]| -> Vec<String> {
            specs[0]
                .backends
                .iter()
                .map(|b| format!("{} {}", b.name, b.addr))
                .collect()
        };
        assert_eq!(addrs(&none), ["x 10.0.0.2:80"]);
        let mut answers = crate::dns::Answers::default();
        answers.insert(
            "web.lab".into(),
            crate::dns::Answer {
                addrs: vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
                ..Default::default()
            },
        );
        let two = slots.assign(&rules, &answers, &shared).unwrap();
        assert_eq!(
            addrs(&two),
            ["w 10.0.0.1:80", "w 10.0.0.2:80"],
            "10.0.0.2 once, the first row's"
        );
        assert_eq!(two[0].backends[0].line, 1);
        answers.get_mut("web.lab").unwrap().addrs = vec!["10.0.0.1".parse().unwrap()];
        let one = slots.assign(&rules, &answers, &shared).unwrap();
        assert_eq!(addrs(&one), ["w 10.0.0.1:80", "x 10.0.0.2:80"]);
        assert_eq!(
            one[0].backends[0].slot, two[0].backends[0].slot,
            "a kept address keeps its slot"
        );
    }
}
