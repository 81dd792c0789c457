//! The soak's clients: bulk streams (both ways, some half-closed early by one side, some with a
//! slow reader at either end) and connection churn (connect, 100 bytes each way, close), each a
//! loop that starts a new connection when the last one ends, until the duration is over. Then
//! the connections in flight finish and the summary is written.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::exchange::{both, check_stream, lost, send_stream};
use crate::record::{Failure, Recorder};
use crate::stream::{self, Header, FLAG_SLOW_BACKEND, ID_LEN};

/// Long enough for a connection to wait out a stalled backend or a full forwarder (the faults
/// last seconds), short enough that a hung one shows up as a loss.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug)]
pub struct TrafficArgs {
    /// The forwarder port whose pool holds the soak backends
    #[arg(long)]
    addr: SocketAddr,
    /// Bulk streams running at once
    #[arg(long, default_value_t = 16)]
    bulk: usize,
    /// Churn loops running at once
    #[arg(long, default_value_t = 8)]
    churn: usize,
    /// Largest stream in one direction, bytes
    #[arg(long, default_value_t = 4 << 20)]
    max_bytes: u64,
    /// Seconds to keep starting connections
    #[arg(long)]
    seconds: f64,
    /// Where the summaries and the events go
    #[arg(long)]
    out: String,
}

/// The shapes of a bulk stream, picked in turn.
#[derive(Debug, Clone, Copy)]
enum Shape {
    BothWays,
    /// The client sends its FIN at once; the backend keeps sending.
    ClientFinFirst,
    /// The backend sends a little and its FIN; the client keeps sending.
    BackendFinFirst,
    SlowClientReader,
    SlowBackendReader,
}

const SHAPES: [Shape; 5] = [
    Shape::BothWays,
    Shape::ClientFinFirst,
    Shape::BackendFinFirst,
    Shape::SlowClientReader,
    Shape::SlowBackendReader,
];

pub fn run(args: TrafficArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.addr)?;
    testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let bulk = Arc::new(Recorder::create(&args.out, "bulk")?);
    let churn = Arc::new(Recorder::create(&args.out, "churn")?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stop = Instant::now() + Duration::from_secs_f64(args.seconds);
    rt.block_on(async {
        for r in [&bulk, &churn] {
            let r = Arc::clone(r);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    r.save();
                }
            });
        }
        let mut loops = Vec::new();
        for i in 0..args.bulk {
            let rec = Arc::clone(&bulk);
            let (addr, max) = (args.addr, args.max_bytes.max(1024));
            loops.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(
                    i as u64 * 7919 + stream::down_seed(std::process::id() as u64),
                );
                let mut n = i;
                while Instant::now() < stop {
                    let shape = SHAPES[n % SHAPES.len()];
                    n += 1;
                    let big = rng.u64(max / 4..=max);
                    let (up, down, flags, slow) = match shape {
                        Shape::BothWays => (big, rng.u64(max / 4..=max), 0, false),
                        Shape::ClientFinFirst => (0, big, 0, false),
                        Shape::BackendFinFirst => (big, 4096, 0, false),
                        Shape::SlowClientReader => (4096, big / 2, 0, true),
                        Shape::SlowBackendReader => (big / 2, 4096, FLAG_SLOW_BACKEND, false),
                    };
                    let h = Header {
                        flags,
                        seed: rng.u64(..),
                        up_len: up,
                        down_len: down,
                    };
                    one(addr, h, slow, &rec).await;
                }
            }));
        }
        for i in 0..args.churn {
            let rec = Arc::clone(&churn);
            let addr = args.addr;
            loops.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(i as u64 + 1000 * std::process::id() as u64);
                while Instant::now() < stop {
                    let h = Header {
                        flags: 0,
                        seed: rng.u64(..),
                        up_len: 100,
                        down_len: 100,
                    };
                    one(addr, h, false, &rec).await;
                    // Bounded rate: at most ~50 connections a second per loop.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        for l in loops {
            let _ = l.await;
        }
    });
    bulk.save();
    churn.save();
    Ok(())
}

/// One connection, counted in `rec` as ok, lost (with its cause and backend) or corrupt.
async fn one(addr: SocketAddr, h: Header, slow: bool, rec: &Recorder) {
    let mut backend = None;
    let result =
        tokio::time::timeout(STREAM_TIMEOUT, exchange(addr, h, slow, rec, &mut backend)).await;
    match result {
        Ok(Ok(())) => rec.ok(),
        Ok(Err(f)) => rec.failed(&f, backend),
        Err(_) => rec.failed(
            &Failure::Lost(
                "timeout",
                format!("stream of {h:?} took over {STREAM_TIMEOUT:?}"),
            ),
            backend,
        ),
    }
}

async fn exchange(
    addr: SocketAddr,
    h: Header,
    slow: bool,
    rec: &Recorder,
    backend: &mut Option<u64>,
) -> Result<(), Failure> {
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => return Err(Failure::Lost("timeout", "connect".into())),
        Ok(c) => c.map_err(lost("connecting"))?,
    };
    let _ = conn.set_nodelay(true);
    let (mut r, mut w) = conn.into_split();
    w.write_all(&h.encode())
        .await
        .map_err(lost("sending the header"))?;
    let mut id = [0u8; ID_LEN];
    let send = send_stream(&mut w, h.seed, h.up_len, rec);
    let check = async {
        r.read_exact(&mut id)
            .await
            .map_err(lost("reading the backend id"))?;
        *backend = Some(u64::from_be_bytes(id));
        check_stream(&mut r, stream::down_seed(h.seed), h.down_len, slow, rec).await
    };
    both(send, check).await
}
