//! The descriptor-budget fault: open idle connections through the forwarder until it stops
//! taking them (its workers hold their share of descriptors and pause accepting; connects then
//! wait in the kernel's queue), hold them a few seconds, close them all. And `probe`: one small
//! exchange, to check that a port forwards (or does not) after a reload.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stream::{self, Header, FLAG_HOLD, ID_LEN};

/// A connection the forwarder has not answered within this long is waiting in the queue.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
const BATCH: usize = 500;

#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// The forwarder port whose pool holds the soak backends
    #[arg(long)]
    addr: SocketAddr,
    /// Most connections to open (this process's own descriptors bound it)
    #[arg(long, default_value_t = 19_000)]
    max: usize,
    /// Local address to connect from: two holders from two addresses get past the ~28,000
    /// ephemeral ports one source has towards one destination
    #[arg(long, default_value = "127.0.0.1")]
    source: std::net::IpAddr,
    /// Seconds to hold them once the forwarder is full
    #[arg(long, default_value_t = 3.0)]
    hold_seconds: f64,
}

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Address to try
    #[arg(long)]
    addr: SocketAddr,
}

enum Opened {
    Answered(TcpStream),
    Waiting(TcpStream),
    Failed,
}

async fn open(addr: SocketAddr, source: std::net::IpAddr, seed: u64) -> Opened {
    let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
        return Opened::Failed;
    };
    if sock.bind(SocketAddr::new(source, 0)).is_err() {
        return Opened::Failed;
    }
    let Ok(Ok(mut c)) = tokio::time::timeout(ANSWER_TIMEOUT, sock.connect(addr)).await else {
        return Opened::Failed;
    };
    let h = Header {
        flags: FLAG_HOLD,
        seed,
        up_len: 0,
        down_len: 0,
    };
    if c.write_all(&h.encode()).await.is_err() {
        return Opened::Failed;
    }
    let mut id = [0u8; ID_LEN];
    match tokio::time::timeout(ANSWER_TIMEOUT, c.read_exact(&mut id)).await {
        Ok(Ok(_)) => Opened::Answered(c),
        Ok(Err(_)) => Opened::Failed,
        Err(_) => Opened::Waiting(c),
    }
}

pub fn hold(args: HoldArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.addr)?;
    anyhow::ensure!(
        args.source.is_loopback(),
        "{} is not a loopback address",
        args.source
    );
    let limit = testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let max = args.max.min(limit.soft as usize - 100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (mut answered, mut waiting, mut failed) = (Vec::new(), Vec::new(), 0usize);
        // Batches until one has connections the forwarder does not answer (they wait in its full
        // accept queue) or that cannot even connect (the queue overflowed): it is full.
        while answered.len() + waiting.len() < max && waiting.is_empty() && failed == 0 {
            let n = BATCH.min(max - answered.len() - waiting.len());
            let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(open(args.addr, args.source, i as u64))).collect();
            for t in tasks {
                match t.await {
                    Ok(Opened::Answered(c)) => answered.push(c),
                    Ok(Opened::Waiting(c)) => waiting.push(c),
                    _ => failed += 1,
                }
            }
        }
        println!(
            "{}",
            serde_json::json!({"answered": answered.len(), "waiting": waiting.len(), "failed": failed,
                               "full": !waiting.is_empty() || failed > 0})
        );
        tokio::time::sleep(Duration::from_secs_f64(args.hold_seconds)).await;
    });
    Ok(())
}

/// Exit 0 when one 1,000-byte exchange each way through `addr` is exact.
pub fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.addr)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let work = async {
            let mut c = TcpStream::connect(args.addr).await?;
            let h = Header {
                flags: 0,
                seed: 42,
                up_len: 1000,
                down_len: 1000,
            };
            let mut up = vec![0u8; 1000];
            stream::fill(h.seed, 0, &mut up);
            c.write_all(&h.encode()).await?;
            c.write_all(&up).await?;
            c.shutdown().await?;
            let mut back = Vec::new();
            c.read_to_end(&mut back).await?;
            anyhow::ensure!(
                back.len() == ID_LEN + 1000,
                "got {} bytes, expected {}",
                back.len(),
                ID_LEN + 1000
            );
            anyhow::ensure!(
                stream::matches(stream::down_seed(h.seed), 0, &back[ID_LEN..]),
                "wrong bytes"
            );
            println!("backend {}", u64::from_be_bytes(back[..ID_LEN].try_into()?));
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(5), work)
            .await
            .context("timed out")?
    })
}
