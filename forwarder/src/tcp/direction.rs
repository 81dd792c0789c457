//! One direction of a forwarded connection (client→backend or backend→client): moves bytes until
//! the source would block or the sink is full, holding at most one buffer or pipe of bytes in
//! flight (backpressure: a slow reader stops us reading from the fast writer). A FIN is passed on
//! as `shutdown(Write)` once the bytes before it are delivered; the other direction keeps flowing.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;

use mio::net::TcpStream;

use crate::tcp::buffers::{BufferPool, Pipe, PipePool, BULK_BUFFER_BYTES};
use crate::tcp::sockmap::Sockmap;

/// Most bytes one direction moves per event before yielding to other connections.
pub const FAIR_SHARE_BYTES: u64 = 1 << 20;

/// The reusable resources a direction borrows while it has bytes in flight.
pub struct Resources {
    pub buffers: BufferPool,
    pub pipes: PipePool,
    /// Whether bulk transfers may use splice(2).
    pub splice: bool,
    /// `--data-path sockmap`, when the verdict program loaded: established connections are
    /// handed to the kernel.
    pub sockmap: Option<Sockmap>,
}

/// Bytes read from the source and not yet written to the sink.
enum InFlight {
    Nothing,
    Buffer {
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    },
    Pipe {
        pipe: Pipe,
        len: usize,
    },
}

/// What a pump achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes delivered to the sink.
    pub moved: u64,
    /// Of those, bytes that went through a pipe with splice(2) rather than a copy.
    pub spliced: u64,
    /// Stopped at the fair share with more to do: pump again without waiting for an event.
    pub yielded: bool,
    /// Bytes read from the source (what a bandwidth limit is charged).
    pub read: u64,
    /// Stopped at the read budget (a bandwidth limit) before the source ran dry.
    pub throttled: bool,
}

/// Why a direction failed; the connection is then reset on both sides.
#[derive(Debug)]
pub enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// One direction of a connection (client→backend or backend→client).
pub struct Direction {
    in_flight: InFlight,
    /// The source has sent its FIN.
    read_eof: bool,
    /// The FIN has been passed on to the sink.
    write_shut: bool,
    /// Bytes delivered to the sink.
    bytes: u64,
    /// Reads have filled whole buffers: move bytes with splice from now on.
    bulk: bool,
    /// The source reported closing or an error: read until EAGAIN or EOF from now on. Its FIN
    /// raises no further edge, and the event that reported it may have come while the sink was
    /// full, so no read happened then.
    source_closing: bool,
}

impl Default for Direction {
    fn default() -> Self {
        Direction {
            in_flight: InFlight::Nothing,
            read_eof: false,
            write_shut: false,
            bytes: 0,
            bulk: false,
            source_closing: false,
        }
    }
}

impl Direction {
    /// True while bytes read from the source wait for room in the sink.
    pub fn holds_bytes(&self) -> bool {
        match &self.in_flight {
            InFlight::Nothing => false,
            InFlight::Buffer { start, end, .. } => start < end,
            InFlight::Pipe { len, .. } => *len > 0,
        }
    }

    /// True once the FIN has been passed on and nothing is left to deliver.
    pub fn finished(&self) -> bool {
        self.write_shut
    }

    /// True once the source has sent its FIN (it may not be delivered yet).
    pub fn source_done(&self) -> bool {
        self.read_eof
    }

    /// Bytes delivered to the sink so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The source socket reported a hang-up or an error: never again stop at a short read.
    pub fn source_closing(&mut self) {
        self.source_closing = true;
    }

    /// Moves bytes from `src` to `dst` until one would block, EOF is passed on, or the fair share
    /// is used up.
    ///
    /// Unless `until_eagain`, a short read ends the pump once its bytes are delivered: a TCP read
    /// that returns less than asked for emptied the receive queue, and bytes arriving later raise
    /// a new edge. That saves the read that would only return EAGAIN, a third of the system calls
    /// per small message. A FIN that came with the bytes raises no new edge, so once an event
    /// reported the peer closing ([`Direction::source_closing`]) every pump reads to the end.
    ///
    /// At most `budget` bytes are read (`u64::MAX`: no limit); reaching it with the source not
    /// known to be dry ends the pump with [`Progress::throttled`].
    pub fn pump(
        &mut self,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        res: &mut Resources,
        until_eagain: bool,
        other_finished: bool,
        budget: u64,
    ) -> Result<Progress, PumpError> {
        let until_eagain = until_eagain || self.source_closing;
        let mut progress = Progress::default();
        let mut drained = false;
        loop {
            if !self.flush(dst, &mut progress)? {
                return Ok(progress); // sink full: its writable event resumes us
            }
            self.release(res);
            if self.read_eof {
                if !self.write_shut {
                    // When the other direction is over too, the connection closes right after
                    // this and close() sends the FIN (nothing unread remains, or it would be an
                    // RST): skip the shutdown call.
                    if !other_finished {
                        // NotConnected: the peer is already gone; the other direction will notice.
                        let _ = dst.shutdown(Shutdown::Write);
                    }
                    self.write_shut = true;
                }
                return Ok(progress);
            }
            if drained {
                return Ok(progress);
            }
            if progress.moved >= FAIR_SHARE_BYTES {
                progress.yielded = true;
                return Ok(progress);
            }
            let left = budget - progress.read;
            if left == 0 {
                progress.throttled = true;
                return Ok(progress);
            }
            match self.fill(src, res, left) {
                Ok((0, _)) => self.read_eof = true,
                Ok((n, short)) => {
                    progress.read += n as u64;
                    drained = short && !until_eagain;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.release(res);
                    return Ok(progress);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PumpError::Read(e)),
            }
        }
    }

