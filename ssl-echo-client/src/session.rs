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
use crate::recorder::{micros, Answer, Recorder};
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
    /// With `--rate`: the same, measured from each message's intended send time.
    #[serde(default)]
    pub corrected_us_min: Option<u64>,
    #[serde(default)]
    pub corrected_us_sum: u64,
    #[serde(default)]
    pub corrected_us_max: Option<u64>,
    /// With `--rate`: scheduled sends this connection never completed because it failed (the
    /// message in flight included).
    #[serde(default)]
    pub sends_failed: u64,
    /// Keep-alive messages echoed while waiting at the barrier (`--keepalive-s`).
    #[serde(default)]
    pub keepalives: u64,
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
            corrected_us_min: None,
            corrected_us_sum: 0,
            corrected_us_max: None,
            sends_failed: 0,
            keepalives: 0,
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

    /// The average from the intended send time (with `--rate`), unanswered sends excluded.
    pub fn corrected_ms_avg(&self) -> Option<f64> {
        (self.messages > 0 && self.corrected_us_max.is_some())
            .then(|| self.corrected_us_sum as f64 / self.messages as f64 / 1000.0)
    }

    fn note_response(&mut self, us: u64, corrected_us: Option<u64>) {
        self.messages += 1;
        self.response_us_sum += us;
        self.response_us_min = Some(self.response_us_min.map_or(us, |m| m.min(us)));
        self.response_us_max = Some(self.response_us_max.map_or(us, |m| m.max(us)));
        if let Some(c) = corrected_us {
            self.corrected_us_sum += c;
            self.corrected_us_min = Some(self.corrected_us_min.map_or(c, |m| m.min(c)));
            self.corrected_us_max = Some(self.corrected_us_max.map_or(c, |m| m.max(c)));
        }
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
    /// The bytes every message carries (`--message`, `--message-file` or `--size`), built once.
    pub payload: Arc<[u8]>,
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
    let go_at = match wait_for_go(&mut stream, &mut go, &mut record, &shared).await {
        // Churn: the lifetime counts from this connection's own handshake.
        Ok(Some(_)) if shared.config.churn.is_some() => Instant::now(),
        Ok(Some(at)) => at,
        Ok(None) => {
            record.failure = Some(Failure::new(
                Cause::Other,
                Phase::Exchange,
                "run abandoned before the barrier",
            ));
            shared.recorder.closed();
            return record;
        }
        Err(failure) => {
            tracing::debug!(id, "at the barrier: {failure}");
            shared.recorder.closed();
            record.failure = Some(failure);
            return record;
        }
    };
    // The parent sets the backends (if it asked the forwarder) before it gives the go.
    let backend = shared.recorder.backends().map(|map| {
        let slot = map.slot_of(local);
        record.backend = Some(map.name(slot).to_string());
        slot
    });
    let exchanged = exchange(&mut stream, &mut record, go_at, backend, &shared).await;
    let ended = Instant::now();
    shared.recorder.sending_ended(match shared.config.workload {
        Workload::DurationSecs(s) => ended.min(go_at + Duration::from_secs_f64(s)),
        Workload::Count(_) => ended,
    });
    if let Err(failure) = exchanged {
        tracing::debug!(id, "{failure}");
        shared.recorder.exchange_failed(id, Instant::now());
        record.failure = Some(failure);
    } else {
        // An orderly close (TLS close_notify, then FIN), bounded so a stuck peer cannot hold the
        // run open.
        let _ = tokio::time::timeout(shared.config.timeout(), stream.shutdown()).await;
    }
    shared.recorder.closed();
    record
}

