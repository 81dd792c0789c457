//! Bandwidth limits (`conn_rate_up/down`, `ip_rate_up/down`, `rate_up/down`): the option values,
//! and the token bucket every limit uses, written as GCRA (one "theoretical arrival time" per
//! bucket instead of a token count and a refill clock), so a bucket is a single word that several
//! worker processes can share in the stats mapping ([`shared`]). A connection's own bucket is the
//! same word held locally ([`throttle`]).

pub mod shared;
pub mod throttle;

use serde::{Deserialize, Serialize};

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock every process of the forwarder shares (an
/// `Instant` cannot be stored in the shared mapping).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The six limits of a pool, in bits per second as written (0 = no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    pub conn_up: u64,
    pub conn_down: u64,
    pub ip_up: u64,
    pub ip_down: u64,
    pub pool_up: u64,
    pub pool_down: u64,
}

impl Rates {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        *self != Rates::default()
    }

    /// The option key of each field, in the order of [`Rates::as_array`].
    pub const KEYS: [&'static str; 6] = [
        "conn_rate_up",
        "conn_rate_down",
        "ip_rate_up",
        "ip_rate_down",
        "rate_up",
        "rate_down",
    ];

    pub fn as_array(&self) -> [u64; 6] {
        [
            self.conn_up,
            self.conn_down,
            self.ip_up,
            self.ip_down,
            self.pool_up,
            self.pool_down,
        ]
    }

    pub fn from_array(a: [u64; 6]) -> Rates {
        Rates {
            conn_up: a[0],
            conn_down: a[1],
            ip_up: a[2],
            ip_down: a[3],
            pool_up: a[4],
            pool_down: a[5],
        }
    }

    /// Sets the field of option `key`; false when `key` is not a rate.
    pub fn set(&mut self, key: &str, bits_per_s: u64) -> bool {
        let Some(i) = Self::KEYS.iter().position(|k| *k == key) else {
            return false;
        };
        let mut a = self.as_array();
        a[i] = bits_per_s;
        *self = Rates::from_array(a);
        true
    }

    /// The value of option `key` (bits per second).
    pub fn get(&self, key: &str) -> Option<u64> {
        Self::KEYS
            .iter()
            .position(|k| *k == key)
            .map(|i| self.as_array()[i])
    }
}

/// A pool's limits and what they did, for the page, the API and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStats {
    /// The limits in force (bits per second, 0 = none).
    pub rates: Rates,
    /// Time connection directions were held back, summed over connections (ms).
    pub throttled_ms: u64,
    /// Bytes that passed after their direction had been held back.
    pub throttled_bytes: u64,
    /// UDP datagrams dropped for being over a limit.
    pub rate_drops: u64,
}

impl LimitStats {
    pub fn of(slot: &crate::stats::PoolSlot) -> LimitStats {
        use std::sync::atomic::Ordering::Relaxed;
        LimitStats {
            rates: Rates::from_array(std::array::from_fn(|i| slot.rates[i].load(Relaxed))),
            throttled_ms: slot.throttled_us.load(Relaxed) / 1000,
            throttled_bytes: slot.throttled_bytes.load(Relaxed),
            rate_drops: slot.rate_drops.load(Relaxed),
        }
    }
}

