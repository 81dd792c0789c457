//! The messages between the supervisor and a worker, and their framing: one JSON object per line
//! over a Unix socket pair the worker inherits. The supervisor asks, the worker answers, in order.
//! Both ends frame with [`encode`] and [`FrameReader`]; nothing else reads or writes the socket's
//! bytes. Every request carries a sequence number its reply repeats ([`Numbered`]), so a reply that
//! arrives after the supervisor gave up waiting for it is recognised and dropped.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::rules::{BackendOptions, PoolOptions, Proto};

/// A request or reply with the sequence number of the request.
pub type Numbered<T> = (u64, T);

/// Appends `message` to `out` as one frame.
pub fn encode<T: Serialize>(message: &T, out: &mut Vec<u8>) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *out, message)?;
    out.push(b'\n');
    Ok(())
}

/// Collects the bytes read from a control socket and hands out whole frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    pending: Vec<u8>,
}

impl FrameReader {
    /// Adds bytes as they were read (any split).
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next whole frame, decoded; `None` until one is complete. A frame that does not
    /// decode is consumed and returned as the error, so one bad frame cannot wedge the reader.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Option<serde_json::Result<T>> {
        let end = self.pending.iter().position(|&b| b == b'\n')?;
        let decoded = serde_json::from_slice(&self.pending[..end]);
        self.pending.drain(..=end);
        Some(decoded)
    }
}

/// One backend as a worker needs it: where to connect and which shared slot counts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    /// The entry's name from the rules file.
    pub name: String,
    pub addr: SocketAddr,
    pub slot: usize,
    #[serde(default)]
    pub options: BackendOptions,
    /// `addr`'s port starts a destination range as long as the pool's: a client that reached
    /// the pool's k-th port goes to `addr`'s port + k.
    #[serde(default)]
    pub port_range: bool,
    /// The rules-file line of its row: several members come from one row whose host name has
    /// several addresses.
    #[serde(default)]
    pub line: usize,
}

/// One listening address and transport, and its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub listen: SocketAddr,
    /// How many ports from `listen`'s the pool listens on (1 unless the rule is a range).
    #[serde(default = "one_port")]
    pub ports: u16,
    /// The range is steered to one listener at `listen` by nftables ([`crate::steer`]); the
    /// port a client reached is read back per connection.
    #[serde(default)]
    pub steered: bool,
    #[serde(default)]
    pub proto: Proto,
    pub slot: usize,
    #[serde(default)]
    pub options: PoolOptions,
    pub backends: Vec<BackendSpec>,
}

fn one_port() -> u16 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Listen on exactly these pools from now on; established connections are kept.
    Apply {
        pools: Vec<PoolSpec>,
    },
    ListConnections,
    Close {
        id: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Pools that could not be listened on, with the reason.
    Applied {
        errors: Vec<String>,
    },
    Connections {
        list: Vec<ConnectionInfo>,
    },
    Closed {
        found: bool,
    },
}

/// One live connection, for the web page's connection table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// Unique across workers: worker index in the top 16 bits.
    pub id: u64,
    pub worker: usize,
    pub client: SocketAddr,
    pub listen: SocketAddr,
    #[serde(default)]
    pub proto: Proto,
    /// The backend's entry name.
    pub rule: String,
    pub backend: SocketAddr,
    /// `connecting` or `relaying`.
    pub state: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub age_ms: u64,
    /// The client has sent its FIN (passed on to the backend).
    pub client_half_closed: bool,
    /// The backend has sent its FIN (passed on to the client).
    pub backend_half_closed: bool,
    /// What only a UDP session has.
    #[serde(default)]
    pub udp: Option<SessionFigures>,
    /// The TLS server name the client asked for (pools with `sni=` rows only).
    #[serde(default)]
    pub sni: Option<String>,
}

/// Figures of a UDP session beyond a connection's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFigures {
    pub datagrams_up: u64,
    pub datagrams_down: u64,
    /// Milliseconds since the last datagram either way (the session ends at the idle timeout).
    pub idle_ms: u64,
}

/// Bits of a connection id that hold the worker-local sequence number.
pub const ID_WORKER_SHIFT: u32 = 48;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split_and_a_bad_frame_is_skipped() {
        let mut bytes = Vec::new();
        encode(&Request::Close { id: 7 }, &mut bytes).unwrap();
        bytes.extend_from_slice(b"{not json}\n");
        encode(&Request::ListConnections, &mut bytes).unwrap();
        for split in 0..bytes.len() {
            let mut reader = FrameReader::default();
            let mut got = Vec::new();
            for part in [&bytes[..split], &bytes[split..]] {
                reader.push(part);
                while let Some(frame) = reader.next_frame::<Request>() {
                    got.push(frame.map(|r| format!("{r:?}")).map_err(|_| ()));
                }
            }
            assert_eq!(
                got,
                vec![
                    Ok("Close { id: 7 }".to_string()),
                    Err(()),
                    Ok("ListConnections".to_string())
                ],
                "split at {split}"
            );
        }
    }

    proptest::proptest! {
        /// Any bytes in any pieces: frames come out one per newline, good or bad, never a panic.
        #[test]
        fn any_bytes_in_any_pieces(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let mut reader = FrameReader::default();
            let mut at = 0;
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort();
            let mut frames = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                reader.push(&bytes[at..cut.max(at)]);
                at = cut.max(at);
                while reader.next_frame::<Numbered<Request>>().is_some() {
                    frames += 1;
                }
            }
            let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
            proptest::prop_assert_eq!(frames, newlines);
        }
    }
}
