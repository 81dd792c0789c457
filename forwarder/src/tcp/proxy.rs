//! The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2): the header a backend
//! reads before the client's first byte to learn the client's real address. Encoding and parsing
//! are sans-IO (byte slices, unit-tested below); the relay's header phase at the end of this file
//! (`accept_proxy`) does the socket work with them.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::rules::options::ProxyVersion;
use crate::tcp::direction::PumpError;
use crate::tcp::relay::{Context, Ending, Next, Phase, Relay};

/// The twelve bytes every version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest header either version may have: v1's 107 bytes, v2's 16 plus the TCP6 block (36),
/// rounded up for TLVs we skip.
pub const MAX_HEADER: usize = 536;

/// Both addresses in one family: an IPv4 address next to an IPv6 one is written as IPv4-mapped.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v4 = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    };
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    let (s, d) = (v4(src), v4(dst));
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        (v6(s), v6(d))
    }
}

/// The header announcing a connection from `src` (the client) to `dst` (the address it reached).
pub fn encode(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    match version {
        ProxyVersion::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = Vec::with_capacity(52);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21); // version 2, command PROXY
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // AF_INET, STREAM
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.push(0x21); // AF_INET6, STREAM
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&as_v6(s).octets());
                    out.extend_from_slice(&as_v6(d).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// What a complete header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client and the address it connected to; `None` for a LOCAL (health check) or
    /// UNKNOWN connection, whose own addresses stand.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// Bytes the header takes at the start of the stream.
    pub len: usize,
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("closed before a whole PROXY header")]
    Closed,
    #[error("no PROXY header within the connect timeout")]
    Timeout,
}

/// Parses the start of a stream: `Ok(None)` while the bytes so far may still become a header.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if n < 6 { Ok(None) } else { parse_v1(buf) };
    }
    Err(HeaderError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    const MAX_V1: usize = 107;
    let Some(end) = buf.windows(2).take(MAX_V1 - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 {
            Err(HeaderError::V1("no CRLF within 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| HeaderError::V1("not ASCII"))?;
    let len = end + 2;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["UNKNOWN", ..] => Ok(Some(Header { addrs: None, len })),
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> Result<IpAddr, HeaderError> {
                let ip: IpAddr = s.parse().map_err(|_| HeaderError::V1("bad address"))?;
                if ip.is_ipv4() != (*family == "TCP4") {
                    return Err(HeaderError::V1("address does not match the family"));
                }
                Ok(ip)
            };
            let port = |s: &str| -> Result<u16, HeaderError> {
                if s.len() > 1 && s.starts_with('0') {
                    return Err(HeaderError::V1("port with a leading zero"));
                }
                s.parse().map_err(|_| HeaderError::V1("bad port"))
            };
            Ok(Some(Header {
                addrs: Some((
                    SocketAddr::new(ip(src)?, port(sport)?),
                    SocketAddr::new(ip(dst)?, port(dport)?),
                )),
                len,
            }))
        }
        _ => Err(HeaderError::V1("expected TCP4|TCP6 SRC DST SPORT DPORT")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::V2("version is not 2"));
    }
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > MAX_HEADER {
        return Err(HeaderError::V2("longer than this forwarder accepts"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let b = &buf[16..len];
    match ver_cmd & 0x0f {
        0 => return Ok(Some(Header { addrs: None, len })), // LOCAL
        1 => {}
        _ => return Err(HeaderError::V2("unknown command")),
    }
    let addrs = match fam {
        0x11 if body >= 12 => {
            let ip = |o: usize| IpAddr::from([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            ))
        }
        0x21 if body >= 36 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&b[o..o + 16]);
                IpAddr::from(a)
            };
            let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            ))
        }
        0x11 | 0x21 => return Err(HeaderError::V2("address block too short")),
        // UNSPEC or a family we do not relay (UNIX, DGRAM): keep the connection's own.
        _ => None,
    };
    Ok(Some(Header { addrs, len }))
}

// ---- the relay's header phase (`accept_proxy`) -------------------------------------------------

