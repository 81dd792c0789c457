//! The access log: one line per finished connection (`--access-log PATH|-`), as text in the
//! spirit of HAProxy's `tcplog` or as JSON. A worker never waits for it: lines go through a
//! bounded queue to a writer thread of the worker's own, and a line that finds the queue full (a
//! slow or full disk) is dropped and counted, never a connection delayed. The writer reopens the
//! file when the worker gets SIGUSR1 (logrotate's `postrotate`), which the supervisor forwards.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::stats::Shared;

/// Lines a worker may have waiting for its writer before new ones are dropped.
pub const QUEUE_LINES: usize = 8192;

/// How lines are written.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Format {
    /// `TIME CLIENT LISTEN RULE BACKEND up=N down=N ms=N ENDING`
    #[default]
    Text,
    /// One JSON object per line with the same fields.
    Json,
}

/// One finished connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub listen: SocketAddr,
    /// The backend's rule name; `None` when no backend was chosen.
    pub rule: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
    /// How it ended: `client_fin`, `backend_fin`, `reset`, `idle_timeout`, `denied`,
    /// `no_backend`, `limit`, `bad_proxy_header`, `no_sni_route`, `bad_tls_hello`, `closed`.
    pub ending: &'static str,
    /// In a pool with bandwidth limits: (ms its directions were held back, bytes that passed
    /// after being held). Written only for such pools, so other lines keep their fields.
    pub throttled: Option<(u64, u64)>,
    /// The TLS server name the client asked for (pools with `sni=` rows only).
    pub sni: Option<&'a str>,
}

impl Record<'_> {
    /// The line, newline included.
    pub fn format(&self, format: Format) -> String {
        let time = chrono::DateTime::<chrono::Utc>::from(self.time)
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        let ms = self.duration.as_millis() as u64;
        match format {
            Format::Text => {
                let backend = self.backend.map_or("-".to_string(), |b| b.to_string());
                // A rule name is free text: spaces would split the field.
                let rule = self.rule.unwrap_or("-").replace(char::is_whitespace, "_");
                let throttled = self.throttled.map_or(String::new(), |(ms, bytes)| {
                    format!(" throttled_ms={ms} throttled_bytes={bytes}")
                });
                // Only SNI pools' lines carry the name, so other lines keep their fields.
                let sni = self.sni.map_or(String::new(), |n| format!(" sni={n}"));
                format!(
                    "{time} {} {} {rule} {backend} up={} down={} ms={ms} {}{throttled}{sni}\n",
                    self.client, self.listen, self.bytes_up, self.bytes_down, self.ending
                )
            }
            Format::Json => {
                let mut line = serde_json::json!({
                    "time": time,
                    "client": self.client.to_string(),
                    "listen": self.listen.to_string(),
                    "rule": self.rule,
                    "backend": self.backend.map(|b| b.to_string()),
                    "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down,
                    "duration_ms": ms,
                    "ending": self.ending,
                    "sni": self.sni,
                });
                if let Some((ms, bytes)) = self.throttled {
                    line["throttled_ms"] = ms.into();
                    line["throttled_bytes"] = bytes.into();
                }
                let mut line = line.to_string();
                line.push('\n');
                line
            }
        }
    }
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    pub fn parse(s: &str) -> Target {
        if s == "-" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(s))
        }
    }
}

/// A worker's end of its access log.
pub struct AccessLog {
    tx: SyncSender<String>,
    pub format: Format,
}

