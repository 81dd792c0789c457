//! Backend choice for one pool: a round-robin counter shared by every worker (so k consecutive
//! connections to k backends land on each once, whichever worker accepted them), skipping
//! backends in back-off, and failing open when every backend is down.

use std::sync::atomic::Ordering::Relaxed;

use crate::control::PoolSpec;
use crate::stats::Shared;

/// Picks the first backend to try for a new connection.
pub fn pick_backend(pool: &PoolSpec, shared: &Shared, now_ms: u64) -> Option<usize> {
    let n = pool.backends.len();
    if n == 0 {
        return None;
    }
    let start = (shared.pool(pool.slot).next.fetch_add(1, Relaxed) % n as u64) as usize;
    Some(first_up(pool, shared, now_ms, start, &[]).unwrap_or(start))
}

/// After `tried` failed, the next backend to try: the next one up in round-robin order, else
/// any untried one (fail open), else none.
pub fn next_backend(
    pool: &PoolSpec,
    shared: &Shared,
    now_ms: u64,
    tried: &[usize],
) -> Option<usize> {
    let n = pool.backends.len();
    let last = *tried.last()?;
    let start = (last + 1) % n.max(1);
    first_up(pool, shared, now_ms, start, tried)
        .or_else(|| (0..n).map(|i| (start + i) % n).find(|i| !tried.contains(i)))
}

fn first_up(
    pool: &PoolSpec,
    shared: &Shared,
    now_ms: u64,
    start: usize,
    tried: &[usize],
) -> Option<usize> {
    let n = pool.backends.len();
    (0..n)
        .map(|i| (start + i) % n)
        .find(|&i| !tried.contains(&i) && !shared.backend(pool.backends[i].slot).is_down(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::BackendSpec;

    fn pool(n: usize) -> PoolSpec {
        PoolSpec {
            listen: "0.0.0.0:1".parse().unwrap(),
            proto: Default::default(),
            slot: 0,
            options: Default::default(),
            backends: (0..n)
                .map(|i| BackendSpec {
                    name: format!("b{i}"),
                    addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    slot: i,
                    options: Default::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn strict_round_robin_over_three() {
        let shared = Shared::create().unwrap();
        let p = pool(3);
        let picks: Vec<_> = (0..6)
            .map(|_| pick_backend(&p, &shared, 0).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn down_backends_are_skipped_and_all_down_fails_open() {
        let shared = Shared::create().unwrap();
        let p = pool(3);
        shared.backend(1).record_failure(111, 1000);
        let picks: Vec<_> = (0..3)
            .map(|_| pick_backend(&p, &shared, 1500).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 2]);
        assert_eq!(next_backend(&p, &shared, 1500, &[0]), Some(2));
        assert_eq!(
            next_backend(&p, &shared, 1500, &[0, 2]),
            Some(1),
            "fail open"
        );
        assert_eq!(next_backend(&p, &shared, 1500, &[0, 2, 1]), None);
        shared.backend(0).record_failure(111, 1000);
        shared.backend(2).record_failure(111, 1000);
        assert!(
            pick_backend(&p, &shared, 1500).is_some(),
            "all down still tries one"
        );
    }
}
