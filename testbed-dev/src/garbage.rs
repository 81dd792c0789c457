//! For robustness tests: connections that send what no well-behaved client sends — random
//! bytes, TLS records cut short or lying about their length, HTTP that never ends or claims a
//! huge body — split at random points and ended in random ways (FIN, reset, half-close, or held
//! open). Deterministic from a seed, bounded in count, size and time, loopback only.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The most one garbage connection sends.
pub const MAX_BYTES: usize = 64 * 1024;
/// How long one garbage connection may take, all steps together.
const CONNECTION_BUDGET: Duration = Duration::from_secs(3);

/// A tiny deterministic generator (xorshift64*): tests stay reproducible from their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// Fewer than `max` random bytes (a random count).
    pub fn some_bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }
}

/// The kinds of garbage, one picked per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    RandomBytes,
    /// A TLS record header promising more than follows (handshake, alert or application data).
    TruncatedTlsRecord,
    /// A ClientHello whose lengths lie: it claims 16 MiB, or ends inside its fields.
    BrokenClientHello,
    /// A TLS record longer than TLS allows (length 0xffff).
    OversizeTlsRecord,
    /// HTTP request lines and headers that never end, or end too late.
    EndlessHttp,
    /// An HTTP request whose body is much shorter than its Content-Length.
    ShortHttpBody,
    /// Random bytes cut into lines: a line protocol's worst case (long lines, NULs, bad UTF-8).
    RandomLines,
}

const KINDS: [Kind; 7] = [
    Kind::RandomBytes,
    Kind::TruncatedTlsRecord,
    Kind::BrokenClientHello,
    Kind::OversizeTlsRecord,
    Kind::EndlessHttp,
    Kind::ShortHttpBody,
    Kind::RandomLines,
];

/// What one connection sends for `kind`.
pub fn payload(kind: Kind, rng: &mut Rng) -> Vec<u8> {
    match kind {
        Kind::RandomBytes => {
            let n = rng.below(MAX_BYTES);
            rng.bytes(n)
        }
        Kind::TruncatedTlsRecord => {
            let content = [0x16, 0x15, 0x17, 0x14][rng.below(4)];
            let mut p = vec![content, 0x03, [0x01, 0x03][rng.below(2)], 0x40, 0x00];
            let body = rng.below(0x4000);
            p.extend(rng.bytes(body));
            p.truncate(rng.below(p.len()) + 1);
            p
        }
        Kind::BrokenClientHello => {
            // Record header, then handshake type 1 (ClientHello) claiming 0xffffff bytes, a
            // version, a random and a session id length larger than what follows.
            let mut p = vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0xff, 0xff, 0xff, 0x03, 0x03,
            ];
            p.extend(rng.bytes(32));
            p.push(0xff);
            p.extend(rng.some_bytes(400));
            p
        }
        Kind::OversizeTlsRecord => {
            let mut p = vec![0x16, 0x03, 0x03, 0xff, 0xff];
            p.extend(rng.some_bytes(MAX_BYTES - 5));
            p
        }
        Kind::EndlessHttp => {
            let method = ["GET", "POST", "PUT", "DELETE", "BREW", "\u{0}GET", ""][rng.below(7)];
            let mut p = format!(
                "{method} /{} HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                hex(&rng.some_bytes(40))
            )
            .into_bytes();
            // Many headers, or one enormous header line; never the blank line that ends them.
            if rng.below(2) == 0 {
                for i in 0..rng.below(2000) {
                    p.extend(format!("X-Junk-{i}: {}\r\n", hex(&rng.bytes(8))).bytes());
                }
            } else {
                p.extend(b"X-Long: ");
                p.extend(std::iter::repeat_n(b'a', rng.below(MAX_BYTES)));
            }
            p.truncate(MAX_BYTES);
            p
        }
        Kind::ShortHttpBody => {
            let path = [
                "/api/rules",
                "/api/rules/zzzz",
                "/api/connections/1",
                "/",
                "/metrics",
            ][rng.below(5)];
            let mut p = format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"name\":",
                1_000_000 + rng.below(1_000_000_000)
            )
            .into_bytes();
            p.extend(rng.some_bytes(1000));
            p
        }
        Kind::RandomLines => {
            let mut p = Vec::new();
            while p.len() < rng.below(MAX_BYTES) {
                let line = rng.below(200);
                p.extend(rng.bytes(line));
                p.push(b'\n');
            }
            p
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How many garbage connections did what.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub connections: usize,
    /// Connections that could not even connect (the server's queue was full, or it was gone).
    pub refused: usize,
    pub bytes_sent: usize,
}