/// The `/metrics` families of limited pools (pools without limits have no series).
pub fn render_metrics(
    stats: &crate::stats::snapshot::StatsSnapshot,
    out: &mut String,
    head: impl Fn(&mut String, &'static str, &'static str, &'static str),
) {
    use std::fmt::Write;
    let limited = || stats.pools.iter().filter(|p| p.limits.rates.any());
    let label = |p: &crate::stats::snapshot::PoolStats| {
        let proto = match p.proto {
            crate::rules::Proto::Tcp => "",
            crate::rules::Proto::Udp => ",proto=\"udp\"",
        };
        format!("listen=\"{}\"{proto}", p.listen)
    };
    let limit = "forwarder_pool_rate_limit_bits_per_second";
    head(
        out,
        limit,
        "gauge",
        "Bandwidth limits in force, by scope (conn, ip, pool) and direction.",
    );
    for p in limited() {
        let r = p.limits.rates.as_array();
        for (i, key) in Rates::KEYS.iter().enumerate() {
            if r[i] == 0 {
                continue;
            }
            let scope = key.split("rate").next().unwrap_or("").trim_end_matches('_');
            let scope = if scope.is_empty() { "pool" } else { scope };
            let direction = if key.ends_with("_up") { "up" } else { "down" };
            let _ = writeln!(
                out,
                "{limit}{{{},scope=\"{scope}\",direction=\"{direction}\"}} {}",
                label(p),
                r[i]
            );
        }
    }
    let held = "forwarder_pool_throttled_seconds_total";
    head(
        out,
        held,
        "counter",
        "Time connection directions were held back by a bandwidth limit, summed.",
    );
    for p in limited() {
        let ms = p.limits.throttled_ms;
        let _ = writeln!(out, "{held}{{{}}} {}.{:03}", label(p), ms / 1000, ms % 1000);
    }
    let bytes = "forwarder_pool_throttled_bytes_total";
    head(
        out,
        bytes,
        "counter",
        "Bytes that passed after a bandwidth limit had held their direction back.",
    );
    for p in limited() {
        let _ = writeln!(out, "{bytes}{{{}}} {}", label(p), p.limits.throttled_bytes);
    }
    let drops = "forwarder_pool_rate_dropped_datagrams_total";
    head(
        out,
        drops,
        "counter",
        "UDP datagrams dropped for being over a bandwidth limit.",
    );
    for p in limited().filter(|p| p.proto == crate::rules::Proto::Udp) {
        let _ = writeln!(out, "{drops}{{{}}} {}", label(p), p.limits.rate_drops);
    }
}

/// Smallest limit: 1 kbit/s (below it a bucket's burst floor would dominate the rate).
pub const MIN_BITS_PER_S: u64 = 1_000;

/// `20m`, `1.5g`, `800k`, `64000`: bits per second with an optional decimal `k`, `m` or `g`.
pub fn parse_bits(key: &str, value: &str) -> Result<u64, String> {
    let bad = || {
        format!("{key}=\"{value}\" is not a rate: bits per second, with k, m or g (rate_down=20m)")
    };
    let lower = value.to_ascii_lowercase();
    let (number, scale) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 1e3),
        Some(b'm') => (&lower[..lower.len() - 1], 1e6),
        Some(b'g') => (&lower[..lower.len() - 1], 1e9),
        _ => (&lower[..], 1.0),
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let n: f64 = number.parse().map_err(|_| bad())?;
    let bits = (n * scale).round();
    if bits < MIN_BITS_PER_S as f64 {
        return Err(format!(
            "{key}={value}: at least 1k (1,000 bits per second)"
        ));
    }
    if bits > 1e13 {
        return Err(format!("{key}={value}: at most 10000g"));
    }
    Ok(bits as u64)
}

/// `20m` for 20,000,000: how the page and `--check` write a rate.
pub fn format_bits(bits: u64) -> String {
    for (scale, suffix) in [(1_000_000_000, "g"), (1_000_000, "m"), (1_000, "k")] {
        if bits >= scale && bits.is_multiple_of(scale / 1000) {
            let whole = bits / scale;
            let frac = bits % scale / (scale / 1000);
            return if frac == 0 {
                format!("{whole}{suffix}")
            } else {
                let f = format!("{frac:03}");
                format!("{whole}.{}{suffix}", f.trim_end_matches('0'))
            };
        }
    }
    bits.to_string()
}

/// Least burst, as time at the rate: a bucket of one loopback round trip (tens of µs) would wake
/// its connection for every few kilobytes, and a connection woken later than its bucket takes to
/// fill loses the difference. 20 ms keeps a limited connection at about 200 wake-ups a second
/// (one each quarter burst) and tolerates a wake-up 15 ms late on a busy machine.
pub const MIN_BURST_NS: u64 = 20_000_000;
/// Least burst in bytes: below one full TCP segment train a slow limit would send tiny packets.
pub const MIN_BURST_BYTES: u64 = 16 * 1024;

/// One bucket's parameters: its rate in bytes per second and its burst as time (GCRA's
/// tolerance: how far ahead of the clock the bucket may be charged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub bytes_per_s: u64,
    pub burst_ns: u64,
    /// How far back the bucket's filling is counted past its burst: what a direction that was
    /// waiting for its wake-up (not idle) missed while the wake-up was late. 0 for a plain bucket.
    pub catch_up_ns: u64,
}

impl Limit {
    /// A limit of `bits_per_s` whose burst is about one round trip (`rtt_ns`, when known) but
    /// never less than [`MIN_BURST_NS`] or [`MIN_BURST_BYTES`].
    pub fn new(bits_per_s: u64, rtt_ns: u64) -> Limit {
        let bytes_per_s = (bits_per_s / 8).max(1);
        let bytes_floor_ns = MIN_BURST_BYTES * 1_000_000_000 / bytes_per_s;
        Limit {
            bytes_per_s,
            burst_ns: rtt_ns.max(MIN_BURST_NS).max(bytes_floor_ns),
            catch_up_ns: 0,
        }
    }

    /// Nanoseconds `bytes` take at the rate.
    pub fn cost_ns(&self, bytes: u64) -> u64 {
        (bytes as u128 * 1_000_000_000 / self.bytes_per_s as u128).min(u64::MAX as u128) as u64
    }

    /// Bytes that `ns` are worth at the rate.
    pub fn bytes_in(&self, ns: u64) -> u64 {
        (ns as u128 * self.bytes_per_s as u128 / 1_000_000_000) as u64
    }

    /// Where the bucket's account starts at `now`: its arrival time, or — a bucket full for
    /// longer, whose surplus is forfeit — `now` (less any catch-up).
    fn base(&self, tat: u64, now: u64) -> u64 {
        tat.max(now.saturating_sub(self.catch_up_ns))
    }