    /// Writes what is in flight. Returns false when the sink would block with bytes left.
    fn flush(&mut self, dst: &mut TcpStream, progress: &mut Progress) -> Result<bool, PumpError> {
        loop {
            let spliced = matches!(self.in_flight, InFlight::Pipe { .. });
            let result = match &mut self.in_flight {
                InFlight::Nothing => return Ok(true),
                InFlight::Buffer { start, end, .. } if start == end => return Ok(true),
                InFlight::Pipe { len: 0, .. } => return Ok(true),
                InFlight::Buffer { buf, start, end } => {
                    dst.write(&buf[*start..*end]).inspect(|&n| *start += n)
                }
                InFlight::Pipe { pipe, len } => {
                    pipe.drain_to(dst.as_raw_fd(), *len).inspect(|&n| *len -= n)
                }
            };
            match result {
                Ok(0) => return Err(PumpError::Write(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.bytes += n as u64;
                    progress.moved += n as u64;
                    if spliced {
                        progress.spliced += n as u64;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
    }

    /// Reads one batch from the source into a buffer or pipe; returns the bytes and whether the
    /// read was short (less than room). Only called with nothing in flight, so with a pipe,
    /// EAGAIN can only mean the socket is empty.
    fn fill(
        &mut self,
        src: &mut TcpStream,
        res: &mut Resources,
        budget: u64,
    ) -> io::Result<(usize, bool)> {
        if self.bulk && res.splice && matches!(self.in_flight, InFlight::Nothing) {
            if let Some(pipe) = res.pipes.take() {
                self.in_flight = InFlight::Pipe { pipe, len: 0 };
            }
        }
        match &mut self.in_flight {
            InFlight::Pipe { pipe, len } => {
                let room = pipe.capacity().min(budget.try_into().unwrap_or(usize::MAX));
                let n = pipe.fill_from(src.as_raw_fd(), room)?;
                *len = n;
                // A splice can return less than room while bytes are still queued (the pipe runs
                // out of slots before bytes), so it never counts as short.
                Ok((n, false))
            }
            InFlight::Nothing | InFlight::Buffer { .. } => {
                let mut buf = match std::mem::replace(&mut self.in_flight, InFlight::Nothing) {
                    // A direction that turned bulk swaps its small buffer for a bulk one.
                    InFlight::Buffer { buf, .. }
                        if !self.bulk || buf.len() == BULK_BUFFER_BYTES =>
                    {
                        buf
                    }
                    InFlight::Buffer { buf, .. } => {
                        res.buffers.give(buf);
                        res.buffers.take_bulk()
                    }
                    _ if self.bulk => res.buffers.take_bulk(),
                    _ => res.buffers.take(),
                };
                let room = buf.len().min(budget.try_into().unwrap_or(usize::MAX));
                match src.read(&mut buf[..room]) {
                    Ok(n) => {
                        let short = n < room;
                        self.bulk |= !short;
                        self.in_flight = InFlight::Buffer {
                            buf,
                            start: 0,
                            end: n,
                        };
                        Ok((n, short))
                    }
                    Err(e) => {
                        res.buffers.give(buf);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Gives an empty buffer or pipe back, so an idle direction holds nothing.
    fn release(&mut self, res: &mut Resources) {
        match std::mem::replace(&mut self.in_flight, InFlight::Nothing) {
            InFlight::Buffer { buf, start, end } if start == end => res.buffers.give(buf),
            InFlight::Pipe { pipe, len: 0 } => res.pipes.give(pipe),
            InFlight::Nothing => {}
            other => self.in_flight = other,
        }
    }

    /// Puts `bytes` in flight ahead of anything read from the source (the PROXY header); the
    /// next pump writes them first. Only on a direction that has not moved anything yet.
    pub fn preload(&mut self, bytes: &[u8], res: &mut Resources) {
        debug_assert!(matches!(self.in_flight, InFlight::Nothing));
        let mut buf = res.buffers.take();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        self.in_flight = InFlight::Buffer {
            buf,
            start: 0,
            end: n,
        };
    }

    /// Drops whatever is in flight when the connection goes away.
    pub fn discard(&mut self, res: &mut Resources) {
        match std::mem::replace(&mut self.in_flight, InFlight::Nothing) {
            InFlight::Buffer { buf, .. } => res.buffers.give(buf),
            InFlight::Pipe { pipe, len: 0 } => res.pipes.give(pipe),
            InFlight::Pipe { pipe, .. } => res.pipes.discard(pipe),
            InFlight::Nothing => {}
        }
    }
}
