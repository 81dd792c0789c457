//! A tiny tokio-rustls echo server with the same flags as `ssl-echo-server` (`--listen`, `--cert`,
//! `--key`, `--plain`, `--stats-file`), so the client's tests and benchmarks have a stand-in
//! while (or wherever) the real server is not built. Not a product: no workers, no limits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Default)]
struct Stats {
    connections_total: AtomicU64,
    connections_now: AtomicU64,
    bytes_echoed: AtomicU64,
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, stats: &Stats) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                    return;
                }
                stats.bytes_echoed.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    testbed::fdlimit::raise_nofile()?;
    let listen = flag(&args, "--listen").unwrap_or_else(|| "127.0.0.1:8005".into());
    let plain = args.iter().any(|a| a == "--plain");
    let tls = if plain {
        None
    } else {
        let cert = flag(&args, "--cert").unwrap_or_else(|| "certs/server.crt".into());
        let key = flag(&args, "--key").unwrap_or_else(|| "certs/server.key".into());
        let config = testbed::tls::server_config(cert.as_ref(), key.as_ref())?;
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    };
    let listener = TcpListener::from_std(testbed::listener::reuseport_listener(listen.parse()?)?)?;
    let stats = Arc::new(Stats::default());
    if let Some(path) = flag(&args, "--stats-file") {
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            loop {
                let json = format!(
                    "{{\"connections_total\":{},\"connections_now\":{},\"bytes_echoed\":{}}}",
                    stats.connections_total.load(Ordering::Relaxed),
                    stats.connections_now.load(Ordering::Relaxed),
                    stats.bytes_echoed.load(Ordering::Relaxed)
                );
                let tmp = format!("{path}.tmp");
                if std::fs::write(&tmp, json).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    eprintln!("tiny_echo listening on {listen}");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            stats.connections_total.fetch_add(1, Ordering::Relaxed);
            stats.connections_now.fetch_add(1, Ordering::Relaxed);
            match tls {
                None => echo(tcp, &stats).await,
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        echo(s, &stats).await;
                    }
                }
            }
            stats.connections_now.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
