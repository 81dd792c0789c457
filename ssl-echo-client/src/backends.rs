//! Which backend served each connection: the forwarder's `/api/connections`, asked once when
//! every connection is up, turned into a map from the client address the forwarder saw to the
//! backend. A connection the forwarder does not list (another forwarder, a NAT in between) is
//! "unknown", never guessed.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The name shown for a connection the forwarder did not list.
pub const UNKNOWN: &str = "unknown";

/// How long the one listing may take (at 20,000 connections it is a few MB of JSON).
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait for the forwarder to list every connection that is up.
const SETTLE: Duration = Duration::from_secs(5);

/// Largest listing read (about 300 bytes per connection: 100,000 connections fit).
const LISTING_MAX_BYTES: usize = 32 << 20;

/// Backends by client address, as the forwarder reported them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendMap {
    /// Backend addresses, sorted; a connection's backend is an index into this list.
    pub names: Vec<String>,
    /// Client address (`ip:port`, as the forwarder wrote it) → index into `names`.
    pub clients: HashMap<String, u16>,
}

/// One row of `/api/connections`, the two fields used here.
#[derive(Deserialize)]
struct Listed {
    client: String,
    backend: String,
}

impl BackendMap {
    /// From the body of `/api/connections`.
    pub fn from_listing(body: &[u8]) -> anyhow::Result<BackendMap> {
        let rows: Vec<Listed> = serde_json::from_slice(body)
            .context("the forwarder's /api/connections answer is not a list of connections")?;
        let mut names: Vec<String> = rows.iter().map(|r| r.backend.clone()).collect();
        names.sort();
        names.dedup();
        let index: HashMap<&str, u16> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u16))
            .collect();
        let clients = rows
            .iter()
            .map(|r| (r.client.clone(), index[r.backend.as_str()]))
            .collect();
        Ok(BackendMap { names, clients })
    }

    /// The backend slot of the connection whose own address is `local`: an index into `names`,
    /// or `names.len()` for unknown.
    pub fn slot_of(&self, local: SocketAddr) -> usize {
        self.clients
            .get(&local.to_string())
            .map_or(self.names.len(), |&i| i as usize)
    }

    /// The name of a slot (`unknown` for the last one).
    pub fn name(&self, slot: usize) -> &str {
        self.names.get(slot).map_or(UNKNOWN, String::as_str)
    }

    /// Slots: every backend, then unknown.
    pub fn slots(&self) -> usize {
        self.names.len() + 1
    }
}

/// The forwarder's web API (`--forwarder http://HOST:PORT`).
#[derive(Debug, Clone)]
pub struct ForwarderApi {
    /// `HOST:PORT` as given (sent as the Host header, which a loopback-bound page checks).
    authority: String,
    addr: SocketAddr,
    token: Option<String>,
}

impl ForwarderApi {
    /// Checks the URL (`http://HOST:PORT`, no path) and looks the host up once.
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<ForwarderApi> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--forwarder {url:?}: must start with http:// (the forwarder's web page)");
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!("--forwarder {url:?}: give only http://HOST:PORT");
        }
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("--forwarder {url:?}: cannot resolve HOST:PORT"))?
            .next()
            .with_context(|| format!("--forwarder {url:?}: resolves to no address"))?;
        Ok(ForwarderApi {
            authority: authority.to_string(),
            addr,
            token,
        })
    }

    /// Asks for the live connections until the forwarder lists at least `up` of them, for at
    /// most [`SETTLE`]: a plain TCP connection is up for the client as soon as the forwarder's
    /// kernel completed the handshake, which can be before the forwarder accepted it (in a burst
    /// of thousands, its listen backlog holds them for a moment). Then the last answer is used;
    /// what it lacks is unknown.
    pub async fn connections_of_at_least(&self, up: u64) -> anyhow::Result<BackendMap> {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let map = self.connections().await?;
            if map.clients.len() as u64 >= up || tokio::time::Instant::now() >= deadline {
                return Ok(map);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asks for every live connection, once.
    pub async fn connections(&self) -> anyhow::Result<BackendMap> {
        // fresh: not a list the forwarder cached before the last connections were up.
        let body = tokio::time::timeout(QUERY_TIMEOUT, self.get("/api/connections?fresh=true"))
            .await
            .with_context(|| format!("no answer within {} s", QUERY_TIMEOUT.as_secs()))??;
        BackendMap::from_listing(&body)
    }

    /// One HTTP/1.0 GET (so the answer is never chunked and ends with the connection).
    async fn get(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut s = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        let mut request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\n",
            self.authority
        );
        if let Some(t) = &self.token {
            request.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        request.push_str("\r\n");
        s.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        (&mut s)
            .take(LISTING_MAX_BYTES as u64 + 64 * 1024)
            .read_to_end(&mut answer)
            .await?;
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("the answer has no end of headers")?;
        let head = String::from_utf8_lossy(&answer[..split]);
        let status = head.lines().next().unwrap_or("");
        if status.split_whitespace().nth(1) != Some("200") {
            let body = String::from_utf8_lossy(&answer[split + 4..]);
            bail!("GET {path}: {status}: {body:.300}");
        }
        Ok(answer[split + 4..].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_maps_clients_to_backends_and_the_rest_is_unknown() {
        let body = br#"[
            {"id":"1","client":"10.0.1.2:40000","backend":"10.0.2.2:9000","state":"relaying"},
            {"id":"2","client":"10.0.1.2:40001","backend":"10.0.2.1:9000","state":"relaying"},
            {"id":"3","client":"10.0.1.3:40000","backend":"10.0.2.2:9000","state":"relaying"}
        ]"#;
        let m = BackendMap::from_listing(body).unwrap();
        assert_eq!(m.names, ["10.0.2.1:9000", "10.0.2.2:9000"]);
        assert_eq!(m.slot_of("10.0.1.2:40000".parse().unwrap()), 1);
        assert_eq!(m.slot_of("10.0.1.2:40001".parse().unwrap()), 0);
        let other = m.slot_of("10.0.1.9:40000".parse().unwrap());
        assert_eq!((other, m.name(other)), (2, UNKNOWN));
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<BackendMap>(&json).unwrap(), m);
    }

    #[test]
    fn only_a_plain_http_host_and_port_is_taken() {
        let e = ForwarderApi::new("https://127.0.0.1:3001", None).unwrap_err();
        assert!(e.to_string().contains("must start with http://"), "{e}");
        let e = ForwarderApi::new("http://127.0.0.1:3001/api", None).unwrap_err();
        assert!(e.to_string().contains("give only http://HOST:PORT"), "{e}");
        let api = ForwarderApi::new("http://127.0.0.1:3001/", None).unwrap();
        assert_eq!(api.addr, "127.0.0.1:3001".parse().unwrap());
    }
}
