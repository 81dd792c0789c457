//! The data path's reusable resources: copy buffers and kernel pipes for `splice(2)`. A
//! connection holds one only while bytes are in flight, so idle connections cost neither memory
//! nor descriptors, and per-user pipe memory (capped by the kernel) is shared out sparingly.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Copy buffer size: one read of a typical burst; a read that fills it marks the direction bulk.
pub const BUFFER_BYTES: usize = 16 * 1024;

/// Copy buffer size for a direction that is bulk: one read and one write per 256 KiB rather than
/// per 16 KiB (as large as a splice pipe, so copying makes no more system calls than splicing).
pub const BULK_BUFFER_BYTES: usize = 256 * 1024;

/// Bulk buffers kept free for reuse (the rest are freed: a worker that moved many streams at
/// once does not keep their memory).
const BULK_KEPT: usize = 8;

/// Kernel pipe capacity asked for when splicing: fewer, larger splices per megabyte. The kernel
/// may refuse (per-user pipe memory is capped); the pipe then keeps its default 64 KiB.
pub const PIPE_BYTES: usize = 256 * 1024;

/// Free copy buffers, kept up to a small number so a burst does not allocate every time; and the
/// large buffers of bulk directions, at most `bulk_limit` in use at once.
pub struct BufferPool {
    free: Vec<Box<[u8]>>,
    keep: usize,
    free_bulk: Vec<Box<[u8]>>,
    bulk_in_use: usize,
    bulk_limit: usize,
}

impl BufferPool {
    pub fn new(keep: usize, bulk_limit: usize) -> Self {
        BufferPool {
            free: Vec::new(),
            keep,
            free_bulk: Vec::new(),
            bulk_in_use: 0,
            bulk_limit,
        }
    }

    pub fn take(&mut self) -> Box<[u8]> {
        self.free
            .pop()
            .unwrap_or_else(|| vec![0u8; BUFFER_BYTES].into_boxed_slice())
    }

    /// A bulk buffer, or a small one when `bulk_limit` are in use.
    pub fn take_bulk(&mut self) -> Box<[u8]> {
        if self.bulk_in_use >= self.bulk_limit {
            return self.take();
        }
        self.bulk_in_use += 1;
        self.free_bulk
            .pop()
            .unwrap_or_else(|| vec![0u8; BULK_BUFFER_BYTES].into_boxed_slice())
    }

    /// Takes back a buffer of either size (its length says which).
    pub fn give(&mut self, buf: Box<[u8]>) {
        if buf.len() == BULK_BUFFER_BYTES {
            self.bulk_in_use -= 1;
            if self.free_bulk.len() < BULK_KEPT {
                self.free_bulk.push(buf);
            }
        } else if self.free.len() < self.keep {
            self.free.push(buf);
        }
    }

    /// Bulk buffers in use now.
    pub fn bulk_in_use(&self) -> usize {
        self.bulk_in_use
    }
}

/// A pipe's two ends.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills the two descriptors on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and ours.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on our own pipe; returns the new size or -1.
        let resized = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        let capacity = if resized > 0 {
            resized as usize
        } else {
            64 * 1024
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Bytes the pipe holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `len` bytes from socket `from` into the pipe. `Ok(0)` is EOF on the socket.
    pub fn fill_from(&self, from: RawFd, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into socket `to`.
    pub fn drain_to(&self, to: RawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to, len)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between descriptors we hold; null offsets as both are not seekable files.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Pipes for splicing, at most `limit` in use at once; beyond that (or when the kernel refuses a
/// pipe) a direction falls back to copying, which is always correct.
pub struct PipePool {
    free: Vec<Pipe>,
    in_use: usize,
    limit: usize,
    refused: bool,
}

impl PipePool {
    pub fn new(limit: usize) -> Self {
        PipePool {
            free: Vec::new(),
            in_use: 0,
            limit,
            refused: false,
        }
    }

    /// Descriptors this pool may hold at most (for the capacity plan).
    pub fn max_descriptors(&self) -> usize {
        self.limit * 2
    }

    pub fn take(&mut self) -> Option<Pipe> {
        if self.in_use >= self.limit {
            return None;
        }
        let pipe = match self.free.pop() {
            Some(p) => p,
            None => match Pipe::new() {
                Ok(p) => p,
                Err(e) => {
                    if !self.refused {
                        tracing::warn!("cannot create a pipe for splicing ({e}); copying instead");
                        self.refused = true;
                    }
                    return None;
                }
            },
        };
        self.in_use += 1;
        Some(pipe)
    }

    /// Returns an empty pipe. A pipe that still holds bytes must be dropped instead (its bytes
    /// belong to a connection that is going away).
    pub fn give(&mut self, pipe: Pipe) {
        self.in_use -= 1;
        self.free.push(pipe);
    }

    pub fn discard(&mut self, pipe: Pipe) {
        self.in_use -= 1;
        drop(pipe);
    }
}
