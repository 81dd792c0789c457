//! Counters and backend health shared by the supervisor and every worker: one anonymous shared
//! mapping (a memfd, inherited by the workers), slots of relaxed atomics indexed by a slot number
//! the supervisor assigns. Cheap on the hot path: a worker only does `fetch_add` on its slots.

pub mod health;
pub mod per_ip;
pub mod snapshot;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use testbed::shm::SharedMemory;

/// How many distinct pools and backends a forwarder can have at once (slots are reused once
/// their rule is gone and they carry no connection). Pools: one per port of both transports,
/// which is more than the rules can ever hold (a port belongs to one pool, a range is one pool),
/// so no rules file runs out of them. Backends: 65,536 rows, over three times what the
/// descriptor budget lets workers listen on. The mapping is sparse: pages no slot touched cost
/// no memory (about 52 MiB of address space, a few MiB resident for 20,000 rows).
pub const MAX_POOLS: usize = 2 * 65_535;
pub const MAX_BACKENDS: usize = 65_536;
/// Most worker processes: each has its own row of open-connection counts.
pub const MAX_WORKERS: usize = 64;

/// Process-wide figures.
#[repr(C, align(64))]
pub struct Header {
    pub workers: AtomicU64,
    pub capacity: AtomicU64,
    /// Accept errors from running out of descriptors (EMFILE/ENFILE), summed over workers.
    pub accept_pauses: AtomicU64,
    pub started_ms: AtomicU64,
    /// Connections that were open in a worker when it died (killed, crashed).
    pub lost_worker_died: AtomicU64,
    /// Access log lines lost to a full queue or a failed write.
    pub access_log_dropped: AtomicU64,
}

/// One listening address: the round-robin counter every worker draws from.
#[repr(C, align(64))]
pub struct PoolSlot {
    pub next: AtomicU64,
    /// Connections accepted on this listener.
    pub accepted: AtomicU64,
    /// Connections closed because no backend of the pool could be reached; for UDP, datagrams
    /// dropped because no session could be made for them (no backend, no socket, draining).
    pub unrouted: AtomicU64,
    /// Connections refused by the pool's access list (`allow`/`deny`, `--allow`/`--deny`).
    pub denied: AtomicU64,
    /// Connections refused because every backend held `max_conns`.
    pub full: AtomicU64,
    /// Connections refused because their client address held `max_conns_per_ip`.
    pub per_ip_full: AtomicU64,
    /// `accept_proxy` connections closed without a valid PROXY header in time.
    pub bad_header: AtomicU64,
    /// UDP sessions ended early to make room for a new one (the session table was full).
    pub evicted: AtomicU64,
    /// The pool's bandwidth limits in force, bits per second ([`crate::rate::Rates`] order; 0 =
    /// none), written by the supervisor on every apply and read by connections on every pump,
    /// so an edit reaches connections already open.
    pub rates: [AtomicU64; 6],
    /// Non-zero when any of `rates` is: the one word an unlimited connection looks at.
    pub limited: AtomicU64,
    /// The pool's own buckets (`rate_up`, `rate_down`): GCRA arrival times ([`crate::rate`]).
    pub bucket_up: AtomicU64,
    pub bucket_down: AtomicU64,
    /// Time connection directions spent held back by a limit, summed (µs).
    pub throttled_us: AtomicU64,
    /// Bytes that passed after a limit had held their direction back.
    pub throttled_bytes: AtomicU64,
    /// UDP datagrams dropped for being over a limit.
    pub rate_drops: AtomicU64,
    /// SNI pools: connections whose server name no row serves, with no default row.
    pub no_sni_route: AtomicU64,
    /// SNI pools: connections closed without a readable ClientHello in time (malformed, too
    /// long, closed early, or silent).
    pub bad_hello: AtomicU64,
}

