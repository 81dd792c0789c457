//! One client connection: its socket, the splitter for what it sends, and the bounded queue of
//! what it has not yet taken. The bound is what keeps one client that stops reading from costing
//! the server memory or the others time: when it is exceeded, the server drops that client.

use std::io::{self, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;

use crate::framing::LineSplitter;

/// Lines waiting for the kernel to take them.
#[derive(Debug)]
pub struct OutQueue {
    buf: Vec<u8>,
    /// Bytes before `pos` were already written.
    pos: usize,
    max_bytes: usize,
}

/// The queue would exceed its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl OutQueue {
    pub fn new(max_bytes: usize) -> OutQueue {
        OutQueue {
            buf: Vec::new(),
            pos: 0,
            max_bytes,
        }
    }

    /// Bytes queued and not yet written.
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `line` and a newline, unless that would pass the bound.
    pub fn push(&mut self, line: &str) -> Result<(), Overflow> {
        if self.len() + line.len() + 1 > self.max_bytes {
            return Err(Overflow);
        }
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
        Ok(())
    }

    /// Writes until the queue is empty or the socket would block.
    pub fn flush(&mut self, sink: &mut impl Write) -> io::Result<()> {
        while self.pos < self.buf.len() {
            match sink.write(&self.buf[self.pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            // Give back the memory a burst (history replay) needed.
            if self.buf.capacity() > 64 * 1024 {
                self.buf.shrink_to(4096);
            }
        } else if self.pos > self.buf.len() / 2 {
            // Keep the unwritten tail at the front so the buffer does not creep.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(())
    }
}

/// See the module comment.
#[derive(Debug)]
pub struct Connection {
    pub socket: TcpStream,
    pub peer: SocketAddr,
    pub splitter: LineSplitter,
    pub out: OutQueue,
    /// Already in the server's list of connections to flush this turn.
    pub dirty: bool,
    /// Never reused, unlike the slab key: tells the line clock's entries apart.
    pub serial: u64,
    /// When the unfinished line now being read began.
    pub line_started: Option<std::time::Instant>,
    /// The line clock holds an entry for this connection.
    pub line_queued: bool,
}

impl Connection {
    pub fn new(
        socket: TcpStream,
        peer: SocketAddr,
        max_line_bytes: usize,
        max_queue_bytes: usize,
        serial: u64,
    ) -> Connection {
        Connection {
            socket,
            peer,
            splitter: LineSplitter::new(max_line_bytes),
            out: OutQueue::new(max_queue_bytes),
            dirty: false,
            serial,
            line_started: None,
            line_queued: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes at most `room` bytes, then would block.
    struct Slow {
        taken: Vec<u8>,
        room: usize,
    }

    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bounded_and_ordered() {
        let mut q = OutQueue::new(10);
        q.push("abcd").unwrap();
        q.push("efgh").unwrap();
        assert_eq!(q.push("x"), Err(Overflow));
        assert_eq!(q.len(), 10);
        let mut sink = Slow {
            taken: Vec::new(),
            room: 7,
        };
        q.flush(&mut sink).unwrap();
        assert_eq!(q.len(), 3);
        q.push("ij").unwrap();
        sink.room = 100;
        q.flush(&mut sink).unwrap();
        assert!(q.is_empty());
        assert_eq!(sink.taken, b"abcd\nefgh\nij\n");
    }
}