/// Waits at the barrier for the go (`None`: the run was abandoned). With `--keepalive-s`, an
/// open connection sends one message every so often while it waits and checks its echo, so a
/// gateway's idle timeout does not cut the connections that opened first while the last ones
/// are still being opened. Keep-alive messages are counted apart (`keepalives`), not in the
/// figures; one that fails loses the connection.
async fn wait_for_go(
    stream: &mut Stream,
    go: &mut watch::Receiver<Option<Instant>>,
    record: &mut ConnectionRecord,
    shared: &Shared,
) -> Result<Option<Instant>, Failure> {
    let every = Duration::from_millis(shared.config.keepalive_ms);
    loop {
        let waited = async {
            match go.wait_for(|v| v.is_some()).await {
                // wait_for returns a value for which the predicate held.
                Ok(v) => Some(v.expect("wait_for returned a Some")),
                Err(_) => None,
            }
        };
        if every.is_zero() {
            return Ok(waited.await);
        }
        tokio::select! {
            at = waited => return Ok(at),
            _ = tokio::time::sleep(every) => {}
        }
        let message = &shared.payload[..];
        let mut echo = vec![0u8; message.len()];
        // Not this connection's record: keep-alive bytes are not the run's figures.
        let mut scratch = ConnectionRecord::new(record.id, record.process);
        match tokio::time::timeout(
            shared.config.timeout(),
            echo_once(stream, message, &mut echo, &mut scratch),
        )
        .await
        {
            Ok(Ok(())) => record.keepalives += 1,
            Ok(Err(failure)) => return Err(failure),
            Err(_) => return Err(Failure::timeout(Phase::Exchange, shared.config.timeout_ms)),
        }
    }
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
    let message = &shared.payload[..];
    let mut echo = vec![0u8; message.len()];
    let (count, deadline) = match config.workload {
        Workload::Count(m) => (m, None),
        Workload::DurationSecs(s) => (u64::MAX, Some(go + Duration::from_secs_f64(s))),
    };
    let interval = config.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    // Spread scheduled connections over one interval (golden-ratio offsets by id) so they do not
    // all send in the same millisecond.
    let schedule = interval.map(|iv| Schedule {
        start: go + iv.mul_f64((record.id as f64 * 0.618_033_988_75).fract()),
        interval: iv,
        count,
        deadline,
    });
    let timeout = config.timeout();
    let mut stop = shared.stop.clone();
    let mut k: u64 = 0;
    // With a schedule, every send from `k` on that the connection will not make counts as
    // failed: the corrected tail is not cut off when a connection dies.
    let fail = |k: u64, record: &mut ConnectionRecord, failure: Failure| {
        if let Some(s) = &schedule {
            let due: Vec<Instant> = s.due_from(k).collect();
            record.sends_failed += due.len() as u64;
            shared
                .recorder
                .sends_failed(record.id, due.into_iter(), timeout, backend);
        }
        Err(failure)
    };
    while k < count && !*stop.borrow() {
        let intended = match &schedule {
            Some(s) => {
                let Some(at) = s.at(k) else { break };
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = stop.changed() => break,
                }
                Some(at)
            }
            None => {
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
                let corrected = intended.map(|i| done - i);
                record.note_response(micros(response), corrected.map(micros));
                shared.recorder.message(Answer {
                    conn: record.id,
                    at: done,
                    response,
                    corrected,
                    backend,
                    drained: deadline.is_some_and(|d| done > d),
                });
            }
            Ok(Err(failure)) => return fail(k, record, failure),
            Err(_) => {
                return fail(
                    k,
                    record,
                    Failure::timeout(Phase::Exchange, config.timeout_ms),
                )
            }
        }
        k += 1;
    }
    Ok(())
}

/// A connection's send schedule under `--rate`: message `k` is due at `start + k * interval`,
/// for `k < count` and before the deadline (`--duration`).
struct Schedule {
    start: Instant,
    interval: Duration,
    count: u64,
    deadline: Option<Instant>,
}

impl Schedule {
    /// When message `k` is due, or `None` past the end of the schedule.
    fn at(&self, k: u64) -> Option<Instant> {
        if k >= self.count {
            return None;
        }
        let at = self.start + self.interval.mul_f64(k as f64);
        self.deadline.is_none_or(|d| at < d).then_some(at)
    }

    /// Every due time from message `k` to the end of the schedule.
    fn due_from(&self, k: u64) -> impl Iterator<Item = Instant> + '_ {
        (k..).map_while(|k| self.at(k))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_ends_at_its_count_or_its_deadline() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let by_count = Schedule {
            start,
            interval: ms(100),
            count: 3,
            deadline: None,
        };
        let due: Vec<Duration> = by_count.due_from(0).map(|t| t - start).collect();
        assert_eq!(due, [ms(0), ms(100), ms(200)]);
        assert_eq!(by_count.due_from(2).count(), 1);
        assert_eq!(by_count.due_from(3).count(), 0);
        let by_deadline = Schedule {
            start,
            interval: ms(100),
            count: u64::MAX,
            deadline: Some(start + ms(1000)),
        };
        // Due at 0, 100, ... 900 ms: the one at exactly 1000 ms is past the end.
        assert_eq!(by_deadline.due_from(0).count(), 10);
        assert_eq!(by_deadline.due_from(4).count(), 6);
        assert!(by_deadline.at(10).is_none());
    }
}