impl Relay {
    /// `accept_proxy`: looks at what the client sent so far (MSG_PEEK, so nothing is consumed
    /// until the header is whole), and once it is, takes exactly the header off the stream and
    /// carries on with the address it names.
    pub(super) fn read_header(&mut self, ctx: &mut Context) -> Next {
        let mut buf = [0u8; MAX_HEADER];
        let seen = match self.client.peek(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
            Err(e) => return Next::Close(Ending::Failed(PumpError::Read(e))),
        };
        let header = match parse(&buf[..seen]) {
            Ok(Some(h)) => h,
            Ok(None) if seen > 0 => return Next::Wait,
            Ok(None) => return Next::Close(Ending::BadHeader(HeaderError::Closed)),
            Err(e) => return Next::Close(Ending::BadHeader(e)),
        };
        let mut taken = 0;
        while taken < header.len {
            match io::Read::read(&mut self.client, &mut buf[taken..header.len]) {
                Ok(0) => return Next::Close(Ending::BadHeader(HeaderError::Closed)),
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Next::Close(Ending::Failed(PumpError::Read(e))),
            }
        }
        self.header_read_bytes = header.len as u64;
        if let Some((client, header_destination)) = header.addrs {
            self.client_addr = client;
            self.header_destination = Some(header_destination);
        }
        self.phase = Phase::Accepted;
        if !self.pool.acl.admits(self.client_addr.ip()) {
            return Next::Close(Ending::Denied);
        }
        self.route(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_and_v2_round_trip_for_both_families() {
        for (src, dst) in [
            (sa("10.0.0.5:40000"), sa("10.0.0.1:8080")),
            (sa("[2001:db8::5]:40000"), sa("[2001:db8::1]:8080")),
        ] {
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut bytes = encode(v, src, dst);
                let len = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.0\r\n");
                let h = parse(&bytes).unwrap().unwrap();
                assert_eq!(
                    h,
                    Header {
                        addrs: Some((src, dst)),
                        len
                    },
                    "{v:?} {src}"
                );
                // Every proper prefix asks for more.
                for cut in 0..len {
                    assert_eq!(parse(&bytes[..cut]), Ok(None), "{v:?} cut at {cut}");
                }
            }
        }
        assert_eq!(
            encode(ProxyVersion::V1, sa("10.0.0.5:40000"), sa("10.0.0.1:8080")),
            b"PROXY TCP4 10.0.0.5 10.0.0.1 40000 8080\r\n"
        );
        let v2 = encode(ProxyVersion::V2, sa("10.0.0.5:1"), sa("10.0.0.1:2"));
        assert_eq!(
            v2[12..],
            [0x21, 0x11, 0, 12, 10, 0, 0, 5, 10, 0, 0, 1, 0, 1, 0, 2]
        );
    }

    #[test]
    fn a_v4_mapped_client_is_written_as_ipv4_and_mixed_families_as_ipv6() {
        assert_eq!(
            encode(
                ProxyVersion::V1,
                sa("[::ffff:10.0.0.5]:1"),
                sa("10.0.0.1:2")
            ),
            b"PROXY TCP4 10.0.0.5 10.0.0.1 1 2\r\n"
        );
        assert_eq!(
            encode(ProxyVersion::V1, sa("10.0.0.5:1"), sa("[2001:db8::1]:2")),
            b"PROXY TCP6 ::ffff:10.0.0.5 2001:db8::1 1 2\r\n"
        );
    }

    #[test]
    fn local_unknown_garbage_and_truncation() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse(&local),
            Ok(Some(Header {
                addrs: None,
                len: 16
            }))
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\nrest"),
            Ok(Some(Header {
                addrs: None,
                len: 15
            }))
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"\r\n\r\nX"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"PROX"), Ok(None));
        assert_eq!(
            parse(b"PROXY TCP4 10.0.0.5 ::1 1 2\r\n"),
            Err(HeaderError::V1("address does not match the family"))
        );
        assert_eq!(
            parse(b"PROXY TCP4 10.0.0.5 10.0.0.1 01 2\r\n"),
            Err(HeaderError::V1("port with a leading zero"))
        );
        assert_eq!(
            parse(b"PROXY TCP4 10.0.0.5 10.0.0.1 1\r\n"),
            Err(HeaderError::V1("expected TCP4|TCP6 SRC DST SPORT DPORT"))
        );
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'x'].repeat(20)).is_err());
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x11, 0x11, 0, 12]);
        assert_eq!(parse(&bad), Err(HeaderError::V2("version is not 2")));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(
            parse(&short),
            Err(HeaderError::V2("address block too short"))
        );
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(parse(&long).is_err());
    }
}
