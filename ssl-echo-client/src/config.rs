//! What one run is asked to do, resolved from the command line (and the prompts) into plain data,
//! so the same description can be handed to worker processes as JSON.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tls::TlsOptions;

/// How long each connection keeps exchanging messages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Exactly this many messages per connection (the original lab's "times").
    Count(u64),
    /// Messages until this many seconds after the barrier.
    DurationSecs(f64),
}

/// Everything a process needs to run its share of the connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// The host as the user wrote it (shown in the report).
    pub host: String,
    /// The address actually connected to (resolved once, by the parent).
    pub addr: SocketAddr,
    /// Name sent in SNI and checked against the server certificate.
    pub server_name: String,
    /// `None` for plaintext TCP, else the CA file that signs the server certificate.
    pub ca: Option<PathBuf>,
    /// The payload of every message; the echo must match it byte for byte.
    pub message: String,
    pub workload: Workload,
    /// Connections in the whole run (all processes).
    pub connections: u64,
    /// New connections per second over the whole run; 0 = as fast as the server accepts.
    pub connect_rate: f64,
    /// Messages per second per connection on a fixed schedule (wrk2 style); `None` = closed loop.
    pub rate: Option<f64>,
    /// Limit for the TCP connect, the TLS handshake, and each echo.
    pub timeout_ms: u64,
    /// Local addresses to bind connections to, in turn by connection id (`--source-ip`); empty =
    /// the kernel picks. An agent replaces them with its own.
    #[serde(default)]
    pub source_ips: Vec<IpAddr>,
    /// Version, suites, ALPN, client certificate, resumption (`--tls-version` and friends).
    #[serde(default)]
    pub tls_options: TlsOptions,
    /// Handshake-capacity mode (`--churn`): open loop, no barrier; `workload` is then each
    /// connection's lifetime, counted from its own handshake.
    #[serde(default)]
    pub churn: Option<Churn>,
    /// Connections of one process being opened at once at most (`--max-connecting`).
    #[serde(default = "default_max_connecting")]
    pub max_connecting: u64,
    /// While waiting at the barrier, an open connection echoes one message this often (0 = off).
    #[serde(default)]
    pub keepalive_ms: u64,
    /// What every message carries instead of `message` (`--size`, `--message-file`).
    #[serde(default)]
    pub payload: Option<Payload>,
}

/// `--churn R`: new connections at `rate` per second (over the whole run) for `window_s`
/// seconds, whatever the earlier ones are doing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Churn {
    pub rate: f64,
    pub window_s: f64,
}

fn default_max_connecting() -> u64 {
    crate::shard::MAX_CONNECTING as u64
}

/// A message that is not the `--message` text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// `size` random bytes drawn from `seed` (the same bytes in every process and on every
    /// agent, so a run can be repeated exactly).
    Random { size: u64, seed: u64 },
    /// The bytes of a file (`--message-file`), read once by the parent, base64 for the trip.
    File { path: String, base64: String },
}

/// The largest message (`--size`, `--message-file`): the echo is held in memory per connection.
pub const MAX_MESSAGE_BYTES: u64 = 16 << 20;

/// `size` bytes from a generator seeded with `seed`.
pub fn random_bytes(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = vec![0u8; size as usize];
    rng.fill(&mut bytes);
    bytes
}

impl RunConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn tls(&self) -> bool {
        self.ca.is_some()
    }

    /// About how many connections are open at once: all of them, except in churn mode, where
    /// each lives its lifetime (a message lifetime is taken as under a second) plus a margin, at
    /// this config's opening rate (`connect_rate`: the churn rate, or an agent's share of it).
    pub fn open_at_once(&self) -> u64 {
        if self.churn.is_none() {
            return self.connections;
        }
        let life_s = match self.workload {
            Workload::DurationSecs(s) => s,
            Workload::Count(_) => 1.0,
        };
        ((self.connect_rate * (life_s + 1.0) * 1.2).ceil() as u64).clamp(1, self.connections.max(1))
    }

    /// The bytes of every message.
    pub fn payload_bytes(&self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        Ok(match &self.payload {
            None => self.message.as_bytes().to_vec(),
            Some(Payload::Random { size, seed }) => random_bytes(*size, *seed),
            Some(Payload::File { path, base64 }) => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(|e| anyhow::anyhow!("--message-file {path}: {e}"))?,
        })
    }

    /// How the message is described in the outputs.
    pub fn payload_name(&self) -> String {
        match &self.payload {
            None => self.message.clone(),
            Some(Payload::Random { size, seed }) => format!("{size} random bytes (seed {seed})"),
            Some(Payload::File { path, .. }) => format!("file {path}"),
        }
    }

    /// The local address connection `id` binds to, if any were given.
    pub fn source_ip(&self, id: u64) -> Option<IpAddr> {
        (!self.source_ips.is_empty())
            .then(|| self.source_ips[(id % self.source_ips.len() as u64) as usize])
    }
}

