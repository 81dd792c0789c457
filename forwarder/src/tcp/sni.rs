//! The server name a TLS client asks for, read from the first bytes it sends (its ClientHello)
//! without terminating TLS: sans-IO, handed whatever was peeked so far, so the bytes stay in the
//! socket for the backend. A ClientHello may be split over many TCP segments and over several TLS
//! records; it is read whole, up to [`MAX_HELLO`] bytes. Never panics on any input (fuzzed and
//! property-tested).

/// Most bytes looked at before giving up: a ClientHello with many extensions (post-quantum key
/// shares) is 2–4 KiB; 16 KiB is one full TLS record and room to spare.
pub const MAX_HELLO: usize = 16 * 1024;

/// What the bytes seen so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not whole yet: peek again once more bytes arrived.
    Incomplete,
    /// The client does not speak TLS (its first byte is no handshake record).
    NotTls,
    /// A whole ClientHello, and the host name it asks for (lower case, no trailing dot), if any.
    Complete(Option<String>),
}

/// Why the bytes are no ClientHello even though they started like one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello longer than {MAX_HELLO} bytes")]
    TooLarge,
}

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// TLS records carry at most 2^14 bytes of plaintext (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;

/// Reads the ClientHello in `bytes` (everything the client sent so far, from its first byte).
pub fn read_client_hello(bytes: &[u8]) -> Result<Hello, HelloError> {
    let Some(&first) = bytes.first() else {
        return Ok(Hello::Incomplete);
    };
    if first != RECORD_HANDSHAKE {
        return Ok(Hello::NotTls);
    }
    // Reassemble the handshake message from the records' fragments.
    let mut message: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = bytes.get(at..at + 5) else {
            return incomplete(bytes);
        };
        if header[0] != RECORD_HANDSHAKE {
            return Err(HelloError::Malformed(
                "a record other than handshake before the ClientHello ended",
            ));
        }
        if header[1] != 3 {
            return Err(HelloError::Malformed("record version is not TLS"));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > MAX_RECORD {
            return Err(HelloError::Malformed("record length out of bounds"));
        }
        let Some(fragment) = bytes.get(at + 5..at + 5 + len) else {
            // Whatever part of the record is here may already hold the whole message.
            message.extend_from_slice(&bytes[(at + 5).min(bytes.len())..]);
            return match whole_message(&message)? {
                Some(body) => parse_hello(body).map(Hello::Complete),
                None => incomplete(bytes),
            };
        };
        message.extend_from_slice(fragment);
        at += 5 + len;
        if let Some(body) = whole_message(&message)? {
            return parse_hello(body).map(Hello::Complete);
        }
    }
}

fn incomplete(bytes: &[u8]) -> Result<Hello, HelloError> {
    if bytes.len() >= MAX_HELLO {
        Err(HelloError::TooLarge)
    } else {
        Ok(Hello::Incomplete)
    }
}

/// The ClientHello's body once the handshake message is whole.
fn whole_message(message: &[u8]) -> Result<Option<&[u8]>, HelloError> {
    let Some(header) = message.get(..4) else {
        return Ok(None);
    };
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::Malformed(
            "first handshake message is no ClientHello",
        ));
    }
    let len = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
    if len > MAX_HELLO {
        return Err(HelloError::TooLarge);
    }
    Ok(message.get(4..4 + len))
}

/// A cursor over a byte string: every read is bounds-checked and says what was cut short.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.rest.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize, what: &'static str) -> Result<Reader<'a>, HelloError> {
        let len = match len_bytes {
            1 => self.u8(what)? as usize,
            _ => self.u16(what)? as usize,
        };
        Ok(Reader {
            rest: self.take(len, what)?,
        })
    }
}

