//! Open connections per client address and pool (`max_conns_per_ip`), shared by every worker:
//! an open-addressing table of single atomic words in the shared mapping. Each word packs a
//! 38-bit key (a hash of the pool slot and the address), the index of the worker that counts in
//! it, and that worker's count (20 bits). An address's words (one per worker that holds
//! connections from it) lie in one probe window; admitting sums them. Only its worker changes a
//! word's count, a word is free again when its count drops to zero, and a dead worker's words are
//! cleared by the supervisor ([`forget_worker`]), so a crash leaks no counts.
//!
//! Limits, by design: two addresses whose keys collide share one count (about one pair in 2^38);
//! when the [`PROBE`] words an address may use are all taken by others, it is admitted uncounted
//! (fail open, so a flood of distinct addresses cannot lock anyone out); connections from one
//! address arriving at two workers at the same instant may both be admitted at the limit (it can
//! be exceeded by at most one per worker, for a moment).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Words in the table (8 bytes each).
pub const TABLE_WORDS: usize = 1 << 16;
/// Words an address may occupy from its home position on.
pub const PROBE: usize = 16;
const COUNT_BITS: u32 = 20;
const WORKER_BITS: u32 = 6;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const WORKER_MASK: u64 = (1 << WORKER_BITS) - 1;
const KEY_SHIFT: u32 = COUNT_BITS + WORKER_BITS;

// Every worker index fits its field.
const _: () = assert!(crate::stats::MAX_WORKERS as u64 <= WORKER_MASK + 1);

/// The result of counting a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Counted: release it when the connection ends.
    Counted,
    /// The table had no room: admitted, nothing to release.
    Uncounted,
    /// The address holds its limit already.
    Refused,
}

fn key(pool: usize, ip: IpAddr) -> u64 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let bits = match ip {
        IpAddr::V4(a) => u32::from(a) as u128 | 4 << 120,
        IpAddr::V6(a) => u128::from(a) ^ 6 << 120,
    };
    let h = mix(mix(bits as u64 ^ pool as u64) ^ (bits >> 64) as u64);
    // Never 0: a zero word means free.
    (h >> KEY_SHIFT).max(1)
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn window(table: &[AtomicU64], key: u64) -> impl Iterator<Item = &AtomicU64> {
    let home = (mix(key) as usize) % table.len();
    (0..PROBE).map(move |i| &table[(home + i) % table.len()])
}

fn worker_of(word: u64) -> usize {
    ((word >> COUNT_BITS) & WORKER_MASK) as usize
}

/// Counts a connection from `ip` to pool `pool` in `worker`'s word, unless the address already
/// holds `max` over all workers.
pub fn admit(table: &[AtomicU64], pool: usize, ip: IpAddr, max: u64, worker: usize) -> Admit {
    let key = key(pool, ip);
    let max = max.min(COUNT_MASK);
    let mut total = 0;
    let mut own = None;
    for word in window(table, key) {
        let cur = word.load(Relaxed);
        if cur >> KEY_SHIFT == key {
            total += cur & COUNT_MASK;
            if worker_of(cur) == worker {
                own = Some(word);
            }
        }
    }
    if total >= max {
        return Admit::Refused;
    }
    if let Some(word) = own {
        // Only this worker changes its own word's count.
        word.fetch_add(1, Relaxed);
        return Admit::Counted;
    }
    let claimed = key << KEY_SHIFT | (worker as u64) << COUNT_BITS | 1;
    for word in window(table, key) {
        if word.compare_exchange(0, claimed, Relaxed, Relaxed).is_ok() {
            return Admit::Counted;
        }
    }
    Admit::Uncounted
}

/// Takes back a connection [`admit`] counted for `worker`.
pub fn release(table: &[AtomicU64], pool: usize, ip: IpAddr, worker: usize) {
    let key = key(pool, ip);
    for word in window(table, key) {
        let cur = word.load(Relaxed);
        if cur >> KEY_SHIFT == key && worker_of(cur) == worker && cur & COUNT_MASK > 0 {
            if cur & COUNT_MASK == 1 {
                word.store(0, Relaxed); // the last connection frees the word
            } else {
                word.fetch_sub(1, Relaxed);
            }
            return;
        }
    }
}

/// Frees every word of a dead worker; returns how many connections they counted.
pub fn forget_worker(table: &[AtomicU64], worker: usize) -> u64 {
    let mut counted = 0;
    for word in table {
        let cur = word.load(Relaxed);
        if cur != 0
            && worker_of(cur) == worker
            && word.compare_exchange(cur, 0, Relaxed, Relaxed).is_ok()
        {
            counted += cur & COUNT_MASK;
        }
    }
    counted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn counts_per_address_and_pool_and_frees_on_the_last_release() {
        let t = table(1024);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(admit(&t, 0, a, 2, 0), Admit::Counted);
        assert_eq!(
            admit(&t, 0, a, 2, 1),
            Admit::Counted,
            "two workers, one count"
        );
        assert_eq!(admit(&t, 0, a, 2, 0), Admit::Refused);
        assert_eq!(admit(&t, 0, a, 2, 2), Admit::Refused);
        assert_eq!(admit(&t, 1, a, 2, 0), Admit::Counted, "another pool");
        assert_eq!(admit(&t, 0, b, 2, 0), Admit::Counted, "another address");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(admit(&t, 0, mapped, 2, 0), Admit::Refused, "same client");
        release(&t, 0, a, 1);
        assert_eq!(admit(&t, 0, a, 2, 0), Admit::Counted);
        for (pool, ip) in [(0, a), (0, a), (1, a), (0, b)] {
            release(&t, pool, ip, 0);
        }
        assert!(
            t.iter().all(|w| w.load(Relaxed) == 0),
            "every word free again"
        );
    }

    #[test]
    fn a_full_window_admits_uncounted() {
        let t = table(PROBE);
        for i in 0..PROBE as u32 {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            assert_eq!(admit(&t, 0, ip, 1, 0), Admit::Counted);
        }
        let late = IpAddr::V4(0x0b00_0000.into());
        assert_eq!(admit(&t, 0, late, 1, 0), Admit::Uncounted);
    }

    #[test]
    fn a_dead_workers_counts_are_forgotten() {
        let t = table(1024);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(admit(&t, 0, a, 2, 3), Admit::Counted);
        assert_eq!(admit(&t, 0, a, 2, 3), Admit::Counted);
        assert_eq!(admit(&t, 0, a, 2, 1), Admit::Refused);
        assert_eq!(forget_worker(&t, 3), 2);
        assert_eq!(
            admit(&t, 0, a, 2, 1),
            Admit::Counted,
            "the dead worker's places are free"
        );
        assert_eq!(forget_worker(&t, 3), 0);
    }
}
