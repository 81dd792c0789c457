//! Which shared stats slot counts which pool and backend. Slots stay with a pool or backend
//! across reloads (so its counters keep running) and are reused only once their rule is gone and
//! no connection still counts into them.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::control::{BackendSpec, PoolSpec};
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
    /// of those that are gone.
    pub fn assign(
        &mut self,
        rules: &RuleSet,
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
            let mut backends = Vec::new();
            for rule in &pool.rules {
                let key = (pool.listen, pool.proto, rule.dest);
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
                    addr: rule.dest,
                    slot: bslot,
                    options: rule.options.clone(),
                    port_range: !rule.dest_ports.is_single(),
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
                &shared,
            )
            .unwrap();
        assert_ne!(d[1].backends[1].slot, 1);
        shared.open(0, 1).store(0, Relaxed);
        let e = slots
            .assign(&parse("a,8080,127.0.0.1,1\nc,9090,127.0.0.1,3\nd,9090,127.0.0.1,4\ne,7070,127.0.0.1,5\n", "f").unwrap(), &shared)
            .unwrap();
        assert_eq!(e[2].backends[0].slot, 1, "idle retired slot reused");
        assert_eq!(shared.backend(1).total.load(Relaxed), 0, "and reset");
    }
}
