//! One soak connection from either end: send our stream and a FIN, check every byte of the
//! peer's stream and its FIN at the exact length. The two directions run at once, so a FIN sent
//! early by one side (half-close) leaves the other side sending.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::record::{cause_of, Failure, Recorder};
use crate::stream;

const CHUNK: usize = 64 * 1024;
/// A slow reader takes this much at a time, then pauses.
const SLOW_READ: usize = 16 * 1024;
const SLOW_PAUSE: Duration = Duration::from_millis(5);

/// Sends `len` bytes of stream `seed`, then shuts down writing (the FIN).
pub async fn send_stream<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
    rec: &Recorder,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        stream::fill(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n]).await.map_err(lost("sending"))?;
        rec.sent(n);
        off += n as u64;
    }
    w.shutdown().await.map_err(lost("sending the FIN"))
}

/// Reads exactly `len` bytes of stream `seed`, checking each chunk, then expects the FIN.
pub async fn check_stream<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    len: u64,
    slow: bool,
    rec: &Recorder,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    loop {
        let want = if slow { SLOW_READ } else { CHUNK };
        let n = r.read(&mut buf[..want]).await.map_err(lost("receiving"))?;
        if n == 0 {
            if off == len {
                return Ok(());
            }
            return Err(Failure::Lost(
                "eof",
                format!("FIN after {off} of {len} bytes"),
            ));
        }
        let body = (len - off).min(n as u64) as usize;
        if !stream::matches(seed, off, &buf[..body]) {
            return Err(Failure::Corrupt(format!(
                "bytes {off}..{} differ from the stream",
                off + body as u64
            )));
        }
        if body < n {
            return Err(Failure::Corrupt(format!(
                "{} bytes past the stream's end ({len})",
                n - body
            )));
        }
        rec.verified(n);
        off += n as u64;
        if slow {
            tokio::time::sleep(SLOW_PAUSE).await;
        }
    }
}

/// Maps an I/O error to a loss with what we were doing.
pub fn lost(doing: &'static str) -> impl Fn(io::Error) -> Failure {
    move |e| Failure::Lost(cause_of(&e), format!("{doing}: {e}"))
}

/// Runs both directions; the first failure wins (a corruption over a loss: it is the worse).
pub async fn both(
    send: impl std::future::Future<Output = Result<(), Failure>>,
    check: impl std::future::Future<Output = Result<(), Failure>>,
) -> Result<(), Failure> {
    let (a, b) = tokio::join!(send, check);
    match (a, b) {
        (_, Err(e @ Failure::Corrupt(_))) => Err(e),
        (Err(e), _) | (_, Err(e)) => Err(e),
        _ => Ok(()),
    }
}
