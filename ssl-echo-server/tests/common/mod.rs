//! What the integration tests share: start the real server on a free loopback port with throwaway
//! certificates, TLS/plain clients (tokio), the stats file, and worker processes' memory.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use testbed_dev::testing::{free_port, wait_until, ChildGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub struct Server {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
    pub stats_file: PathBuf,
    pub certs: certs::CertPaths,
    pub dir: tempfile::TempDir,
}

/// Starts the server (TLS unless `--plain` is among `extra`) and waits until its workers are ready.
pub fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs::write_throwaway(&dir.path().join("certs"), &[]).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let stats_file = dir.path().join("stats.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ssl-echo-server"));
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--cert")
        .arg(&certs.server_cert)
        .arg("--key")
        .arg(&certs.server_key)
        .arg("--stats-file")
        .arg(&stats_file)
        .arg("--stats-interval")
        .arg("0.1")
        .args(extra)
        .env_remove("RUST_LOG");
    let guard = ChildGuard::spawn(cmd);
    assert!(
        guard.wait_for_output("workers ready", Duration::from_secs(20)),
        "server did not start:\n{}",
        guard.output()
    );
    Server {
        guard,
        addr,
        stats_file,
        certs,
        dir,
    }
}

impl Server {
    /// The latest stats file, parsed.
    pub fn stats(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.stats_file).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until `cond` holds for the stats file; panics with the last file if it never does.
    pub fn wait_stats(
        &self,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let ok = wait_until(Duration::from_secs(20), || cond(&self.stats()));
        assert!(ok, "stats never showed {what}: {}", self.stats());
        self.stats()
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        self.stats()["per_worker"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|w| w["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Resident memory of all worker processes, in KiB.
    pub fn workers_rss_kib(&self) -> u64 {
        self.worker_pids().iter().map(|&p| rss_kib(p)).sum()
    }

    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        let cfg = testbed::tls::client_config(&self.certs.ca_cert).unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    pub async fn connect_tls(&self) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        self.connector().connect(name, tcp).await.unwrap()
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Deterministic pseudo-random payload.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Sends `data` while reading the echo concurrently (the server's buffers are bounded, so a client
/// that wrote everything before reading would stall on large payloads), then returns what came
/// back before the server closed after our end of stream.
pub async fn echo_all<S>(stream: S, data: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let owned = data.to_vec();
    let writer = tokio::spawn(async move {
        for chunk in owned.chunks(7_919) {
            wr.write_all(chunk).await?;
        }
        wr.flush().await?;
        // TLS: sends close_notify; plain: FIN.
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut got = Vec::with_capacity(data.len());
    // read_to_end fails with UnexpectedEof if the server closes TLS without close_notify.
    rd.read_to_end(&mut got).await?;
    writer.await.unwrap()?;
    Ok(got)
}

/// Raises this test process's open-file limit so it can hold thousands of client sockets.
pub fn raise_fd_limit() -> u64 {
    testbed::fdlimit::raise_nofile().unwrap().soft
}
