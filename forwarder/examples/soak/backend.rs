//! The bulk backend: reads a connection's header, sends its id and the requested stream, and
//! checks the client's stream, both at once. `FLAG_HOLD` connections only get the id and are held
//! (the descriptor-budget fault fills the forwarder with them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::exchange::{both, check_stream, lost, send_stream};
use crate::record::{Failure, Recorder};
use crate::stream::{self, Header, FLAG_HOLD, FLAG_SLOW_BACKEND, HEADER_LEN};

/// A header must arrive within this long, or the connection is a loss ("timeout").
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest one stream may take; bounded so nothing hangs forever.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args, Debug)]
pub struct BackendArgs {
    /// Address to listen on (loopback)
    #[arg(long)]
    listen: SocketAddr,
    /// This backend's id, sent first on every connection
    #[arg(long)]
    id: u64,
    /// Where the summary and the events go
    #[arg(long)]
    out: String,
    /// Exit after this long, whatever happens
    #[arg(long, default_value_t = 7200)]
    max_seconds: u64,
}

pub fn run(args: BackendArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.listen)?;
    testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let rec = Arc::new(Recorder::create(&args.out, &format!("backend{}", args.id))?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let sock = tokio::net::TcpSocket::new_v4()?;
        // A backend restarted by the soak takes its port back at once.
        sock.set_reuseaddr(true)?;
        sock.bind(args.listen)
            .with_context(|| format!("listening on {}", args.listen))?;
        let listener: TcpListener = sock.listen(4096)?;
        eprintln!("backend {} listening on {}", args.id, args.listen);
        let saver = Arc::clone(&rec);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                saver.save();
            }
        });
        let serve = async {
            loop {
                let (conn, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: pause instead of spinning.
                        eprintln!("backend {}: accept: {e}", args.id);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let rec = Arc::clone(&rec);
                let id = args.id;
                tokio::spawn(async move {
                    let backend = Some(id);
                    match tokio::time::timeout(CONNECTION_TIMEOUT, serve_one(conn, id, &rec)).await
                    {
                        Ok(Ok(true)) => rec.ok(),
                        Ok(Ok(false)) => {}
                        Ok(Err(f)) => rec.failed(&f, backend),
                        Err(_) => rec.failed(
                            &Failure::Lost("timeout", "stream took too long".into()),
                            backend,
                        ),
                    }
                });
            }
        };
        let term = async {
            let mut sig =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            sig.recv().await;
            anyhow::Ok(())
        };
        tokio::select! {
            _ = serve => {}
            r = term => r?,
            _ = tokio::time::sleep(Duration::from_secs(args.max_seconds)) => {}
        }
        rec.save();
        anyhow::Ok(())
    })
}

/// Serves one connection; Ok(false) for one that ended before its header (nothing to check).
async fn serve_one(mut conn: TcpStream, id: u64, rec: &Recorder) -> Result<bool, Failure> {
    let _ = conn.set_nodelay(true);
    let mut head = [0u8; HEADER_LEN];
    match tokio::time::timeout(HEADER_TIMEOUT, conn.read_exact(&mut head)).await {
        Err(_) => return Err(Failure::Lost("timeout", "no header".into())),
        // A connection closed before its header: a client given up in the kernel's queue, or a
        // killed forwarder worker's; it carried nothing, so nothing was lost.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Ok(Err(e)) => return Err(lost("reading the header")(e)),
        Ok(Ok(_)) => {}
    }
    let Some(h) = Header::decode(&head) else {
        return Err(Failure::Corrupt(format!("not a soak header: {head:02x?}")));
    };
    conn.write_all(&id.to_be_bytes())
        .await
        .map_err(lost("sending the id"))?;
    let (mut r, mut w) = conn.into_split();
    if h.flags & FLAG_HOLD != 0 {
        // Held until the client closes; it sends nothing more. These are the descriptor fault's
        // instrument, not traffic: a holder that gave up on a connection still queued in the
        // forwarder resets it once the forwarder relays our id, and that is no loss.
        let _ = check_stream(&mut r, h.seed, 0, false, rec).await;
        return Ok(false);
    }
    let slow = h.flags & FLAG_SLOW_BACKEND != 0;
    both(
        send_stream(&mut w, stream::down_seed(h.seed), h.down_len, rec),
        check_stream(&mut r, h.seed, h.up_len, slow, rec),
    )
    .await
    .map(|_| true)
}
