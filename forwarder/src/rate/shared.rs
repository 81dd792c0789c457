//! Buckets shared by every worker in the stats mapping: a pool's (`rate_up/down`, one word per
//! direction in its pool slot) and each client address's (`ip_rate_up/down`, a table here). A
//! bucket is its GCRA arrival time; charging is one `fetch_update`, so workers never lock. Two
//! workers that look at the same bucket at once may both pass a burst: the overdraft is charged
//! all the same and paid back before more passes, so the average holds.
//!
//! The address table: entries of [`ENTRY_WORDS`] words (key, arrival time up, down, spare) in
//! open addressing with a probe window of [`PROBE`]. An entry whose buckets are both full (their
//! arrival times long past) is as good as a fresh one, so any worker may take it over for another
//! address: the table never needs cleaning. Limits, by design: two workers taking a fresh entry
//! for one address at the same instant make two (each then sees the first in the window and uses
//! it from its next look on); when a window is full of live entries the address shares the
//! window's first entry (stricter, never looser).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::Limit;

/// Words per address entry.
pub const ENTRY_WORDS: usize = 4;
/// Entries in the table (512 KiB).
pub const ENTRIES: usize = 1 << 14;
pub const TABLE_WORDS: usize = ENTRIES * ENTRY_WORDS;
/// Entries an address may use from its home position on.
pub const PROBE: usize = 8;
/// A bucket whose arrival time has passed is full, as good as a fresh one; one past by this much
/// belongs to an address gone quiet, so its entry may be taken over.
const STALE_NS: u64 = 2_000_000_000;

/// Bytes `bucket` lets through now.
pub fn available(bucket: &AtomicU64, limit: &Limit, now: u64) -> u64 {
    limit.available(bucket.load(Relaxed), now)
}

/// Charges `bytes` that went through at `now`.
pub fn charge(bucket: &AtomicU64, limit: &Limit, now: u64, bytes: u64) {
    // The closure always returns Some: the update cannot fail.
    let _ = bucket.fetch_update(Relaxed, Relaxed, |tat| Some(limit.charged(tat, now, bytes)));
}

/// When `bucket` holds a quarter of its burst again.
pub fn refilled_at(bucket: &AtomicU64, limit: &Limit) -> u64 {
    limit.refilled_at(bucket.load(Relaxed))
}

/// The key of an address in a pool: never 0 (a zero key is a free entry).
pub fn key(pool: usize, ip: IpAddr) -> u64 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let bits = match ip {
        IpAddr::V4(a) => u32::from(a) as u128 | 4 << 120,
        IpAddr::V6(a) => u128::from(a) ^ 6 << 120,
    };
    mix(mix(bits as u64 ^ ((pool as u64) << 48)) ^ (bits >> 64) as u64).max(1)
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The entry (index of its first word) holding `key`'s buckets, taking a free or stale one when
/// the address has none yet.
pub fn entry(table: &[AtomicU64], key: u64, now: u64) -> usize {
    let entries = table.len() / ENTRY_WORDS;
    let home = (key as usize) % entries;
    let at = |i: usize| ((home + i) % entries) * ENTRY_WORDS;
    if let Some(found) = (0..PROBE).map(at).find(|&e| table[e].load(Relaxed) == key) {
        return found;
    }
    for e in (0..PROBE).map(at) {
        let current = table[e].load(Relaxed);
        let stale = |w: usize| table[e + w].load(Relaxed).saturating_add(STALE_NS) < now;
        if (current == 0 || (stale(1) && stale(2)))
            && table[e]
                .compare_exchange(current, key, Relaxed, Relaxed)
                .is_ok()
        {
            // Full buckets: an arrival time in the past.
            table[e + 1].store(0, Relaxed);
            table[e + 2].store(0, Relaxed);
            return e;
        }
    }
    at(0)
}

/// Whether entry `e` still holds `key` (another address may have taken it over while it was
/// idle).
pub fn holds(table: &[AtomicU64], e: usize, key: u64) -> bool {
    table[e].load(Relaxed) == key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<AtomicU64> {
        (0..PROBE * 4 * ENTRY_WORDS)
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    #[test]
    fn addresses_get_their_own_entries_and_keep_them() {
        let t = table();
        let now = 10_000_000_000;
        let a = key(1, "10.0.0.1".parse().unwrap());
        let b = key(1, "10.0.0.2".parse().unwrap());
        assert_ne!(a, key(2, "10.0.0.1".parse().unwrap()), "pools apart");
        assert_eq!(a, key(1, "::ffff:10.0.0.1".parse().unwrap()));
        let ea = entry(&t, a, now);
        let eb = entry(&t, b, now);
        assert_ne!(ea, eb);
        assert_eq!(entry(&t, a, now), ea);
        assert!(holds(&t, ea, a));
    }

    #[test]
    fn a_busy_entry_is_kept_and_an_idle_one_taken_over() {
        let t = table();
        let limit = Limit::new(8_000_000, 0);
        let now = 10_000_000_000;
        // Fill every entry of a window with live buckets of other addresses.
        let mine = key(3, "10.0.0.9".parse().unwrap());
        let home = (mine as usize) % (t.len() / ENTRY_WORDS);
        for i in 0..PROBE {
            let e = ((home + i) % (t.len() / ENTRY_WORDS)) * ENTRY_WORDS;
            t[e].store(1000 + i as u64, Relaxed);
            charge(&t[e + 1], &limit, now, 1_000_000);
        }
        let shared = entry(&t, mine, now);
        assert!(
            !holds(&t, shared, mine),
            "shares the first entry, takes nothing over"
        );
        // Four seconds later the others' buckets are full again: one is taken over, fresh.
        let later = now + 4_000_000_000;
        let e = entry(&t, mine, later);
        assert!(holds(&t, e, mine));
        assert_eq!(available(&t[e + 1], &limit, later), 20_000);
    }

    #[test]
    fn a_shared_bucket_charges_what_went_through() {
        let bucket = AtomicU64::new(0);
        let limit = Limit::new(80_000_000, 0); // 10 MB/s
        let now = 1_000_000_000;
        let n = available(&bucket, &limit, now);
        assert_eq!(n, 200_000, "20 ms at 10 MB/s");
        charge(&bucket, &limit, now, n);
        assert_eq!(available(&bucket, &limit, now), 0);
        assert!(refilled_at(&bucket, &limit) > now);
    }
}