/// One process's share of a run: connections `first_id .. first_id + connections`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardPlan {
    /// 0-based process number (shown in the Connections sheet).
    pub index: u32,
    /// How many processes share the run (each takes its part of the CPUs).
    pub processes: u32,
    pub first_id: u64,
    pub connections: u64,
    /// This process's part of the connect rate.
    pub connect_rate: f64,
    pub config: RunConfig,
}

/// Splits `config.connections` over `processes` shards as evenly as possible.
pub fn split(config: &RunConfig, processes: u64) -> Vec<ShardPlan> {
    let processes = processes.clamp(1, config.connections.max(1));
    let base = config.connections / processes;
    let extra = config.connections % processes;
    let mut first_id = 0;
    (0..processes)
        .map(|i| {
            let connections = base + u64::from(i < extra);
            let plan = ShardPlan {
                index: i as u32,
                processes: processes as u32,
                first_id,
                connections,
                connect_rate: config.connect_rate * connections as f64
                    / config.connections.max(1) as f64,
                config: config.clone(),
            };
            first_id += connections;
            plan
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(connections: u64) -> RunConfig {
        RunConfig {
            host: "127.0.0.1".into(),
            addr: "127.0.0.1:8005".parse().unwrap(),
            server_name: "127.0.0.1".into(),
            ca: None,
            message: "hi".into(),
            workload: Workload::Count(1),
            connections,
            connect_rate: 1000.0,
            rate: None,
            timeout_ms: 1000,
            source_ips: Vec::new(),
            tls_options: TlsOptions::default(),
            churn: None,
            max_connecting: 500,
            keepalive_ms: 0,
            payload: None,
        }
    }

    #[test]
    fn split_covers_every_connection_once() {
        let plans = split(&config(20_001), 3);
        let sizes: Vec<u64> = plans.iter().map(|p| p.connections).collect();
        assert_eq!(sizes, vec![6667, 6667, 6667]);
        let firsts: Vec<u64> = plans.iter().map(|p| p.first_id).collect();
        assert_eq!(firsts, vec![0, 6667, 13334]);
        let rate: f64 = plans.iter().map(|p| p.connect_rate).sum();
        assert!((rate - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn churn_sizes_for_the_connections_open_at_once() {
        let mut c = config(100_000);
        assert_eq!(c.open_at_once(), 100_000);
        c.churn = Some(Churn {
            rate: 1000.0,
            window_s: 100.0,
        });
        c.workload = Workload::DurationSecs(2.0);
        // 1000/s living 2 s (+1 s margin, +20 %).
        assert_eq!(c.open_at_once(), 3_600);
        c.workload = Workload::Count(5);
        assert_eq!(c.open_at_once(), 2_400);
        c.connections = 50;
        assert_eq!(c.open_at_once(), 50);
    }

    #[test]
    fn random_payloads_repeat_with_their_seed() {
        let mut c = config(1);
        c.payload = Some(Payload::Random {
            size: 1000,
            seed: 7,
        });
        let a = c.payload_bytes().unwrap();
        assert_eq!(a.len(), 1000);
        assert_eq!(a, c.payload_bytes().unwrap());
        assert_ne!(a, random_bytes(1000, 8));
        assert!(a.iter().any(|&b| b != a[0]), "not one repeated byte");
        assert_eq!(c.payload_name(), "1000 random bytes (seed 7)");
        c.payload = None;
        assert_eq!(c.payload_bytes().unwrap(), b"hi");
    }

    #[test]
    fn never_more_processes_than_connections() {
        assert_eq!(split(&config(2), 5).len(), 2);
        assert_eq!(split(&config(0), 5).len(), 1);
    }
}
