//! Why a connection failed, sorted into the causes the report counts. A failure ends that one
//! connection and is recorded; it never stops the run.

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

/// The cause of a failure, as counted in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The port answered with RST to our SYN: nothing listens there.
    Refused,
    /// Connect, handshake or echo took longer than `--timeout-ms`.
    Timeout,
    /// The TLS layer rejected something (certificate, protocol, alert).
    Tls,
    /// The peer reset the connection (or a write hit a closed socket).
    Reset,
    /// The echo came back, but not byte for byte what was sent.
    WrongEcho,
    /// The peer closed the connection before the echo was complete.
    Eof,
    /// Anything else (no local port left, too many open files, a worker process lost, ...).
    Other,
}

impl Cause {
    pub const ALL: [Cause; 7] = [
        Cause::Refused,
        Cause::Timeout,
        Cause::Tls,
        Cause::Reset,
        Cause::WrongEcho,
        Cause::Eof,
        Cause::Other,
    ];

    /// The snake_case name used in JSON and the report.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Refused => "refused",
            Cause::Timeout => "timeout",
            Cause::Tls => "tls",
            Cause::Reset => "reset",
            Cause::WrongEcho => "wrong_echo",
            Cause::Eof => "eof",
            Cause::Other => "other",
        }
    }

    /// Sorts an I/O error from connect, handshake, read or write.
    pub fn of_io(err: &io::Error) -> Cause {
        use io::ErrorKind::*;
        match err.kind() {
            ConnectionRefused => Cause::Refused,
            TimedOut => Cause::Timeout,
            ConnectionReset | ConnectionAborted | BrokenPipe => Cause::Reset,
            UnexpectedEof => Cause::Eof,
            // tokio-rustls reports every rustls error as InvalidData wrapping the rustls::Error.
            InvalidData
                if err
                    .get_ref()
                    .is_some_and(|inner| inner.is::<rustls::Error>()) =>
            {
                Cause::Tls
            }
            _ => Cause::Other,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where in a connection's life the failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Connect,
    Handshake,
    Exchange,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Handshake => "handshake",
            Phase::Exchange => "exchange",
        })
    }
}

/// One connection's failure: cause, phase, and the error text (kept short).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub cause: Cause,
    pub phase: Phase,
    pub detail: String,
}

/// Longest error text kept per connection, so memory stays bounded per connection.
const DETAIL_MAX: usize = 120;

impl Failure {
    pub fn new(cause: Cause, phase: Phase, detail: impl fmt::Display) -> Failure {
        let mut detail = detail.to_string();
        if detail.len() > DETAIL_MAX {
            let mut end = DETAIL_MAX;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        Failure {
            cause,
            phase,
            detail,
        }
    }

    pub fn io(phase: Phase, err: &io::Error) -> Failure {
        let cause = Cause::of_io(err);
        if cause == Cause::Eof && err.to_string().contains("close_notify") {
            // rustls's text for this ends in a long manual URL; say it plainly.
            return Failure::new(
                cause,
                phase,
                "peer closed the connection without TLS close_notify",
            );
        }
        Failure::new(cause, phase, err)
    }

    pub fn timeout(phase: Phase, timeout_ms: u64) -> Failure {
        Failure::new(
            Cause::Timeout,
            phase,
            format_args!("no answer within {timeout_ms} ms"),
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} during {}: {}", self.cause, self.phase, self.detail)
    }
}

/// Failures counted by cause; every cause is present (zero or more) so JSON consumers can rely on
/// the keys.
pub fn count_by_cause<'a>(failures: impl Iterator<Item = &'a Failure>) -> BTreeMap<Cause, u64> {
    let mut counts: BTreeMap<Cause, u64> = Cause::ALL.iter().map(|c| (*c, 0)).collect();
    for f in failures {
        *counts.entry(f.cause).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_sort_into_causes() {
        let e = |k| io::Error::new(k, "x");
        assert_eq!(
            Cause::of_io(&e(io::ErrorKind::ConnectionRefused)),
            Cause::Refused
        );
        assert_eq!(
            Cause::of_io(&e(io::ErrorKind::ConnectionReset)),
            Cause::Reset
        );
        assert_eq!(Cause::of_io(&e(io::ErrorKind::BrokenPipe)), Cause::Reset);
        assert_eq!(Cause::of_io(&e(io::ErrorKind::UnexpectedEof)), Cause::Eof);
        assert_eq!(Cause::of_io(&e(io::ErrorKind::InvalidData)), Cause::Other);
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(Cause::of_io(&tls), Cause::Tls);
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(Cause::of_io(&emfile), Cause::Other);
    }

    #[test]
    fn a_missing_close_notify_is_said_plainly() {
        let e = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/x",
        );
        assert_eq!(
            Failure::io(Phase::Exchange, &e).to_string(),
            "eof during exchange: peer closed the connection without TLS close_notify"
        );
    }

    #[test]
    fn details_are_cut_on_a_char_boundary() {
        let f = Failure::new(Cause::Other, Phase::Connect, "é".repeat(100));
        assert_eq!(f.detail.len(), 120);
        assert_eq!(
            Failure::timeout(Phase::Handshake, 250).to_string(),
            "timeout during handshake: no answer within 250 ms"
        );
    }

    #[test]
    fn counts_name_every_cause() {
        let fs = [
            Failure::new(Cause::Eof, Phase::Exchange, ""),
            Failure::new(Cause::Eof, Phase::Exchange, ""),
            Failure::new(Cause::Refused, Phase::Connect, ""),
        ];
        let counts = count_by_cause(fs.iter());
        assert_eq!(counts.len(), 7);
        assert_eq!(counts[&Cause::Eof], 2);
        assert_eq!(counts[&Cause::Refused], 1);
        assert_eq!(counts[&Cause::Tls], 0);
    }
}
