//! The token space of a worker's one epoll set: which `mio::Token` names which socket. Every
//! token is made by a named constructor here and read back by [`decode`]; nothing else does
//! arithmetic on tokens.
//!
//! Layout (ranges chosen so that one comparison or two tell them apart on the hot path):
//! relay sockets `[0, 2^40)` (client `2·key`, backend `2·key + 1`), TCP listeners from `2^40`,
//! UDP ports from `2^44`, UDP sessions from `2^45` to `2^46`, and the control socket and the
//! signal pipe at the top.

use mio::Token;

/// The supervisor's control socket.
pub const CONTROL: Token = Token(usize::MAX - 1);
/// The worker's SIGTERM/SIGINT pipe.
pub const SIGNALS: Token = Token(usize::MAX - 2);

const LISTENER_BASE: usize = 1 << 40;
const UDP_PORT_BASE: usize = 1 << 44;
const UDP_SESSION_BASE: usize = 1 << 45;
const UDP_SESSION_END: usize = 1 << 46;

/// What a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Control,
    Signals,
    /// The TCP listener with this key.
    Listener(usize),
    /// The client socket of the relay with this key.
    Client(usize),
    /// The backend socket of the relay with this key.
    Backend(usize),
    /// The UDP port (client-facing socket) with this key.
    UdpPort(usize),
    /// The backend-facing socket of the UDP session with this key.
    UdpSession(usize),
    /// Outside every range (never made here).
    Unknown,
}

/// The token of TCP listener `key`.
pub fn listener(key: usize) -> Token {
    Token(LISTENER_BASE + key)
}

/// The token of relay `key`'s client socket.
pub fn client(key: usize) -> Token {
    Token(key * 2)
}

/// The token of relay `key`'s backend socket.
pub fn backend(key: usize) -> Token {
    Token(key * 2 + 1)
}

/// The token of UDP port `key`.
pub fn udp_port(key: usize) -> Token {
    Token(UDP_PORT_BASE + key)
}

/// The token of UDP session `key`'s backend socket.
pub fn udp_session(key: usize) -> Token {
    Token(UDP_SESSION_BASE + key)
}

/// The one reading of a token.
pub fn decode(token: Token) -> Owner {
    match token.0 {
        t if t < LISTENER_BASE && t % 2 == 0 => Owner::Client(t / 2),
        t if t < LISTENER_BASE => Owner::Backend(t / 2),
        t if t < UDP_PORT_BASE => Owner::Listener(t - LISTENER_BASE),
        t if t < UDP_SESSION_BASE => Owner::UdpPort(t - UDP_PORT_BASE),
        t if t < UDP_SESSION_END => Owner::UdpSession(t - UDP_SESSION_BASE),
        t if t == CONTROL.0 => Owner::Control,
        t if t == SIGNALS.0 => Owner::Signals,
        _ => Owner::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_constructor_decodes_to_its_owner() {
        for key in [0, 1, 7, 1 << 20] {
            assert_eq!(decode(client(key)), Owner::Client(key));
            assert_eq!(decode(backend(key)), Owner::Backend(key));
            assert_eq!(decode(listener(key)), Owner::Listener(key));
            assert_eq!(decode(udp_port(key)), Owner::UdpPort(key));
            assert_eq!(decode(udp_session(key)), Owner::UdpSession(key));
        }
        assert_eq!(decode(CONTROL), Owner::Control);
        assert_eq!(decode(SIGNALS), Owner::Signals);
        assert_eq!(decode(Token(UDP_SESSION_END)), Owner::Unknown);
    }
}