/// One backend of one pool: traffic counters and passive/active health. How many connections
/// are open to it is counted per worker ([`Shared::open`]), so a dead worker's share can be
/// taken off.
#[repr(C, align(64))]
pub struct BackendSlot {
    pub total: AtomicU64,
    /// Connections open or connecting to it now, over every worker: the sum of the per-worker
    /// rows, kept in one place so `max_conns` can be reserved exactly with one `fetch_add`.
    pub open_now: AtomicU64,
    /// Connections that were open when their worker died.
    pub lost: AtomicU64,
    /// Bytes client -> backend.
    pub bytes_up: AtomicU64,
    /// Bytes backend -> client.
    pub bytes_down: AtomicU64,
    /// Of `bytes_up`, bytes moved with splice(2) (kernel to kernel, no copy).
    pub spliced_up: AtomicU64,
    /// Of `bytes_down`, bytes moved with splice(2).
    pub spliced_down: AtomicU64,
    /// Connections whose bytes the kernel moved (`--data-path sockmap`).
    pub in_kernel: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Unix ms until which the backend is skipped; 0 = up.
    pub down_until_ms: AtomicU64,
    /// Unix ms of the first failure of the current down period; 0 = up.
    pub down_since_ms: AtomicU64,
    /// Failures in a row, for the back-off.
    pub failures_in_row: AtomicU64,
    /// Last connect error: an errno, or [`ERR_TIMEOUT`]; 0 = none.
    pub last_error: AtomicU64,
    pub last_error_ms: AtomicU64,
    /// Unix ms of the last active health check.
    pub last_check_ms: AtomicU64,
    /// UDP datagrams client -> backend and backend -> client.
    pub datagrams_up: AtomicU64,
    pub datagrams_down: AtomicU64,
    /// UDP datagrams dropped because the socket toward the backend (up) or the client (down) had
    /// no room: a full buffer drops and counts, it never blocks a worker.
    pub drops_up: AtomicU64,
    pub drops_down: AtomicU64,
    /// Connects of a `transparent` backend that timed out (the hint about the return route is
    /// logged by whichever worker counts the [`crate::outbound::TRANSPARENT_HINT_AFTER`]th).
    pub transparent_timeouts: AtomicU64,
    /// Good checks (connects, replies, active checks) in a row since the backend went down: it
    /// is up again at [`RISE`].
    pub rise: AtomicU64,
    /// Unix ms the backend came back into service (recovered, drain lifted, added by a reload);
    /// where `slowstart` ramps from. 0 = in service since the rules were first loaded.
    pub up_since_ms: AtomicU64,
    /// 1 once a connect succeeded or a reply came back: until then its health is unknown.
    pub ever_ok: AtomicU64,
}

/// Good checks in a row that bring a down backend back (HAProxy's `rise 2`): one success after
/// a failure is not yet trusted.
pub const RISE: u64 = 2;
/// After the first good check of a down backend, how long it waits for the next one before it
/// takes connections again (the connection that made the check was served).
pub const RISE_HOLD_MS: u64 = 1000;

/// `last_error` value for a connect that did not finish in time.
pub const ERR_TIMEOUT: u64 = u64::MAX;

#[repr(C)]
struct Layout {
    header: Header,
    pools: [PoolSlot; MAX_POOLS],
    backends: [BackendSlot; MAX_BACKENDS],
    /// Per worker, per backend slot: connections open now. Only that worker writes its row.
    open: [[AtomicU64; MAX_BACKENDS]; MAX_WORKERS],
    /// Open connections per client address and pool ([`per_ip`]).
    per_ip: [AtomicU64; per_ip::TABLE_WORDS],
    /// Bandwidth buckets per client address and pool ([`crate::rate::shared`]).
    ip_buckets: [AtomicU64; crate::rate::shared::TABLE_WORDS],
}

/// The shared mapping. Created by the supervisor before it starts workers; a worker maps the
/// inherited descriptor.
pub struct Shared {
    mem: SharedMemory,
    ptr: *const Layout,
}

