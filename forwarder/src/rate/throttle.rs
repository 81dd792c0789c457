//! What a connection (or UDP session) of a limited pool consults before it reads: its own
//! buckets (`conn_rate_*`), its client address's and its pool's (shared, [`super::shared`]). The
//! limits are read from the pool's slot on every look, so an edit applies to connections already
//! open at their next read (or wake-up). A direction that stops at its allowance is *held*: its
//! time held and the bytes that pass after it was held are counted for the pool and the access
//! log, and the owner is told when to look again.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::{shared, Limit, LocalBucket};
use crate::stats::Shared;

/// Most lateness of a wake-up a held direction makes up for (see [`Throttle::allowance`]).
pub const CATCH_UP_NS: u64 = 100_000_000;

/// How early a wake-up may be taken (see [`Throttle::due`]).
const TIMER_SLACK_NS: u64 = 1_000_000;

/// A direction of a connection: `Up` is client → backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Up,
    Down,
}

impl Way {
    fn index(self) -> usize {
        match self {
            Way::Up => 0,
            Way::Down => 1,
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    conn: LocalBucket,
    /// When the direction stopped at its allowance (ns, [`super::now_ns`]); None while it flows
    /// below its limits.
    since: Option<u64>,
    /// When its buckets hold enough to read again.
    wake_ns: Option<u64>,
}

/// The limits one connection answers to.
#[derive(Debug)]
pub struct Throttle {
    pool_slot: usize,
    ip_key: u64,
    /// Entry of the address in the shared table (looked up again should another address have
    /// taken it over).
    ip_entry: Option<usize>,
    /// The connection's round trip: its buckets' burst (at least [`super::MIN_BURST_NS`]).
    rtt_ns: u64,
    held: [Held; 2],
    /// The wake-up the worker holds for us, so a burst of events arms one timer, not one each.
    armed: Option<u64>,
    /// Time held, both directions (ns), for the access log.
    pub held_ns: u64,
    /// Bytes that passed after being held, for the access log.
    pub held_bytes: u64,
}

impl Throttle {
    pub fn new(pool_slot: usize, client: IpAddr, rtt_ns: u64) -> Throttle {
        Throttle {
            pool_slot,
            ip_key: shared::key(pool_slot, client),
            ip_entry: None,
            rtt_ns,
            held: Default::default(),
            armed: None,
            held_ns: 0,
            held_bytes: 0,
        }
    }

    /// Whether the pool in `slot` has any limit now (one load: what an unlimited connection pays).
    pub fn pool_limited(shared: &Shared, slot: usize) -> bool {
        shared.pool(slot).limited.load(Relaxed) != 0
    }

    /// The limits in force for `way`: (connection, address, pool), bits per second or 0.
    fn rates(&self, shared: &Shared, way: Way) -> [u64; 3] {
        let r = &shared.pool(self.pool_slot).rates;
        let w = way.index();
        [
            r[w].load(Relaxed),
            r[2 + w].load(Relaxed),
            r[4 + w].load(Relaxed),
        ]
    }

    fn ip_bucket<'a>(&mut self, shared: &'a Shared, way: Way, now: u64) -> &'a AtomicU64 {
        let table = shared.ip_buckets();
        let e = match self.ip_entry {
            Some(e) if shared::holds(table, e, self.ip_key) => e,
            _ => {
                let e = shared::entry(table, self.ip_key, now);
                self.ip_entry = Some(e);
                e
            }
        };
        &table[e + 1 + way.index()]
    }

