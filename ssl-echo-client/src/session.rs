//! One connection's life: open it (phase 1), wait at the barrier, then send the message and wait
//! for its exact echo again and again (phase 2). Whatever happens ends in a [`ConnectionRecord`];
//! a failure is recorded in it, never raised.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::config::{RunConfig, Workload};
use crate::connector::{Connector, Stream};
use crate::failure::{Cause, Failure, Phase};
use crate::recorder::Recorder;
use crate::tls::Negotiated;

/// The report's row for one connection. Fixed size: memory per connection stays bounded however
/// many messages it exchanges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub id: u64,
    /// Which process ran it (0 when there was only one).
    pub process: u32,
    pub local_port: Option<u16>,
    /// The connection's own address (shown when `--source-ip` spreads them, and matched against
    /// the forwarder's list).
    #[serde(default)]
    pub local_ip: Option<IpAddr>,
    /// The client PC (agent) that ran it; set by the coordinator, `None` for a run on this PC.
    #[serde(default)]
    pub agent: Option<String>,
    /// The backend the forwarder connected it to (`unknown` when the forwarder did not list
    /// it); `None` without `--forwarder`.
    #[serde(default)]
    pub backend: Option<String>,
    pub connect_ms: Option<f64>,
    pub handshake_ms: Option<f64>,
    pub messages: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub response_us_min: Option<u64>,
    pub response_us_sum: u64,
    pub response_us_max: Option<u64>,
    pub failure: Option<Failure>,
    /// How phase 1 went beyond its timings (what TLS negotiated, the churn schedule); `None`
    /// when there is nothing to say. One box, so a record (and every message that carries one)
    /// stays small.
    #[serde(default)]
    pub opening: Option<Box<Opening>>,
}

impl ConnectionRecord {
    pub fn new(id: u64, process: u32) -> ConnectionRecord {
        ConnectionRecord {
            id,
            process,
            local_port: None,
            local_ip: None,
            agent: None,
            backend: None,
            connect_ms: None,
            handshake_ms: None,
            messages: 0,
            bytes_sent: 0,
            bytes_received: 0,
            response_us_min: None,
            response_us_sum: 0,
            response_us_max: None,
            failure: None,
            opening: None,
        }
    }

    /// When the handshake (or, for plain TCP, the connect) finished, in ms after the process's
    /// go; churn mode only and only for connections that got that far.
    pub fn established_ms(&self) -> Option<f64> {
        if !self.established() {
            return None;
        }
        Some(self.churn_start()?.started_ms + self.connect_ms? + self.handshake_ms.unwrap_or(0.0))
    }

    /// What the TLS handshake negotiated (`None` for plain TCP, or before the handshake).
    pub fn tls(&self) -> Option<&Negotiated> {
        self.opening.as_ref()?.tls.as_ref()
    }

    /// When a churn-mode connection started (`None` outside churn mode).
    pub fn churn_start(&self) -> Option<&ChurnStart> {
        self.opening.as_ref()?.churn.as_ref()
    }

    pub fn opening_mut(&mut self) -> &mut Opening {
        self.opening.get_or_insert_with(Box::default)
    }

    /// True when the connection got through phase 1.
    pub fn established(&self) -> bool {
        !matches!(&self.failure, Some(f) if f.phase != Phase::Exchange)
    }

    pub fn response_ms_avg(&self) -> Option<f64> {
        (self.messages > 0).then(|| self.response_us_sum as f64 / self.messages as f64 / 1000.0)
    }

    fn note_response(&mut self, us: u64) {
        self.messages += 1;
        self.response_us_sum += us;
        self.response_us_min = Some(self.response_us_min.map_or(us, |m| m.min(us)));
        self.response_us_max = Some(self.response_us_max.map_or(us, |m| m.max(us)));
    }
}

/// The details of a connection's phase 1 that not every run has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Opening {
    #[serde(default)]
    pub tls: Option<Negotiated>,
    #[serde(default)]
    pub churn: Option<ChurnStart>,
}

/// When a churn-mode connection started, in ms after its process's go, and how far behind its
/// schedule that was (the client's own lateness, not the server's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChurnStart {
    pub started_ms: f64,
    pub start_lag_ms: f64,
}