// SAFETY: the mapping holds only atomics, which are safe to share between threads and processes.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Makes a zeroed shared mapping backed by a memfd (zero is a valid value for every atomic).
    pub fn create() -> io::Result<Shared> {
        let shared = Self::wrap(SharedMemory::create(
            c"forwarder-stats",
            std::mem::size_of::<Layout>(),
        )?)?;
        shared.header().started_ms.store(now_ms(), Relaxed);
        Ok(shared)
    }

    /// Maps an inherited descriptor (in a worker).
    ///
    /// # Safety
    /// `raw` must be the stats memfd passed down by the supervisor, owned by this process now.
    pub unsafe fn from_inherited(raw: RawFd) -> io::Result<Shared> {
        // SAFETY: as the caller promised.
        Self::wrap(unsafe { SharedMemory::from_inherited(raw) }?)
    }

    fn wrap(mem: SharedMemory) -> io::Result<Shared> {
        if mem.len() < std::mem::size_of::<Layout>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "stats mapping of {} bytes is smaller than the {} this build needs",
                    mem.len(),
                    std::mem::size_of::<Layout>()
                ),
            ));
        }
        let ptr = mem.as_ptr().cast::<Layout>().cast_const();
        Ok(Shared { mem, ptr })
    }

    /// The descriptor to pass to a worker.
    pub fn raw_fd(&self) -> RawFd {
        self.mem.raw_fd()
    }

    pub fn header(&self) -> &Header {
        // SAFETY: ptr is a live mapping of a Layout for as long as self lives.
        unsafe { &(*self.ptr).header }
    }

    pub fn pool(&self, slot: usize) -> &PoolSlot {
        // SAFETY: as above; indexing is bounds-checked.
        unsafe { &(*self.ptr).pools[slot] }
    }

    /// The per-address bandwidth buckets (`ip_rate_up/down`).
    pub fn ip_buckets(&self) -> &[AtomicU64] {
        // SAFETY: as above.
        unsafe { &(*self.ptr).ip_buckets }
    }

    /// Publishes each pool's bandwidth limits, where its connections read them.
    pub fn publish_rates(&self, specs: &[crate::control::PoolSpec]) {
        for spec in specs {
            let slot = self.pool(spec.slot);
            let rates = spec.options.rates.as_array();
            for (word, value) in slot.rates.iter().zip(rates) {
                word.store(value, Relaxed);
            }
            slot.limited.store(spec.options.rates.any() as u64, Relaxed);
        }
    }

    pub fn backend(&self, slot: usize) -> &BackendSlot {
        // SAFETY: as above; indexing is bounds-checked.
        unsafe { &(*self.ptr).backends[slot] }
    }
}

impl Shared {
    /// Worker `worker`'s count of connections open to backend `slot`.
    pub fn open(&self, worker: usize, slot: usize) -> &AtomicU64 {
        // SAFETY: as above; indexing is bounds-checked.
        unsafe { &(*self.ptr).open[worker][slot] }
    }

    /// Connections open to backend `slot`, over every worker. Only the rows of the configured
    /// workers are read (each row is its own pages of the mapping).
    pub fn active(&self, slot: usize) -> u64 {
        let workers = (self.header().workers.load(Relaxed) as usize).clamp(1, MAX_WORKERS);
        (0..workers).map(|w| self.open(w, slot).load(Relaxed)).sum()
    }

    /// Counts a connection from `worker` to backend `slot` as open, unless the backend already
    /// holds `max_conns` (0 = no limit); false when it is full. Exact across workers: the place
    /// is taken with one `fetch_add` and given back when it overshot.
    pub fn reserve(&self, worker: usize, slot: usize, max_conns: u64) -> bool {
        let open = &self.backend(slot).open_now;
        if max_conns > 0 && open.fetch_add(1, Relaxed) >= max_conns {
            open.fetch_sub(1, Relaxed);
            return false;
        }
        if max_conns == 0 {
            open.fetch_add(1, Relaxed);
        }
        self.open(worker, slot).fetch_add(1, Relaxed);
        true
    }

