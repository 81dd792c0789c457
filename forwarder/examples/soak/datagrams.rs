//! UDP through the forwarder: an echo backend, and sessions that each send one datagram at a time
//! (0 bytes to 60,000, every byte derived from the session's seed and the sequence number), wait
//! for its echo and check it whole. A reply that is not the datagram sent, or that carries another
//! session's id, is corrupt (a split, a truncation, one client's datagram handed to another); a
//! datagram whose echo does not come within `REPLY_TIMEOUT` is lost, with its time, for the
//! script to match to a fault. A late echo of a lost one is counted and skipped.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::record::{now_ms, Failure, Recorder};

const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest datagram a session sends; the forwarder passes up to 65,507 whole (its tests).
const MAX_DATAGRAM: usize = 60_000;
/// Session id and sequence number lead every datagram that has room for them.
const TAG_LEN: usize = 16;
/// A pause between one echo and the next send: about 100 datagrams a second per session.
const PAUSE: Duration = Duration::from_millis(10);

#[derive(clap::Args, Debug)]
pub struct UdpEchoArgs {
    /// Address to listen on (loopback)
    #[arg(long)]
    listen: SocketAddr,
    /// Exit after this long, whatever happens
    #[arg(long, default_value_t = 7200)]
    max_seconds: u64,
}

#[derive(clap::Args, Debug)]
pub struct UdpArgs {
    /// The forwarder's UDP port whose pool holds the echo backends
    #[arg(long)]
    addr: SocketAddr,
    /// Sessions (client sockets) running at once
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    /// Seconds to keep sending
    #[arg(long)]
    seconds: f64,
    /// Where the summary and the events go
    #[arg(long)]
    out: String,
}

/// Echoes every datagram to its sender, until `max_seconds`.
pub fn echo(args: UdpEchoArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.listen)?;
    let sock =
        UdpSocket::bind(args.listen).with_context(|| format!("binding UDP {}", args.listen))?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    eprintln!("udp echo listening on {}", args.listen);
    let stop = Instant::now() + Duration::from_secs(args.max_seconds);
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < stop {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                // A full buffer drops the echo; the client counts it lost, as it would be.
                let _ = sock.send_to(&buf[..n], from);
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
    Ok(())
}

/// Runs the sessions for `seconds`, then writes the summary.
pub fn run(args: UdpArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.addr)?;
    let rec = Arc::new(Recorder::create(&args.out, "udp")?);
    let stop = Instant::now() + Duration::from_secs_f64(args.seconds);
    let sessions: Vec<_> = (0..args.sessions)
        .map(|i| {
            let rec = Arc::clone(&rec);
            let addr = args.addr;
            // The pid keeps the warm-up's sessions apart from the soak's.
            let id = (u64::from(std::process::id()) << 16) | i as u64;
            std::thread::spawn(move || session(id, addr, stop, &rec))
        })
        .collect();
    let saver = {
        let rec = Arc::clone(&rec);
        std::thread::spawn(move || {
            while Instant::now() < stop {
                std::thread::sleep(Duration::from_secs(1));
                rec.save();
            }
        })
    };
    for s in sessions {
        s.join()
            .map_err(|_| anyhow::anyhow!("a UDP session panicked"))??;
    }
    let _ = saver.join();
    rec.save();
    Ok(())
}

fn session(id: u64, addr: SocketAddr, stop: Instant, rec: &Recorder) -> anyhow::Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0").context("binding a session socket")?;
    sock.connect(addr)
        .with_context(|| format!("connecting to {addr}"))?;
    let seed = fastrand::u64(..) ^ id;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut reply = vec![0u8; 65_536];
    let mut seq = 0u64;
    while Instant::now() < stop {
        seq += 1;
        // Mostly small, now and then large: the sizes games, DNS and tunnels send.
        let len = match rng.u8(0..10) {
            0 => 0,
            1 => rng.usize(1_500..=MAX_DATAGRAM),
            _ => rng.usize(TAG_LEN..=1_400),
        };
        let sent = datagram(id, seed, seq, len);
        if let Err(e) = sock.send(&sent) {
            // Refused: the port-unreachable of a moment with no listener (a worker restarting).
            rec.failed(
                &Failure::Lost(crate::record::cause_of(&e), format!("sending #{seq}: {e}")),
                None,
            );
            std::thread::sleep(PAUSE);
            continue;
        }
        rec.sent(sent.len());
        match await_echo(&sock, &sent, id, seq, &mut reply, rec) {
            Ok(()) => {
                rec.verified(sent.len());
                rec.ok();
            }
            Err(f) => rec.failed(&f, None),
        }
        std::thread::sleep(PAUSE);
    }
    Ok(())
}

/// Waits for the echo of datagram `seq`; echoes of earlier (lost) ones are skipped.
fn await_echo(
    sock: &UdpSocket,
    sent: &[u8],
    id: u64,
    seq: u64,
    reply: &mut [u8],
    rec: &Recorder,
) -> Result<(), Failure> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Lost(
                "timeout",
                format!(
                    "no echo of #{seq} ({} bytes) within {REPLY_TIMEOUT:?}",
                    sent.len()
                ),
            ));
        }
        let _ = sock.set_read_timeout(Some(left));
        let n = match sock.recv(reply) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => {
                return Err(Failure::Lost(
                    crate::record::cause_of(&e),
                    format!("waiting for #{seq}: {e}"),
                ))
            }
        };
        let got = &reply[..n];
        if got == sent {
            return Ok(());
        }
        match tag_of(got) {
            Some((other, _)) if other != id => {
                return Err(Failure::Corrupt(format!(
                    "session {id} got a datagram of session {other}"
                )))
            }
            Some((_, earlier)) if earlier < seq && n >= TAG_LEN => rec.late(),
            _ if n == 0 => rec.late(), // the echo of an earlier empty datagram
            _ => {
                return Err(Failure::Corrupt(format!(
                    "#{seq}: sent {} bytes, got {n} that differ (at {} ms)",
                    sent.len(),
                    now_ms()
                )))
            }
        }
    }
}

/// Datagram `seq` of a session: its id and `seq`, then bytes from the seed (shorter ones are
/// the seeded bytes alone).
fn datagram(id: u64, seed: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut d: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
    if len >= TAG_LEN {
        d[..8].copy_from_slice(&id.to_be_bytes());
        d[8..16].copy_from_slice(&seq.to_be_bytes());
    }
    d
}

fn tag_of(d: &[u8]) -> Option<(u64, u64)> {
    let id = u64::from_be_bytes(d.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(d.get(8..16)?.try_into().ok()?);
    Some((id, seq))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