/// RFC 8446 4.1.2: version, random, session id, cipher suites, compression methods, extensions.
fn parse_hello(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { rest: body };
    r.take(2, "no client version")?;
    r.take(32, "no random")?;
    r.vec(1, "session id cut short")?;
    let suites = r.vec(2, "cipher suites cut short")?;
    if suites.rest.is_empty() || suites.rest.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suites of odd or zero length"));
    }
    r.vec(1, "compression methods cut short")?;
    if r.rest.is_empty() {
        return Ok(None); // no extensions at all (TLS 1.0 style)
    }
    let mut exts = r.vec(2, "extensions cut short")?;
    while !exts.rest.is_empty() {
        let kind = exts.u16("extension type cut short")?;
        let mut data = exts.vec(2, "extension cut short")?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        let mut list = data.vec(2, "server name list cut short")?;
        while !list.rest.is_empty() {
            let name_type = list.u8("server name type cut short")?;
            let name = list.vec(2, "server name cut short")?;
            if name_type == NAME_TYPE_HOST {
                return host_name(name.rest).map(Some);
            }
        }
        return Ok(None);
    }
    Ok(None)
}

/// A host name as routes compare it: ASCII letters, digits, `-`, `_` and dots, lower-cased,
/// without a trailing dot.
fn host_name(raw: &[u8]) -> Result<String, HelloError> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 253 {
        return Err(HelloError::Malformed(
            "server name empty or longer than 253 bytes",
        ));
    }
    if !raw
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(HelloError::Malformed("server name is not a host name"));
    }
    Ok(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

// ---- the relay's ClientHello phase (`sni=`) ------------------------------------------------------

use std::io;

use crate::tcp::direction::PumpError;
use crate::tcp::relay::{Context, Ending, Next, Phase, Relay};

impl Relay {
    /// `sni=`: waits (within the connect timeout) for the ClientHello that picks the backends.
    pub(super) fn start_hello(&mut self, ctx: &mut Context) -> Next {
        let deadline = ctx.now + ctx.connect_timeout;
        self.phase = Phase::ReadingHello { deadline };
        match self.read_hello(ctx) {
            Next::Wait => Next::Timer(deadline),
            next => next,
        }
    }

    /// Peeks at what the client sent so far (nothing is consumed: the backend gets the
    /// ClientHello untouched) until it holds a whole ClientHello or shows the client speaks no
    /// TLS, then serves the connection from the group of backends for its name.
    pub(super) fn read_hello(&mut self, ctx: &mut Context) -> Next {
        let mut buf = vec![0u8; MAX_HELLO];
        let seen = match self.client.peek(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
            Err(e) => return Next::Close(Ending::Failed(PumpError::Read(e))),
        };
        let name = match read_client_hello(&buf[..seen]) {
            Ok(Hello::Incomplete) if seen > 0 => return Next::Wait,
            Ok(Hello::Incomplete) => {
                return Next::Close(Ending::BadHello("closed before a ClientHello"))
            }
            Ok(Hello::NotTls) => None,
            Ok(Hello::Complete(name)) => name,
            Err(HelloError::TooLarge) => {
                return Next::Close(Ending::BadHello("ClientHello too large"))
            }
            Err(HelloError::Malformed(why)) => return Next::Close(Ending::BadHello(why)),
        };
        let group = self
            .pool
            .sni
            .as_ref()
            .and_then(|r| r.route(name.as_deref()));
        self.sni = name;
        let Some(group) = group else {
            return Next::Close(Ending::NoSniRoute);
        };
        self.pool = group;
        self.phase = Phase::Accepted;
        self.route(ctx)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello asking for `name` (none: no SNI extension), with `padding` bytes of an
    /// extra extension, as one handshake message.
    pub fn hello_message(name: Option<&str>, padding: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        // An extension before SNI, so the reader must skip one.
        exts.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
        if let Some(name) = name {
            let n = name.len() as u16;
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(n + 5).to_be_bytes());
            exts.extend_from_slice(&(n + 3).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&n.to_be_bytes());
            exts.extend_from_slice(name.as_bytes());
        }
        exts.extend_from_slice(&0x0015u16.to_be_bytes());
        exts.extend_from_slice(&(padding as u16).to_be_bytes());
        exts.extend(std::iter::repeat_n(0u8, padding));
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(32);
        body.extend_from_slice(&[9u8; 32]);
        body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[0x01, 0x00]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// `message` cut into records of at most `record` bytes each.
    pub fn in_records(message: &[u8], record: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(record.max(1)) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn names_are_read_from_one_or_many_records() {
        let msg = hello_message(Some("A.Test."), 0);
        for record in [16_384, 100, 7, 1] {
            let bytes = in_records(&msg, record);
            assert_eq!(
                read_client_hello(&bytes),
                Ok(Hello::Complete(Some("a.test".into()))),
                "records of {record}"
            );
            // Every shorter prefix is incomplete, never an error.
            for cut in 0..bytes.len() {
                assert_eq!(
                    read_client_hello(&bytes[..cut]),
                    Ok(Hello::Incomplete),
                    "cut {cut}"
                );
            }
        }
        let bytes = in_records(&hello_message(None, 0), 16_384);
        assert_eq!(read_client_hello(&bytes), Ok(Hello::Complete(None)));
        // Bytes after the ClientHello (early data) do not matter.
        let mut more = in_records(&msg, 16_384);
        more.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(
            read_client_hello(&more),
            Ok(Hello::Complete(Some("a.test".into())))
        );
    }

    #[test]
    fn a_real_openssl_client_hello_and_every_prefix() {
        // Captured from `openssl s_client -servername a.example.com` (fuzz seed).
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/client_hello/openssl-sni"
        );
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            read_client_hello(&bytes),
            Ok(Hello::Complete(Some("a.example.com".into())))
        );
        for cut in 0..bytes.len() {
            assert!(matches!(
                read_client_hello(&bytes[..cut]),
                Ok(Hello::Incomplete | Hello::Complete(_))
            ));
        }
    }

    #[test]
    fn other_protocols_and_garbage_are_told_apart() {
        assert_eq!(read_client_hello(b"GET / HTTP/1.1\r\n"), Ok(Hello::NotTls));
        assert_eq!(read_client_hello(b"SSH-2.0-x"), Ok(Hello::NotTls));
        assert_eq!(
            read_client_hello(&[22, 3, 1, 0, 0]),
            Err(HelloError::Malformed("record length out of bounds"))
        );
        assert_eq!(
            read_client_hello(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(HelloError::Malformed(
                "first handshake message is no ClientHello"
            ))
        );
        let mut bad_name = in_records(&hello_message(Some("a b"), 0), 16_384);
        assert_eq!(
            read_client_hello(&bad_name),
            Err(HelloError::Malformed("server name is not a host name"))
        );
        bad_name.truncate(10);
        assert_eq!(read_client_hello(&bad_name), Ok(Hello::Incomplete));
        // A record that never ends within the bound.
        let mut endless = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
        endless.resize(MAX_HELLO, 0);
        assert_eq!(read_client_hello(&endless), Err(HelloError::TooLarge));
    }

    proptest! {
        #[test]
        fn any_bytes_are_an_answer_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_client_hello(&bytes);
            let mut tls = vec![22, 3, 1];
            tls.extend_from_slice(&bytes);
            let _ = read_client_hello(&tls);
        }

        #[test]
        fn a_hello_in_any_records_with_any_padding_reads_back(
            name in "[a-z0-9]{1,20}(\\.[a-z0-9-]{1,20}){0,3}",
            record in 1usize..600,
            padding in 0usize..3000,
            flip in any::<(usize, u8)>(),
        ) {
            let bytes = in_records(&hello_message(Some(&name), padding), record);
            prop_assert_eq!(read_client_hello(&bytes), Ok(Hello::Complete(Some(name.clone()))));
            // One byte changed anywhere: still an answer.
            let mut changed = bytes.clone();
            let at = flip.0 % changed.len();
            changed[at] ^= flip.1;
            let _ = read_client_hello(&changed);
        }
    }
}