    /// Bytes the bucket lets through now, given its arrival time `tat`.
    pub fn available(&self, tat: u64, now: u64) -> u64 {
        let base = self.base(tat, now);
        self.bytes_in((now + self.burst_ns).saturating_sub(base))
    }

    /// The arrival time after `bytes` went through at `now`.
    pub fn charged(&self, tat: u64, now: u64, bytes: u64) -> u64 {
        self.base(tat, now).saturating_add(self.cost_ns(bytes))
    }

    /// When an empty bucket holds a quarter of its burst again: waking sooner would move a
    /// sliver per wake-up.
    pub fn refilled_at(&self, tat: u64) -> u64 {
        tat.saturating_sub(self.burst_ns) + self.burst_ns / 4
    }
}

/// A bucket held by one connection direction (no other process sees it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalBucket {
    tat: u64,
}

impl LocalBucket {
    pub fn available(&self, limit: &Limit, now: u64) -> u64 {
        limit.available(self.tat, now)
    }

    pub fn charge(&mut self, limit: &Limit, now: u64, bytes: u64) {
        self.tat = limit.charged(self.tat, now, bytes);
    }

    pub fn refilled_at(&self, limit: &Limit) -> u64 {
        limit.refilled_at(self.tat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_suffixes_and_say_why_not() {
        assert_eq!(parse_bits("rate_down", "20m"), Ok(20_000_000));
        assert_eq!(parse_bits("rate_down", "1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_bits("rate_down", "800k"), Ok(800_000));
        assert_eq!(parse_bits("rate_down", "64000"), Ok(64_000));
        assert_eq!(
            parse_bits("rate_up", "fast").unwrap_err(),
            "rate_up=\"fast\" is not a rate: bits per second, with k, m or g (rate_down=20m)"
        );
        assert_eq!(
            parse_bits("rate_up", "20mb").unwrap_err(),
            "rate_up=\"20mb\" is not a rate: bits per second, with k, m or g (rate_down=20m)"
        );
        assert!(parse_bits("rate_up", "10")
            .unwrap_err()
            .contains("at least 1k"));
        for bits in [20_000_000, 1_500_000_000, 64_000, 1_234] {
            let text = format_bits(bits);
            assert_eq!(parse_bits("r", &text), Ok(bits), "{text}");
        }
        assert_eq!(format_bits(20_000_000), "20m");
        assert_eq!(format_bits(1_500_000_000), "1.5g");
    }

    #[test]
    fn a_bucket_passes_its_rate_over_time_and_one_burst_at_once() {
        let limit = Limit::new(8_000_000, 0); // 1 MB/s
        assert_eq!(limit.burst_ns, 20_000_000, "20 ms at 1 MB/s is over 16 KiB");
        let mut b = LocalBucket::default();
        let t0 = 1_000_000_000_000;
        let first = b.available(&limit, t0);
        assert_eq!(first, 20_000, "a fresh bucket holds one burst");
        b.charge(&limit, t0, first);
        assert_eq!(b.available(&limit, t0), 0);
        // Taking whatever is available every millisecond for a second moves the rate, plus the
        // first burst.
        let mut moved = first;
        let mut now = t0;
        for _ in 0..1000 {
            now += 1_000_000;
            let n = b.available(&limit, now);
            b.charge(&limit, now, n);
            moved += n;
        }
        let expected = 1_000_000 + 20_000;
        assert!(moved.abs_diff(expected) < 1_000, "{moved} vs {expected}");
        // Empty: refilled to a quarter of the burst at the time named.
        let at = b.refilled_at(&limit);
        assert!(at > now);
        assert_eq!(b.available(&limit, at), 20_000 / 4);
    }

    #[test]
    fn overdraft_is_paid_back_before_more_passes() {
        let limit = Limit::new(8_000_000, 0);
        let mut b = LocalBucket::default();
        let t0 = 5_000_000_000;
        // A 1 MB read charged at once (two workers raced): nothing passes for about a second.
        b.charge(&limit, t0, 1_000_000);
        assert_eq!(b.available(&limit, t0 + 900_000_000), 0);
        assert!(b.available(&limit, t0 + 1_000_000_000) > 0);
    }

    #[test]
    fn the_burst_follows_the_round_trip_above_the_floors() {
        assert_eq!(Limit::new(1_000_000_000, 0).burst_ns, MIN_BURST_NS);
        assert_eq!(Limit::new(1_000_000_000, 40_000_000).burst_ns, 40_000_000);
        assert_eq!(
            Limit::new(1_000_000, 0).burst_ns,
            131_072_000,
            "16 KiB at 125 kB/s"
        );
        let rates = Rates {
            ip_down: 5,
            ..Rates::default()
        };
        assert!(rates.any());
        assert_eq!(rates.get("ip_rate_down"), Some(5));
    }
}