    fn pool_bucket<'a>(&self, shared: &'a Shared, way: Way) -> &'a AtomicU64 {
        let slot = shared.pool(self.pool_slot);
        match way {
            Way::Up => &slot.bucket_up,
            Way::Down => &slot.bucket_down,
        }
    }

    /// A bucket of `bits` per second for `way` at `now`, with the catch-up a late wake-up earns.
    fn limit(&self, way: Way, bits: u64, now: u64) -> Limit {
        let late = self.held[way.index()]
            .wake_ns
            .map_or(0, |wake| now.saturating_sub(wake).min(CATCH_UP_NS));
        Limit {
            catch_up_ns: late,
            ..Limit::new(bits, self.rtt_ns)
        }
    }

    /// Bytes `way` may read now: the least any of its buckets lets through (`u64::MAX` when
    /// no limit applies to it any more).
    ///
    /// A held direction woken late (a busy machine) may take what its buckets gathered while it
    /// waited for the worker, up to [`CATCH_UP_NS`] more than a burst: a bucket stops filling at
    /// its burst so that an idle connection cannot save up, but this one was not idle, it was
    /// waiting for us, and without this every late wake-up would be bandwidth lost for good.
    pub fn allowance(&mut self, shared: &Shared, way: Way, now: u64) -> u64 {
        let [conn, ip, pool] = self.rates(shared, way);
        let mut allow = u64::MAX;
        if conn > 0 {
            let limit = self.limit(way, conn, now);
            allow = allow.min(self.held[way.index()].conn.available(&limit, now));
        }
        if ip > 0 {
            let limit = self.limit(way, ip, now);
            allow = allow.min(shared::available(
                self.ip_bucket(shared, way, now),
                &limit,
                now,
            ));
        }
        if pool > 0 {
            let limit = self.limit(way, pool, now);
            allow = allow.min(shared::available(
                self.pool_bucket(shared, way),
                &limit,
                now,
            ));
        }
        allow
    }

    /// Charges the `read` bytes `way` took to its buckets; `stopped` says the read stopped at
    /// the allowance with more waiting, so the direction is held until its buckets refill.
    pub fn charge(&mut self, shared: &Shared, way: Way, now: u64, read: u64, stopped: bool) {
        let [conn, ip, pool] = self.rates(shared, way);
        let mut wake = 0;
        if conn > 0 {
            let limit = self.limit(way, conn, now);
            let b = &mut self.held[way.index()].conn;
            b.charge(&limit, now, read);
            wake = wake.max(b.refilled_at(&limit));
        }
        if ip > 0 {
            let limit = self.limit(way, ip, now);
            let bucket = self.ip_bucket(shared, way, now);
            shared::charge(bucket, &limit, now, read);
            wake = wake.max(shared::refilled_at(bucket, &limit));
        }
        if pool > 0 {
            let limit = self.limit(way, pool, now);
            let bucket = self.pool_bucket(shared, way);
            shared::charge(bucket, &limit, now, read);
            wake = wake.max(shared::refilled_at(bucket, &limit));
        }
        let counts = shared.pool(self.pool_slot);
        let held = &mut self.held[way.index()];
        if held.since.is_some() && read > 0 {
            self.held_bytes += read;
            counts.throttled_bytes.fetch_add(read, Relaxed);
        }
        if stopped {
            held.since.get_or_insert(now);
            // At least a millisecond on: the worker's timers have that resolution.
            held.wake_ns = Some(wake.max(now + 1_000_000));
        } else {
            held.wake_ns = None;
            if let Some(since) = held.since.take() {
                let ns = now.saturating_sub(since);
                self.held_ns += ns;
                counts.throttled_us.fetch_add(ns / 1000, Relaxed);
            }
        }
    }

    /// Whether `way` is held and its wake-up time has come (or is less than a timer tick away:
    /// the worker's timers fire to the millisecond, and the `Instant` a timer was set for may lie
    /// a little before the wake-up it stands for).
    pub fn due(&self, way: Way, now: u64) -> bool {
        self.held[way.index()]
            .wake_ns
            .is_some_and(|wake| wake <= now + TIMER_SLACK_NS)
    }

    /// Whether `way` is held.
    pub fn holding(&self, way: Way) -> bool {
        self.held[way.index()].wake_ns.is_some()
    }

    /// The timer the worker should set, when a held direction needs one it does not hold yet.
    pub fn timer(&mut self, now: Instant, now_ns: u64) -> Option<Instant> {
        let wake = self.held.iter().filter_map(|h| h.wake_ns).min()?;
        if self
            .armed
            .is_some_and(|armed| armed <= wake && armed > now_ns)
        {
            return None;
        }
        self.armed = Some(wake);
        Some(now + Duration::from_nanos(wake.saturating_sub(now_ns)))
    }

    /// A timer of ours fired: the next `timer` call arms a new one if still needed. (An older
    /// timer firing after a newer one was armed costs one duplicate timer at most.)
    pub fn fired(&mut self) {
        self.armed = None;
    }

    /// Time held so far, counting a hold still going on (for the access log at close).
    pub fn held_ms(&self, now: u64) -> u64 {
        let running: u64 = self
            .held
            .iter()
            .filter_map(|h| h.since)
            .map(|s| now.saturating_sub(s))
            .sum();
        (self.held_ns + running) / 1_000_000
    }

    /// A UDP datagram of `len` bytes going `way`: true when it may pass (it is then charged),
    /// false when it is over a limit (the caller drops and counts it).
    pub fn admit_datagram(&mut self, shared: &Shared, way: Way, now: u64, len: u64) -> bool {
        if self.allowance(shared, way, now) < len {
            shared.pool(self.pool_slot).rate_drops.fetch_add(1, Relaxed);
            return false;
        }
        self.charge(shared, way, now, len, false);
        true
    }
}

/// The smoothed round trip of a TCP socket (`TCP_INFO` `tcpi_rtt`, offset 68, µs), in ns; 0 when
/// it cannot be read.
pub fn socket_rtt_ns(socket: std::os::fd::RawFd) -> u64 {
    let mut bytes = [0u8; 104];
    let mut len = bytes.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `bytes`.
    let r = unsafe {
        libc::getsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            bytes.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 || (len as usize) < 72 {
        return 0;
    }
    u32::from_ne_bytes([bytes[68], bytes[69], bytes[70], bytes[71]]) as u64 * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direction with endless bytes waiting, woken when its throttle says, 0–3 ms late:
    /// over ten seconds it moves the limit (plus one burst), whichever bucket sets it.
    #[test]
    fn a_held_direction_woken_late_still_moves_its_rate() {
        let shared = Shared::create().unwrap();
        for (i, key) in ["conn_rate_up", "ip_rate_up", "rate_up"].iter().enumerate() {
            let slot = i + 1;
            let mut rates = crate::rate::Rates::default();
            rates.set(key, 16_000_000);
            for (word, v) in shared.pool(slot).rates.iter().zip(rates.as_array()) {
                word.store(v, Relaxed);
            }
            shared.pool(slot).limited.store(1, Relaxed);
            let mut t = Throttle::new(slot, "10.0.0.1".parse().unwrap(), 0);
            let start = 1_000_000_000_000u64;
            let mut now = start;
            let mut moved = 0;
            let mut late = 0u64;
            while now < start + 10_000_000_000 {
                let n = t.allowance(&shared, Way::Up, now);
                moved += n;
                t.charge(&shared, Way::Up, now, n, true);
                let wake = t.held[0].wake_ns.unwrap();
                // Mostly 0-3 ms late, and every 50th wake-up 40 ms late.
                late = (late + 700_000) % 3_000_000;
                if (moved / 10_000) % 50 == 0 {
                    late += 40_000_000;
                }
                now = wake.max(now) + late;
            }
            let expected = 2_000_000.0 * 10.0;
            let ratio = moved as f64 / expected;
            assert!(
                (0.99..1.01).contains(&ratio),
                "{key}: {moved} bytes, {ratio}"
            );
        }
    }
}