/// Opens `connections` garbage connections to `addr`, one after another, each with a kind and a
/// way to end picked from `seed`. Returns once every one has ended (about 3 s each at most).
pub fn spray(addr: SocketAddr, connections: usize, seed: u64) -> Report {
    assert!(addr.ip().is_loopback(), "garbage only goes to loopback");
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    for _ in 0..connections {
        report.connections += 1;
        let kind = KINDS[rng.below(KINDS.len())];
        let data = payload(kind, &mut rng);
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => report.bytes_sent += send_and_end(s, &data, &mut rng),
            Err(_) => report.refused += 1,
        }
    }
    report
}

/// Sends `data` in random pieces (stopping at the first error: the server may close on us), then
/// ends the connection one of four ways. Returns the bytes sent.
fn send_and_end(mut s: TcpStream, data: &[u8], rng: &mut Rng) -> usize {
    let start = Instant::now();
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut sent = 0;
    while sent < data.len() && start.elapsed() < CONNECTION_BUDGET {
        let n = (rng.below(4096) + 1).min(data.len() - sent);
        match s.write(&data[sent..sent + n]) {
            Ok(0) | Err(_) => break,
            Ok(w) => sent += w,
        }
    }
    let mut sink = [0u8; 4096];
    match rng.below(4) {
        // A reset: SO_LINGER 0 then close.
        0 => {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
        // Half-close, then read what the server says until it closes or the budget is spent.
        1 => {
            let _ = s.shutdown(Shutdown::Write);
            while start.elapsed() < CONNECTION_BUDGET {
                match s.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        }
        // Read a little of the answer, then a plain close (FIN).
        2 => {
            let _ = s.read(&mut sink);
        }
        // Close at once, unread answer and all.
        _ => {}
    }
    sent
}

/// Connections that send a few garbage bytes and then stay open doing nothing (until dropped):
/// a server must not let them block anyone else.
pub fn hold_idle(addr: SocketAddr, connections: usize, seed: u64) -> Vec<TcpStream> {
    assert!(addr.ip().is_loopback(), "garbage only goes to loopback");
    let mut rng = Rng::new(seed);
    (0..connections)
        .filter_map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            let n = rng.below(8) + 1;
            let _ = s.write_all(&rng.bytes(n));
            Some(s)
        })
        .collect()
}

/// What happened while garbage and a well-behaved client ran side by side.
#[derive(Debug, Default)]
pub struct Alongside {
    pub garbage: Report,
    /// Exchanges of the well-behaved client that went right.
    pub good_ok: usize,
    /// And those that did not, with why.
    pub good_failures: Vec<String>,
}

/// Runs `threads` garbage sprayers (`connections` in all) at `addr` while `good` does one
/// well-behaved exchange after another on this thread; returns when the garbage is done. `good`
/// runs at least `min_good` times, so a fast spray still leaves something to judge.
pub fn spray_alongside(
    addr: SocketAddr,
    connections: usize,
    threads: usize,
    seed: u64,
    min_good: usize,
    mut good: impl FnMut() -> Result<(), String>,
) -> Alongside {
    let sprayers: Vec<_> = (0..threads.max(1))
        .map(|i| {
            let n = connections / threads.max(1) + usize::from(i < connections % threads.max(1));
            std::thread::spawn(move || spray(addr, n, seed.wrapping_add(i as u64 * 1_000_003)))
        })
        .collect();
    let mut out = Alongside::default();
    while out.good_ok + out.good_failures.len() < min_good
        || sprayers.iter().any(|t| !t.is_finished())
    {
        match good() {
            Ok(()) => out.good_ok += 1,
            Err(e) => out.good_failures.push(e),
        }
    }
    for t in sprayers {
        let r = t.join().expect("a garbage sprayer panicked");
        out.garbage.connections += r.connections;
        out.garbage.refused += r.refused;
        out.garbage.bytes_sent += r.bytes_sent;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_bounded_and_reproducible() {
        for kind in KINDS {
            let (mut a, mut b) = (Rng::new(7), Rng::new(7));
            for _ in 0..20 {
                let p = payload(kind, &mut a);
                assert!(p.len() <= MAX_BYTES + 2000, "{kind:?}: {} bytes", p.len());
                assert_eq!(p, payload(kind, &mut b));
            }
        }
        let mut r = Rng::new(1);
        assert_eq!(
            payload(Kind::OversizeTlsRecord, &mut r)[..5],
            [0x16, 0x03, 0x03, 0xff, 0xff]
        );
    }
}