    /// Counts a connection from `ip` to pool `pool` against `max_conns_per_ip`.
    pub fn admit_ip(
        &self,
        worker: usize,
        pool: usize,
        ip: std::net::IpAddr,
        max: u64,
    ) -> per_ip::Admit {
        per_ip::admit(self.per_ip(), pool, ip, max, worker)
    }

    fn per_ip(&self) -> &[AtomicU64] {
        // SAFETY: as above.
        unsafe { &(*self.ptr).per_ip }
    }

    /// Takes back a connection [`Shared::admit_ip`] counted.
    pub fn release_ip(&self, worker: usize, pool: usize, ip: std::net::IpAddr) {
        per_ip::release(self.per_ip(), pool, ip, worker)
    }

    /// Gives back a place taken with [`Shared::reserve`].
    pub fn release(&self, worker: usize, slot: usize) {
        self.backend(slot).open_now.fetch_sub(1, Relaxed);
        self.open(worker, slot).fetch_sub(1, Relaxed);
    }

    /// Takes a dead worker's open connections off every count (they are gone with it) and
    /// counts them as lost; returns how many there were. Call before a new worker takes the
    /// same index.
    pub fn forget_worker(&self, worker: usize) -> u64 {
        let mut lost = 0;
        for slot in 0..MAX_BACKENDS {
            let n = self.open(worker, slot).swap(0, Relaxed);
            if n > 0 {
                self.backend(slot).open_now.fetch_sub(n, Relaxed);
                self.backend(slot).lost.fetch_add(n, Relaxed);
                lost += n;
            }
        }
        self.header().lost_worker_died.fetch_add(lost, Relaxed);
        per_ip::forget_worker(self.per_ip(), worker);
        lost
    }
}

impl PoolSlot {
    pub fn reset(&self) {
        for a in [
            &self.next,
            &self.accepted,
            &self.unrouted,
            &self.denied,
            &self.full,
            &self.per_ip_full,
            &self.bad_header,
            &self.evicted,
            &self.limited,
            &self.bucket_up,
            &self.bucket_down,
            &self.throttled_us,
            &self.throttled_bytes,
            &self.rate_drops,
            &self.no_sni_route,
            &self.bad_hello,
        ]
        .into_iter()
        .chain(&self.rates)
        {
            a.store(0, Relaxed);
        }
    }
}

impl BackendSlot {
    /// Clears a slot before it is given to a new backend.
    pub fn reset(&self) {
        for a in [
            &self.total,
            &self.open_now,
            &self.lost,
            &self.bytes_up,
            &self.bytes_down,
            &self.spliced_up,
            &self.spliced_down,
            &self.in_kernel,
            &self.connect_failures,
            &self.transparent_timeouts,
            &self.down_until_ms,
            &self.down_since_ms,
            &self.failures_in_row,
            &self.last_error,
            &self.last_error_ms,
            &self.last_check_ms,
            &self.datagrams_up,
            &self.datagrams_down,
            &self.drops_up,
            &self.drops_down,
            &self.rise,
            &self.up_since_ms,
            &self.ever_ok,
        ] {
            a.store(0, Relaxed);
        }
    }

    /// True while the back-off after a failure has not run out.
    pub fn is_down(&self, now_ms: u64) -> bool {
        self.down_until_ms.load(Relaxed) > now_ms
    }

    /// Records a failed connect and backs the backend off (1 s, doubling to 30 s). Returns true
    /// when this call took the backend from up to down (so exactly one process logs it).
    pub fn record_failure(&self, error: u64, now_ms: u64) -> bool {
        self.connect_failures.fetch_add(1, Relaxed);
        self.rise.store(0, Relaxed);
        self.last_error.store(error, Relaxed);
        self.last_error_ms.store(now_ms, Relaxed);
        let in_row = self.failures_in_row.fetch_add(1, Relaxed) + 1;
        let backoff_ms = (1000u64 << (in_row - 1).min(5)).min(30_000);
        self.down_until_ms.store(now_ms + backoff_ms, Relaxed);
        self.down_since_ms
            .compare_exchange(0, now_ms, Relaxed, Relaxed)
            .is_ok()
    }

