//! Counters shared between the supervisor and its workers through one memfd mapping made before
//! the workers start. A worker stores its counters there after every event-loop turn (plain
//! atomic stores, no system call), so the supervisor reads exact, current numbers at any moment,
//! and a worker killed with SIGKILL loses nothing it had finished counting.
//!
//! Layout: one slot of [`SLOT_WORDS`] `u64` words per worker: word 0 the worker's pid once it
//! listens (0 before), then the [`WorkerCounters`] fields in [`WorkerCounters::to_words`] order.
//! A slot's counters are cumulative over every process that ran in it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::stats::{WorkerCounters, COUNTER_WORDS};

/// Words per slot: the pid, the counters, and room to add counters without changing the layout.
pub const SLOT_WORDS: usize = 16;
const _: () = assert!(COUNTER_WORDS < SLOT_WORDS);

/// A shared mapping of counter slots.
pub struct SharedStats {
    fd: OwnedFd,
    base: *mut AtomicU64,
    slots: usize,
}

// SAFETY: the mapping is only accessed through AtomicU64, which is Sync; the pointer stays valid
// until Drop unmaps it.
unsafe impl Send for SharedStats {}
unsafe impl Sync for SharedStats {}

impl SharedStats {
    /// Creates the mapping (supervisor). The descriptor is inheritable on purpose: workers are
    /// exec'ed children and find it by number (`--stats-fd`).
    pub fn create(slots: usize) -> io::Result<SharedStats> {
        let name = c"ssl-echo-server-stats";
        // SAFETY: memfd_create with a valid C string and no flags (no MFD_CLOEXEC, see above).
        let raw = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = slots * SLOT_WORDS * 8;
        // SAFETY: ftruncate on our memfd; a fresh memfd reads as zeros.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, slots)
    }

    /// Maps the supervisor's memfd, inherited as descriptor `raw` (worker).
    pub fn open(raw: RawFd) -> io::Result<SharedStats> {
        // SAFETY: fstat into a struct we own; fails cleanly on a bad descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(raw, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let slots = st.st_size as usize / (SLOT_WORDS * 8);
        if slots == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {raw} is not a stats mapping"),
            ));
        }
        // SAFETY: the descriptor was inherited for us and nothing else in this process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Workers must not pass it on.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Self::map(fd, slots)
    }

    fn map(fd: OwnedFd, slots: usize) -> io::Result<SharedStats> {
        let len = slots * SLOT_WORDS * 8;
        // SAFETY: shared read-write mapping of a file at least `len` bytes long.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedStats {
            fd,
            base: ptr.cast(),
            slots,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    fn word(&self, slot: usize, word: usize) -> &AtomicU64 {
        assert!(
            slot < self.slots && word < SLOT_WORDS,
            "slot {slot} word {word}"
        );
        // SAFETY: in bounds (checked above) of a live, 8-byte aligned (page-aligned base) mapping.
        unsafe { &*self.base.add(slot * SLOT_WORDS + word) }
    }

    /// The pid the worker in `slot` stored once listening; 0 before.
    pub fn pid(&self, slot: usize) -> u64 {
        self.word(slot, 0).load(Ordering::Acquire)
    }

    pub fn set_pid(&self, slot: usize, pid: u64) {
        self.word(slot, 0).store(pid, Ordering::Release);
    }

    pub fn read(&self, slot: usize) -> WorkerCounters {
        let mut words = [0u64; COUNTER_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.word(slot, 1 + i).load(Ordering::Relaxed);
        }
        WorkerCounters::from_words(words)
    }

    pub fn write(&self, slot: usize, counters: &WorkerCounters) {
        for (i, w) in counters.to_words().into_iter().enumerate() {
            self.word(slot, 1 + i).store(w, Ordering::Relaxed);
        }
    }

    /// After a worker died: it holds no connections any more, and the next one is not ready yet.
    pub fn clear_dead(&self, slot: usize) {
        let mut c = self.read(slot);
        c.connections_now = 0;
        self.write(slot, &c);
        self.set_pid(slot, 0);
    }
}

impl Drop for SharedStats {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped; no references outlive self.
        unsafe {
            libc::munmap(self.base.cast(), self.slots * SLOT_WORDS * 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_mapping_of_the_same_memfd_sees_the_writes() {
        let a = SharedStats::create(3).unwrap();
        // SAFETY: dup of our own descriptor, handed to open() which takes ownership.
        let dup = unsafe { libc::dup(a.raw_fd()) };
        let b = SharedStats::open(dup).unwrap();
        assert_eq!(b.slots(), 3);
        let c = WorkerCounters {
            connections_now: 4,
            connections_total: 9,
            bytes_echoed: 1 << 40,
            ..Default::default()
        };
        b.write(2, &c);
        b.set_pid(2, 1234);
        assert_eq!(a.read(2), c);
        assert_eq!(a.pid(2), 1234);
        assert_eq!(a.read(0), WorkerCounters::default());
        a.clear_dead(2);
        assert_eq!(b.read(2).connections_now, 0);
        assert_eq!(b.read(2).connections_total, 9);
        assert_eq!(b.pid(2), 0);
    }
}
