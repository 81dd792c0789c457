//! The messages between the supervisor and a worker: one JSON object per line over a Unix socket
//! pair the worker inherits. The supervisor asks, the worker answers, in order.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// One backend as a worker needs it: where to connect and which shared slot counts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    /// The entry's name from the rules file.
    pub name: String,
    pub addr: SocketAddr,
    pub slot: usize,
}

/// One listening address and its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub listen: SocketAddr,
    pub slot: usize,
    pub backends: Vec<BackendSpec>,
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
}

/// Bits of a connection id that hold the worker-local sequence number.
pub const ID_WORKER_SHIFT: u32 = 48;
