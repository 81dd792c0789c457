//! The kernel phase of a relay (`--data-path sockmap`): handing an established pair to the
//! worker's sockmap, then watching both directions through the sockets' counters
//! ([`KernelDirection`]: `TCP_INFO`, `SIOCOUTQ`), counting what passed and passing each FIN on
//! once everything before it is in the sink's send queue. The relay never reads these bytes.

use crate::rate::throttle::Throttle;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use mio::net::TcpStream;

use crate::tcp::direction::PumpError;
use crate::tcp::relay::{Context, Ending, Next, Phase, Relay, Side};
use crate::tcp::sockmap;
use crate::tokens;

/// First wait before looking again at a FIN whose bytes the kernel is still passing on; doubled
/// on each look up to [`FIN_POLL_MAX`] (a stalled sink may hold them for long).
const FIN_POLL_FIRST: Duration = Duration::from_millis(1);
const FIN_POLL_MAX: Duration = Duration::from_millis(100);

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

// ---- the relay's kernel phase ------------------------------------------------------------------

impl Relay {
    /// With the sockmap data path: writes the PROXY header (taking it out of `header`) and puts
    /// the pair into the worker's map, so the kernel moves their bytes. Gives the backend back
    /// when the pair cannot join (no map, or a socket already past ESTABLISHED): the relay then
    /// moves the bytes itself, and nothing was read or lost.
    pub(super) fn hand_to_kernel(
        &mut self,
        mut backend: TcpStream,
        header: &mut Option<Vec<u8>>,
        ctx: &mut Context,
    ) -> Result<Next, TcpStream> {
        let Some(map) = ctx.res.sockmap.as_ref() else {
            return Err(backend);
        };
        if self.pool.spec.options.rates.any()
            || Throttle::pool_limited(ctx.shared, self.pool.spec.slot)
        {
            // The kernel's verdict program cannot hold bytes back: limits are kept in user space.
            return Err(backend);
        }
        let mut header_sent = 0;
        if let Some(bytes) = header.take() {
            // A fresh connection's send buffer takes a PROXY header (at most 232 bytes) whole.
            match backend.write(&bytes) {
                Ok(n) if n == bytes.len() => header_sent = n as u64,
                Ok(_) => {
                    let short = io::Error::new(io::ErrorKind::WriteZero, "PROXY header cut short");
                    return Ok(Next::Close(Ending::Failed(PumpError::Write(short))));
                }
                Err(e) => return Ok(Next::Close(Ending::Failed(PumpError::Write(e)))),
            }
        }
        if self.header_read_bytes > 0 && queued_to_read(&self.client) != Some(0) {
            // The kernel hands the verdict whole skbs and ignores what was read of one: the
            // PROXY header we took would go out again with the bytes that shared its skb.
            tracing::debug!(
                id = self.id,
                "bytes came with the PROXY header; relaying in user space"
            );
            return Err(backend);
        }
        let joined = match map.join(self.client.as_raw_fd(), backend.as_raw_fd()) {
            Ok(joined) => joined,
            Err(e) => {
                tracing::debug!(
                    id = self.id,
                    "not joining the sockmap ({e}); relaying in user space"
                );
                return Err(backend);
            }
        };
        for (socket, token) in [
            (self.client.as_raw_fd(), tokens::client(self.key)),
            (backend.as_raw_fd(), tokens::backend(self.key)),
        ] {
            if let Err(e) = sockmap::watch_hangups_only(ctx.registry, socket, token) {
                // Still registered for everything: spurious wake-ups only, bytes still move.
                tracing::debug!(id = self.id, "re-arming for hang-ups only: {e}");
            }
        }
        ctx.shared
            .backend(self.backend_slot())
            .in_kernel
            .fetch_add(1, Relaxed);
        self.phase = Phase::InKernel {
            backend,
            joined,
            // Sequence numbers already queued on each sink: the SYN of the connect we made
            // (acknowledged by the backend's SYN-ACK; an accepted socket counts none), and the
            // PROXY header written above.
            up: KernelDirection::new(self.header_read_bytes, 1 + header_sent),
            down: KernelDirection::new(0, 0),
            fin_poll: FIN_POLL_FIRST,
            fin_due: None,
        };
        // A FIN (or everything) may have come already; no event would say so again.
        Ok(self.watch_kernel(ctx))
    }

    /// In the kernel: after a hang-up, an error or a FIN timer, looks at both directions,
    /// counts what passed, and passes on FINs whose bytes have left.
    pub(super) fn watch_kernel(&mut self, ctx: &mut Context) -> Next {
        let fin_waiting = match self.count_kernel(true, ctx) {
            Ok(waiting) => waiting,
            Err(e) => return Next::Close(Ending::Failed(e)),
        };
        if self.first_fin.is_none() {
            let (client, backend) = self.source_done();
            if client {
                self.first_fin = Some(Side::Client);
            } else if backend {
                self.first_fin = Some(Side::Backend);
            }
        }
        let Phase::InKernel {
            up,
            down,
            fin_poll,
            fin_due,
            ..
        } = &mut self.phase
        else {
            return Next::Wait;
        };
        if up.finished() && down.finished() {
            return Next::Close(Ending::Finished);
        }
        match fin_due {
            // A look is already due later: its timer will come.
            Some(due) if *due > ctx.now && fin_waiting => Next::Wait,
            _ if fin_waiting => {
                let due = ctx.now + *fin_poll;
                *fin_poll = (*fin_poll * 2).min(FIN_POLL_MAX);
                *fin_due = Some(due);
                Next::Timer(due)
            }
            _ => {
                *fin_due = None;
                Next::Wait
            }
        }
    }

    /// Steps both kernel directions (passing FINs on unless closing) and adds what they passed
    /// to the backend's counters. Returns whether a FIN waits for bytes still in flight.
    pub(super) fn count_kernel(
        &mut self,
        pass_fin: bool,
        ctx: &mut Context,
    ) -> Result<bool, PumpError> {
        let slot = ctx.shared.backend(self.backend_slot());
        let Phase::InKernel {
            backend, up, down, ..
        } = &mut self.phase
        else {
            return Ok(false);
        };
        let mut waiting = false;
        let up_step = up.step(&self.client, backend, pass_fin);
        if let Ok(p) = &up_step {
            slot.bytes_up.fetch_add(p.moved, Relaxed);
            waiting |= p.fin_waiting;
        }
        let down_step = down.step(backend, &self.client, pass_fin);
        if let Ok(p) = &down_step {
            slot.bytes_down.fetch_add(p.moved, Relaxed);
            waiting |= p.fin_waiting;
        }
        up_step.and(down_step).map(|_| waiting)
    }
}

/// Bytes waiting in the socket's receive queue (`FIONREAD`); None if it cannot be asked.
fn queued_to_read(stream: &TcpStream) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int.
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    (r == 0).then_some(n.max(0) as usize)
}
