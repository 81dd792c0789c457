//! Open connections per client address and pool (`max_conns_per_ip`), shared by every worker:
//! an open-addressing table of single atomic words in the shared mapping. Each word packs a
//! 44-bit key (a hash of the pool slot and the address) and a 20-bit count, so claiming,
//! counting and freeing an entry are each one compare-and-swap and an entry is free again the
//! moment its count drops to zero.
//!
//! Limits, by design: two addresses whose keys collide share one count (about one pair in 2^44);
//! when the [`PROBE`] words an address may use are all taken by others, it is admitted uncounted
//! (fail open, so a flood of distinct addresses cannot lock anyone out); two workers seeing a new
//! address at the same instant may each claim a word for it, splitting its count.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Words in the table (8 bytes each).
pub const TABLE_WORDS: usize = 1 << 16;
/// Words an address may occupy from its home position on.
pub const PROBE: usize = 16;
const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

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
    (h >> COUNT_BITS).max(1)
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

/// Counts a connection from `ip` to pool `pool` unless it already holds `max`.
pub fn admit(table: &[AtomicU64], pool: usize, ip: IpAddr, max: u64) -> Admit {
    let key = key(pool, ip);
    let max = max.min(COUNT_MASK);
    // The address's own word first, wherever it is in the window.
    for word in window(table, key) {
        let mut cur = word.load(Relaxed);
        while cur >> COUNT_BITS == key {
            if cur & COUNT_MASK >= max {
                return Admit::Refused;
            }
            match word.compare_exchange_weak(cur, cur + 1, Relaxed, Relaxed) {
                Ok(_) => return Admit::Counted,
                Err(now) => cur = now, // freed or counted meanwhile: look again
            }
        }
    }
    for word in window(table, key) {
        if word
            .compare_exchange(0, key << COUNT_BITS | 1, Relaxed, Relaxed)
            .is_ok()
        {
            return Admit::Counted;
        }
    }
    Admit::Uncounted
}

/// Takes back a connection [`admit`] counted.
pub fn release(table: &[AtomicU64], pool: usize, ip: IpAddr) {
    let key = key(pool, ip);
    for word in window(table, key) {
        let mut cur = word.load(Relaxed);
        while cur >> COUNT_BITS == key && cur & COUNT_MASK > 0 {
            // The last connection frees the word whole.
            let next = if cur & COUNT_MASK == 1 { 0 } else { cur - 1 };
            match word.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }
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
        assert_eq!(admit(&t, 0, a, 2), Admit::Counted);
        assert_eq!(admit(&t, 0, a, 2), Admit::Counted);
        assert_eq!(admit(&t, 0, a, 2), Admit::Refused);
        assert_eq!(admit(&t, 1, a, 2), Admit::Counted, "another pool");
        assert_eq!(admit(&t, 0, b, 2), Admit::Counted, "another address");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(admit(&t, 0, mapped, 2), Admit::Refused, "same client");
        release(&t, 0, a);
        assert_eq!(admit(&t, 0, a, 2), Admit::Counted);
        for (pool, ip) in [(0, a), (0, a), (1, a), (0, b)] {
            release(&t, pool, ip);
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
            assert_eq!(admit(&t, 0, ip, 1), Admit::Counted);
        }
        let late = IpAddr::V4(0x0b00_0000.into());
        assert_eq!(admit(&t, 0, late, 1), Admit::Uncounted);
    }
}
