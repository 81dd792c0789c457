//! Counters shared between the supervisor and its workers through one memfd mapping made before
//! the workers start. A worker stores its counters there after every event-loop turn (plain
//! atomic stores, no system call), so the supervisor reads exact, current numbers at any moment,
//! and a worker killed with SIGKILL loses nothing it had finished counting.
//!
//! Layout: one slot of [`SLOT_WORDS`] `u64` words per worker: word 0 the worker's pid once it
//! listens (0 before), then the [`WorkerCounters`] fields in [`WorkerCounters::to_words`] order.
//! A slot's counters are cumulative over every process that ran in it.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use testbed::shm::SharedMemory;

use crate::stats::{WorkerCounters, COUNTER_WORDS};

/// Words per slot: the pid, the counters, and room to add counters without changing the layout.
pub const SLOT_WORDS: usize = 16;
const _: () = assert!(COUNTER_WORDS < SLOT_WORDS);

/// A shared mapping of counter slots.
pub struct SharedStats {
    mem: SharedMemory,
    base: *const AtomicU64,
    slots: usize,
}

// SAFETY: the mapping is only accessed through AtomicU64, which is Sync; the pointer stays valid
// as long as `mem` lives.
unsafe impl Send for SharedStats {}
unsafe impl Sync for SharedStats {}

impl SharedStats {
    /// Creates the mapping (supervisor). Workers are exec'ed children and find its descriptor by
    /// number (`--stats-fd`).
    pub fn create(slots: usize) -> io::Result<SharedStats> {
        let mem = SharedMemory::create(c"ssl-echo-server-stats", slots * SLOT_WORDS * 8)?;
        Self::wrap(mem)
    }

    /// Maps the supervisor's memfd, inherited as descriptor `raw` (worker).
    ///
    /// # Safety
    /// `raw` must be the inherited stats descriptor, owned by nothing else in this process.
    pub unsafe fn open(raw: RawFd) -> io::Result<SharedStats> {
        // SAFETY: as the caller promised.
        Self::wrap(unsafe { SharedMemory::from_inherited(raw) }?)
    }

    fn wrap(mem: SharedMemory) -> io::Result<SharedStats> {
        let slots = mem.len() / (SLOT_WORDS * 8);
        if slots == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {} is not a stats mapping", mem.raw_fd()),
            ));
        }
        let base = mem.as_ptr().cast::<AtomicU64>().cast_const();
        Ok(SharedStats { mem, base, slots })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.mem.raw_fd()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_mapping_of_the_same_memfd_sees_the_writes() {
        let a = SharedStats::create(3).unwrap();
        // SAFETY: a dup of our own descriptor, owned by `b` from here on.
        let b = unsafe { SharedStats::open(libc::dup(a.raw_fd())) }.unwrap();
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