    /// Records a successful connect (or a reply, or a good active check). A down backend needs
    /// [`RISE`] of them in a row: after the first it is held off for [`RISE_HOLD_MS`] until the
    /// next. Returns true when this call brought the backend back up.
    pub fn record_success(&self, now_ms: u64) -> bool {
        // Loads first: this runs for every connection, and a store would dirty the line.
        if self.ever_ok.load(Relaxed) == 0 {
            self.ever_ok.store(1, Relaxed);
        }
        if self.failures_in_row.load(Relaxed) == 0 {
            return false;
        }
        if self.rise.fetch_add(1, Relaxed) + 1 < RISE {
            self.down_until_ms.store(now_ms + RISE_HOLD_MS, Relaxed);
            return false;
        }
        self.failures_in_row.store(0, Relaxed);
        self.rise.store(0, Relaxed);
        self.down_until_ms.store(0, Relaxed);
        let back = self.down_since_ms.swap(0, Relaxed) != 0;
        if back {
            self.up_since_ms.store(now_ms, Relaxed);
        }
        back
    }
}

/// Milliseconds since the Unix epoch (what the shared health fields hold).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Words for a stored connect error.
pub fn describe_error(code: u64) -> String {
    match code {
        0 => String::new(),
        ERR_TIMEOUT => "connect timed out".into(),
        errno => io::Error::from_raw_os_error(errno as i32).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_and_one_caller_sees_each_transition() {
        let shared = Shared::create().unwrap();
        let b = shared.backend(7);
        assert!(!b.is_down(1000));
        assert!(b.record_failure(111, 1000));
        assert!(!b.record_failure(111, 1500));
        assert!(
            b.is_down(2500),
            "second failure doubles the back-off to 2 s"
        );
        assert!(!b.is_down(3600));
        assert_eq!(b.connect_failures.load(Relaxed), 2);
        assert!(!b.record_success(3600), "one good check is not recovery");
        assert!(b.is_down(4000), "held until the next check");
        assert!(b.record_success(4600));
        assert_eq!(b.up_since_ms.load(Relaxed), 4600);
        assert!(!b.record_success(4700));
        assert!(!b.is_down(4700));
        // A failure between two good checks starts the count again.
        b.record_failure(111, 5000);
        b.record_success(7000);
        b.record_failure(111, 7100);
        assert!(!b.record_success(20_000));
        assert!(b.record_success(21_000));
        assert_eq!(describe_error(ERR_TIMEOUT), "connect timed out");
    }

    #[test]
    fn mapping_is_shared_with_a_second_view() {
        let shared = Shared::create().unwrap();
        // SAFETY: dup gives the second view its own descriptor.
        let dup = unsafe { libc::dup(shared.raw_fd()) };
        let view = unsafe { Shared::from_inherited(dup) }.unwrap();
        shared.pool(3).next.fetch_add(5, Relaxed);
        assert_eq!(view.pool(3).next.load(Relaxed), 5);
    }

    #[test]
    fn a_dead_workers_open_connections_are_lost_not_active() {
        let shared = Shared::create().unwrap();
        shared.header().workers.store(2, Relaxed);
        for (worker, slot, n) in [(0, 4, 3), (1, 4, 2), (1, 9, 1)] {
            for _ in 0..n {
                assert!(shared.reserve(worker, slot, 0));
            }
        }
        assert_eq!(shared.backend(4).open_now.load(Relaxed), 5);
        assert_eq!(shared.active(4), 5);
        assert_eq!(shared.forget_worker(1), 3);
        assert_eq!(shared.active(4), 3);
        assert_eq!(shared.active(9), 0);
        assert_eq!(shared.backend(4).open_now.load(Relaxed), 3);
        assert_eq!(shared.backend(4).lost.load(Relaxed), 2);
        assert_eq!(shared.header().lost_worker_died.load(Relaxed), 3);
        assert_eq!(shared.forget_worker(1), 0, "nothing is lost twice");
    }
}
