//! `--data-path auto`: which of copying and splice(2) moves a bulk stream for less CPU on this
//! host, measured once at start on a loopback pair (source → relay → sink, the relay doing what a
//! worker does with a bulk direction), a few megabytes each way round, bounded in bytes and time.
//!
//! Why once at start and not per connection: the cost per byte depends on the CPU, the kernel and
//! the buffer sizes, not on the connection, and a per-connection choice would need a CPU clock
//! read per event and connections that try the slower path to learn it is slower.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::tcp::buffers::{Pipe, BULK_BUFFER_BYTES};

/// Bytes relayed per trial: enough for hundreds of reads of a bulk buffer, little enough that
/// the whole calibration takes milliseconds.
const TRIAL_BYTES: usize = 4 << 20;
/// Trials per path, alternating copy and splice; the cheapest of each counts (the least
/// disturbed by whatever else the machine runs).
const ROUNDS: usize = 3;
/// Calibration gives up past this (a machine so loaded that the figures would mean little).
const LIMIT: Duration = Duration::from_millis(1500);
/// Splice must beat copying by this much to be chosen: copying holds no pipe descriptors and
/// no per-user pipe memory, so a tie goes to it.
const SPLICE_MARGIN: f64 = 0.05;

/// What the calibration measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// CPU of the relaying thread per GB moved by copying (read/write of a bulk buffer).
    pub copy_ms_per_gb: f64,
    /// The same through a pipe with splice(2).
    pub splice_ms_per_gb: f64,
    /// Wall time the calibration took.
    pub elapsed: Duration,
}

impl Calibration {
    /// Whether splice is cheaper by more than the margin.
    pub fn splice_wins(&self) -> bool {
        self.splice_ms_per_gb < self.copy_ms_per_gb * (1.0 - SPLICE_MARGIN)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Copy,
    Splice,
}

/// Measures both paths. Fails when a socket or pipe cannot be made or the machine is too busy
/// to finish within [`LIMIT`]; the caller then copies.
pub fn run() -> io::Result<Calibration> {
    let started = Instant::now();
    let deadline = started + LIMIT;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let source = TcpStream::connect(addr)?;
    let (relay_in, _) = listener.accept()?;
    let relay_out = TcpStream::connect(addr)?;
    let (sink, _) = listener.accept()?;
    drop(listener);
    for s in [&source, &sink] {
        s.set_read_timeout(Some(LIMIT))?;
        s.set_write_timeout(Some(LIMIT))?;
    }
    relay_in.set_nonblocking(true)?;
    relay_out.set_nonblocking(true)?;
    let pipe = Pipe::new()?;

    let total = TRIAL_BYTES * ROUNDS * 2;
    let feeder = std::thread::Builder::new()
        .name("calibrate-src".into())
        .spawn(move || feed(source, total))?;
    let drainer = std::thread::Builder::new()
        .name("calibrate-sink".into())
        .spawn(move || drain(sink))?;

    let mut best = [f64::INFINITY; 2];
    let mut result = Ok(());
    'rounds: for round in 0..ROUNDS {
        // Alternate which goes first, so neither always meets a warmer cache.
        let order = if round % 2 == 0 {
            [Mode::Copy, Mode::Splice]
        } else {
            [Mode::Splice, Mode::Copy]
        };
        for mode in order {
            let cpu = thread_cpu();
            if let Err(e) = relay(&relay_in, &relay_out, &pipe, mode, deadline) {
                result = Err(e);
                break 'rounds;
            }
            let ns = thread_cpu().saturating_sub(cpu).as_nanos() as f64;
            let ms_per_gb = ns / 1e6 * (1e9 / TRIAL_BYTES as f64);
            let slot = &mut best[(mode == Mode::Splice) as usize];
            *slot = slot.min(ms_per_gb);
        }
    }
    // Closing the relay's sockets ends both helper threads (EOF for the sink, EPIPE for the
    // source if it is still writing after a failure).
    drop(relay_in);
    drop(relay_out);
    let _ = feeder.join();
    let _ = drainer.join();
    result?;
    Ok(Calibration {
        copy_ms_per_gb: best[0],
        splice_ms_per_gb: best[1],
        elapsed: started.elapsed(),
    })
}

/// Moves exactly [`TRIAL_BYTES`] from `src` to `dst` the way `mode` does.
fn relay(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    mode: Mode,
    deadline: Instant,
) -> io::Result<()> {
    let mut left = TRIAL_BYTES;
    let mut buf = vec![0u8; BULK_BUFFER_BYTES];
    let (mut src_r, mut dst_w) = (src, dst);
    while left > 0 {
        let want = left.min(match mode {
            Mode::Copy => buf.len(),
            Mode::Splice => pipe.capacity(),
        });
        let got = match mode {
            Mode::Copy => src_r.read(&mut buf[..want]),
            Mode::Splice => pipe.fill_from(src.as_raw_fd(), want),
        };
        let n = match got {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(src.as_raw_fd(), libc::POLLIN, deadline)?;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            let put = match mode {
                Mode::Copy => dst_w.write(&buf[sent..n]),
                Mode::Splice => pipe.drain_to(dst.as_raw_fd(), n - sent),
            };
            match put {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(dst.as_raw_fd(), libc::POLLOUT, deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        left -= n;
    }
    Ok(())
}

/// Waits until `fd` is ready for `events` or the deadline passes (then `TimedOut`).
fn wait(fd: RawFd, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("took longer than {} ms", LIMIT.as_millis()),
        ));
    }
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one pollfd we own, count 1.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn feed(mut source: TcpStream, total: usize) {
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        match source.write(&chunk[..left.min(chunk.len())]) {
            Ok(n) => left -= n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn drain(mut sink: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match sink.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_both_paths_within_the_limit() {
        let c = run().expect("calibration on loopback");
        assert!(
            c.copy_ms_per_gb.is_finite() && c.copy_ms_per_gb > 0.0,
            "{c:?}"
        );
        assert!(
            c.splice_ms_per_gb.is_finite() && c.splice_ms_per_gb > 0.0,
            "{c:?}"
        );
        assert!(c.elapsed <= LIMIT + Duration::from_millis(500), "{c:?}");
    }

    #[test]
    fn a_tie_goes_to_copying() {
        let c = |copy, splice| Calibration {
            copy_ms_per_gb: copy,
            splice_ms_per_gb: splice,
            elapsed: Duration::ZERO,
        };
        assert!(!c(100.0, 100.0).splice_wins());
        assert!(!c(100.0, 96.0).splice_wins());
        assert!(c(100.0, 90.0).splice_wins());
        assert!(!c(90.0, 100.0).splice_wins());
    }
}
