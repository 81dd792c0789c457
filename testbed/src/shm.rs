//! Memory shared between a supervisor and the worker processes it re-executes: a memfd mapped
//! read-write and shared. The supervisor creates it (inheritable, so an exec'ed worker finds it by
//! descriptor number); a worker maps the descriptor it inherited. Both see each other's writes at
//! once, and what a worker wrote survives its death.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One shared mapping of a whole memfd.
pub struct SharedMemory {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the type only hands out a raw pointer; what is stored there (atomics) decides how it is
// accessed, and the mapping stays valid until Drop.
unsafe impl Send for SharedMemory {}
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// A zeroed mapping of `len` bytes in a new memfd named `name` (shown in /proc/PID/fd). The
    /// descriptor is left inheritable on purpose: exec'ed workers map it.
    pub fn create(name: &CStr, len: usize) -> io::Result<SharedMemory> {
        // SAFETY: a valid C string and no flags (no MFD_CLOEXEC, see above).
        let raw = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd; a fresh memfd reads as zeros.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, len)
    }

    /// Maps the whole file behind the inherited descriptor `raw` (in a worker), and marks the
    /// descriptor close-on-exec so that nothing the worker might run inherits it in turn.
    ///
    /// # Safety
    /// `raw` must be an open descriptor that nothing else in this process owns; it is owned (and
    /// closed) by the returned value.
    pub unsafe fn from_inherited(raw: RawFd) -> io::Result<SharedMemory> {
        // SAFETY: the caller hands us ownership of `raw`.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fstat into a struct we own; fails cleanly on a bad descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Self::map(fd, st.st_size as usize)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<SharedMemory> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "descriptor {} is an empty file, not a shared mapping",
                    fd.as_raw_fd()
                ),
            ));
        }
        // SAFETY: a shared read-write mapping of a file of exactly `len` bytes.
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
        Ok(SharedMemory {
            fd,
            ptr: ptr.cast(),
            len,
        })
    }

    /// Start of the mapping: page-aligned, `len()` bytes, valid while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor to pass to a worker.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped; borrowers cannot outlive self.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn a_second_mapping_of_the_descriptor_sees_the_writes() {
        let a = SharedMemory::create(c"shm-test", 4096).unwrap();
        // SAFETY: a dup of our own descriptor, owned by `b` from here on.
        let b = unsafe { SharedMemory::from_inherited(libc::dup(a.raw_fd())) }.unwrap();
        assert_eq!(b.len(), 4096);
        // SAFETY: both mappings are page-aligned and at least 8 bytes long.
        let (wa, wb) = unsafe {
            (
                &*(a.as_ptr().cast::<AtomicU64>().add(3)),
                &*(b.as_ptr().cast::<AtomicU64>().add(3)),
            )
        };
        assert_eq!(wa.load(Ordering::Relaxed), 0);
        wb.store(42, Ordering::Relaxed);
        assert_eq!(wa.load(Ordering::Relaxed), 42);
    }

    #[test]
    fn a_descriptor_that_is_not_a_mapping_is_refused() {
        // SAFETY: pipe2 fills two descriptors we own; the read end goes to from_inherited.
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let err = unsafe { SharedMemory::from_inherited(fds[0]) }
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a shared mapping"), "{err}");
        // SAFETY: closing the write end we still own.
        unsafe { libc::close(fds[1]) };
    }
}