impl AccessLog {
    /// Opens `target` (so a bad path fails at start, not silently later) and starts the writer.
    /// `shared` is the writer's own view of the counters; `reopen` is set by SIGUSR1.
    pub fn start(
        target: Target,
        format: Format,
        shared: Shared,
        reopen: Arc<AtomicBool>,
    ) -> io::Result<AccessLog> {
        let sink = Sink::open(&target)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, sink, target, shared, reopen))?;
        Ok(AccessLog { tx, format })
    }

    /// Queues a line; when the queue is full the line is dropped and counted.
    pub fn write(&self, record: &Record, shared: &Shared) {
        match self.tx.try_send(record.format(self.format)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                shared.header().access_log_dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

enum Sink {
    Stdout(io::Stdout),
    File(io::BufWriter<File>),
}

impl Sink {
    fn open(target: &Target) -> io::Result<Sink> {
        Ok(match target {
            Target::Stdout => Sink::Stdout(io::stdout()),
            Target::File(path) => Sink::File(io::BufWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
        })
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Sink::Stdout(s) => s.lock().write_all(line.as_bytes()),
            Sink::File(f) => f.write_all(line.as_bytes()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(s) => s.flush(),
            Sink::File(f) => f.flush(),
        }
    }
}

/// The writer thread: writes what arrives, flushes when the queue is empty (so a line is on disk
/// within moments of its connection ending), reopens on request. A failed write (disk full)
/// counts the line as dropped; the thread carries on.
fn write_lines(
    rx: Receiver<String>,
    mut sink: Sink,
    target: Target,
    shared: Shared,
    reopen: Arc<AtomicBool>,
) {
    let dropped = |n: u64| {
        shared.header().access_log_dropped.fetch_add(n, Relaxed);
    };
    loop {
        let next = rx.recv_timeout(Duration::from_millis(200));
        // Checked after the wait too, so a line that ends a quiet spell goes to the new file.
        if reopen.swap(false, Relaxed) {
            let _ = sink.flush();
            match Sink::open(&target) {
                Ok(s) => sink = s,
                Err(e) => tracing::warn!("access log: cannot reopen: {e}"),
            }
        }
        match next {
            Ok(line) => {
                if sink.write_line(&line).is_err() {
                    dropped(1);
                }
                while let Ok(line) = rx.try_recv() {
                    if sink.write_line(&line).is_err() {
                        dropped(1);
                    }
                }
                let _ = sink.flush();
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = sink.flush();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_720_000_123),
            client: "127.0.0.5:40000".parse().unwrap(),
            listen: "0.0.0.0:8080".parse().unwrap(),
            rule: Some("web 1"),
            backend: Some("127.0.0.1:9001".parse().unwrap()),
            bytes_up: 5,
            bytes_down: 12,
            duration: Duration::from_millis(3),
            ending: "client_fin",
            throttled: None,
            sni: None,
        }
    }

    #[test]
    fn text_and_json_lines_carry_every_field() {
        assert_eq!(
            record().format(Format::Text),
            "2025-12-03T00:00:00.123Z 127.0.0.5:40000 0.0.0.0:8080 web_1 127.0.0.1:9001 up=5 down=12 ms=3 client_fin\n"
        );
        let v: serde_json::Value = serde_json::from_str(&record().format(Format::Json)).unwrap();
        assert_eq!(v["rule"], "web 1");
        assert_eq!(v["bytes_down"], 12);
        assert_eq!(v["ending"], "client_fin");
        let denied = Record {
            rule: None,
            backend: None,
            ending: "denied",
            ..record()
        };
        assert!(denied
            .format(Format::Text)
            .ends_with(" - - up=5 down=12 ms=3 denied\n"));
        let v: serde_json::Value = serde_json::from_str(&denied.format(Format::Json)).unwrap();
        assert!(v["backend"].is_null());
        let limited = Record {
            throttled: Some((250, 4096)),
            ..record()
        };
        assert!(limited
            .format(Format::Text)
            .ends_with(" client_fin throttled_ms=250 throttled_bytes=4096\n"));
        let v: serde_json::Value = serde_json::from_str(&limited.format(Format::Json)).unwrap();
        assert_eq!(v["throttled_ms"], 250);
        assert!(v.get("throttled_ms").is_some());
        let named = Record {
            sni: Some("a.test"),
            ..record()
        };
        assert!(named
            .format(Format::Text)
            .ends_with(" client_fin sni=a.test\n"));
        let v: serde_json::Value = serde_json::from_str(&named.format(Format::Json)).unwrap();
        assert_eq!(v["sni"], "a.test");
    }

    #[test]
    fn lines_reach_the_file_and_a_reopen_follows_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let shared = Shared::create().unwrap();
        // SAFETY: dup gives the writer its own descriptor of the mapping.
        let view = unsafe { Shared::from_inherited(libc::dup(shared.raw_fd())) }.unwrap();
        let reopen = Arc::new(AtomicBool::new(false));
        let log = AccessLog::start(
            Target::File(path.clone()),
            Format::Text,
            view,
            Arc::clone(&reopen),
        )
        .unwrap();
        log.write(&record(), &shared);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path).unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        reopen.store(true, Relaxed);
        while reopen.load(Relaxed) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        log.write(&record(), &shared);
        while !path.exists() || std::fs::read_to_string(&path).unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("access.log.1"))
                .unwrap()
                .lines()
                .count(),
            1
        );
        assert_eq!(shared.header().access_log_dropped.load(Relaxed), 0);
    }
}