/// What every connection of one process shares.
pub struct Shared {
    pub config: RunConfig,
    pub connector: Connector,
    pub recorder: Arc<Recorder>,
    pub process: u32,
    /// Becomes true when the user asked to stop early (Ctrl-C): connections finish the message
    /// in flight and close.
    pub stop: watch::Receiver<bool>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs connection `id` from connect to close. `permit` limits how many connections are being
/// opened at once and is released as soon as this one is open (or failed); `go` carries the
/// barrier: the instant phase 2 starts, or a closed channel if the run was abandoned. In churn
/// mode there is no barrier: phase 2 starts as soon as the connection is open.
pub async fn run(
    id: u64,
    shared: Arc<Shared>,
    permit: Option<OwnedSemaphorePermit>,
    mut go: watch::Receiver<Option<Instant>>,
) -> ConnectionRecord {
    let mut record = ConnectionRecord::new(id, shared.process);
    let opened = shared
        .connector
        .open(
            shared.config.addr,
            shared.config.source_ip(id),
            shared.config.timeout(),
        )
        .await;
    drop(permit);
    let (mut stream, local) = match opened {
        Ok(est) => {
            record.local_port = Some(est.local.port());
            record.local_ip = Some(est.local.ip());
            record.connect_ms = Some(ms(est.connect));
            record.handshake_ms = est.handshake.map(ms);
            if let Some(n) = est.negotiated {
                record.opening_mut().tls = Some(n);
            }
            shared.recorder.phase1_done(true);
            (est.stream, est.local)
        }
        Err(not) => {
            tracing::debug!(id, "{}", not.failure);
            record.local_port = not.local_port;
            record.connect_ms = not.connect.map(ms);
            record.failure = Some(not.failure);
            shared.recorder.phase1_done(false);
            return record;
        }
    };
    let go_at = match go.wait_for(|v| v.is_some()).await {
        // Churn: the lifetime counts from this connection's own handshake.
        Ok(_) if shared.config.churn.is_some() => Instant::now(),
        Ok(v) => v.expect("wait_for returned a Some"),
        Err(_) => {
            record.failure = Some(Failure::new(
                Cause::Other,
                Phase::Exchange,
                "run abandoned before the barrier",
            ));
            shared.recorder.closed();
            return record;
        }
    };
    // The parent sets the backends (if it asked the forwarder) before it gives the go.
    let backend = shared.recorder.backends().map(|map| {
        let slot = map.slot_of(local);
        record.backend = Some(map.name(slot).to_string());
        slot
    });
    if let Err(failure) = exchange(&mut stream, &mut record, go_at, backend, &shared).await {
        tracing::debug!(id, "{failure}");
        shared.recorder.exchange_failed(Instant::now());
        record.failure = Some(failure);
    } else {
        // An orderly close (TLS close_notify, then FIN), bounded so a stuck peer cannot hold the
        // run open.
        let _ = tokio::time::timeout(shared.config.timeout(), stream.shutdown()).await;
    }
    shared.recorder.closed();
    record
}

/// Phase 2 for one connection: closed loop (send, wait, send) or, with `--rate`, sends on a
/// schedule and also measures from the intended send time (coordinated omission, as wrk2).
async fn exchange(
    stream: &mut Stream,
    record: &mut ConnectionRecord,
    go: Instant,
    backend: Option<usize>,
    shared: &Shared,
) -> Result<(), Failure> {
    let config = &shared.config;
    let message = config.message.as_bytes();
    let mut echo = vec![0u8; message.len()];
    let (count, deadline) = match config.workload {
        Workload::Count(m) => (m, None),
        Workload::DurationSecs(s) => (u64::MAX, Some(go + Duration::from_secs_f64(s))),
    };
    let interval = config.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    // Spread scheduled connections over one interval (golden-ratio offsets by id) so they do not
    // all send in the same millisecond.
    let schedule_start =
        interval.map(|iv| go + iv.mul_f64((record.id as f64 * 0.618_033_988_75).fract()));
    let timeout = config.timeout();
    let mut stop = shared.stop.clone();
    let mut k: u64 = 0;
    while k < count && !*stop.borrow() {
        let intended = match (interval, schedule_start) {
            (Some(iv), Some(start)) => {
                let at = start + iv * u32::try_from(k).unwrap_or(u32::MAX);
                if deadline.is_some_and(|d| at >= d) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = stop.changed() => break,
                }
                Some(at)
            }
            _ => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                None
            }
        };
        let sent = Instant::now();
        match tokio::time::timeout(timeout, echo_once(stream, message, &mut echo, record)).await {
            Ok(Ok(())) => {
                let done = Instant::now();
                let response = done - sent;
                record.note_response(
                    u64::try_from(response.as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
                shared
                    .recorder
                    .message(done, response, intended.map(|i| done - i), backend);
            }
            Ok(Err(failure)) => return Err(failure),
            Err(_) => return Err(Failure::timeout(Phase::Exchange, config.timeout_ms)),
        }
        k += 1;
    }
    Ok(())
}

/// Sends `message` and reads back exactly as many bytes, checking each as it arrives so a wrong
/// echo is reported at once instead of as a timeout.
async fn echo_once(
    stream: &mut Stream,
    message: &[u8],
    echo: &mut [u8],
    record: &mut ConnectionRecord,
) -> Result<(), Failure> {
    let io = |e: std::io::Error| Failure::io(Phase::Exchange, &e);
    stream.write_all(message).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    record.bytes_sent += message.len() as u64;
    let mut filled = 0;
    while filled < echo.len() {
        let n = stream.read(&mut echo[filled..]).await.map_err(io)?;
        if n == 0 {
            return Err(Failure::new(
                Cause::Eof,
                Phase::Exchange,
                format_args!(
                    "connection closed after {filled} of {} echoed bytes",
                    echo.len()
                ),
            ));
        }
        record.bytes_received += n as u64;
        let end = filled + n;
        if echo[filled..end] != message[filled..end] {
            return Err(Failure::new(
                Cause::WrongEcho,
                Phase::Exchange,
                format_args!(
                    "sent {:?}, got back {:?}",
                    String::from_utf8_lossy(&message[..end]),
                    String::from_utf8_lossy(&echo[..end])
                ),
            ));
        }
        filled = end;
    }
    Ok(())
}
