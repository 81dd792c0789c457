//! One direction of a connection whose bytes the kernel moves (the sockmap data path): we never
//! read its bytes, only the sockets' counters (`TCP_INFO`, `SIOCOUTQ`), to count what passed and
//! to pass the FIN on once everything before it is in the sink's send queue.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};

use mio::net::TcpStream;

use crate::tcp::direction::PumpError;

/// `tcpi_state` values (include/net/tcp_states.h) in which the peer's FIN has arrived (and its
/// sequence number is in `tcpi_bytes_received`): TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING.
/// CLOSE also follows a reset, when there was no FIN; the count is then one short, and the
/// connection is being reset anyway.
const FIN_STATES: [u8; 5] = [6, 7, 8, 9, 11];

/// What the kernel says about one socket, from one `TCP_INFO` snapshot.
#[derive(Debug, Clone, Copy)]
pub struct SocketCounts {
    /// The peer's FIN has arrived.
    pub fin_received: bool,
    /// Data bytes received from the peer (`tcpi_bytes_received`, less the FIN's sequence number).
    pub bytes_received: u64,
    /// Sequence numbers the peer acknowledged (`tcpi_bytes_acked`: data, and our SYN when we
    /// connected, and our FIN).
    pub bytes_acked: u64,
    /// Milliseconds since data last arrived (`tcpi_last_data_recv`).
    pub last_data_recv_ms: u32,
}

/// Reads `TCP_INFO`. Offsets are those of `struct tcp_info` (linux/tcp.h), stable since 4.x:
/// state at 0, `tcpi_last_data_recv` at 52, `tcpi_bytes_acked` at 120, `tcpi_bytes_received`
/// at 128.
pub fn socket_counts(socket: RawFd) -> io::Result<SocketCounts> {
    let mut bytes = [0u8; 240];
    let mut len = bytes.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `bytes`.
    let r = unsafe {
        libc::getsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            bytes.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < 136 {
        return Err(io::Error::other(
            "tcp_info too short: kernel older than 4.1",
        ));
    }
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    let fin_received = FIN_STATES.contains(&bytes[0]);
    Ok(SocketCounts {
        fin_received,
        bytes_received: u64_at(128).saturating_sub(fin_received as u64),
        bytes_acked: u64_at(120),
        last_data_recv_ms: u32_at(52),
    })
}

/// Sequence numbers ever queued to send on `socket`: what the peer acknowledged plus what is still
/// in the send queue (`SIOCOUTQ`). Read in that order, an ACK arriving in between moves bytes
/// from the queue to the acknowledged count after the count was read, so the sum can come out
/// short, never long: a FIN passed on because of it never overtakes a byte.
fn ever_queued(socket: RawFd) -> io::Result<u64> {
    let acked = socket_counts(socket)?.bytes_acked;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int.
    if unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + queued.max(0) as u64)
}

/// What one look at a kernel direction found.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelProgress {
    /// Bytes newly counted as passed.
    pub moved: u64,
    /// The source's FIN arrived but bytes before it are still on their way: look again soon
    /// (no event will say when they are through).
    pub fin_waiting: bool,
}

/// One direction (client→backend or backend→client) moved by the kernel.
#[derive(Debug)]
pub struct KernelDirection {
    /// Bytes of the source that we read ourselves before the kernel took over (a PROXY header),
    /// which are not this direction's traffic.
    base: u64,
    /// [`ever_queued`] on the sink before the kernel took over: its SYN if we connected it, a
    /// PROXY header we wrote.
    sink_base: u64,
    /// Bytes counted as passed so far.
    bytes: u64,
    /// The source's FIN has arrived.
    source_fin: bool,
    /// The FIN has been passed on to the sink.
    write_shut: bool,
}

impl KernelDirection {
    pub fn new(base: u64, sink_base: u64) -> Self {
        KernelDirection {
            base,
            sink_base,
            bytes: 0,
            source_fin: false,
            write_shut: false,
        }
    }

    /// Looks at the source: counts the bytes it received, and once its FIN arrived and every
    /// byte before it is in the sink's send queue, passes the FIN on with `shutdown(Write)`.
    /// (Redirected bytes wait in the sink's psock queue until its worker sends them; a FIN sent
    /// earlier would make those sends fail with EPIPE.)
    /// With `pass_fin` false (the connection is closing) it only counts.
    pub fn step(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        pass_fin: bool,
    ) -> Result<KernelProgress, PumpError> {
        match src.take_error() {
            Ok(Some(e)) | Err(e) => return Err(PumpError::Read(e)),
            Ok(None) => {}
        }
        let counts = socket_counts(src.as_raw_fd()).map_err(PumpError::Read)?;
        let mut progress = KernelProgress::default();
        let passed = counts.bytes_received.saturating_sub(self.base);
        if passed > self.bytes {
            progress.moved = passed - self.bytes;
            self.bytes = passed;
        }
        self.source_fin |= counts.fin_received;
        if pass_fin && self.source_fin && !self.write_shut {
            let queued = ever_queued(dst.as_raw_fd()).map_err(PumpError::Write)?;
            if queued.saturating_sub(self.sink_base) >= passed {
                // NotConnected: the sink is gone already; its own direction will say so.
                let _ = dst.shutdown(Shutdown::Write);
                self.write_shut = true;
            } else {
                progress.fin_waiting = true;
            }
        }
        Ok(progress)
    }

    /// True once the FIN has been passed on.
    pub fn finished(&self) -> bool {
        self.write_shut
    }

    /// True once the source has sent its FIN.
    pub fn source_done(&self) -> bool {
        self.source_fin
    }

    /// Bytes passed so far, as last counted.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}
