//! What a soak role saw: counters summed into a JSON summary (rewritten every second, so a role
//! killed with SIGKILL leaves its figures up to the last second), and one JSON line per lost or
//! corrupted connection with its time, so the script can match each loss to the fault it injected.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub connections_ok: u64,
    pub lost: BTreeMap<String, u64>,
    pub corrupt: u64,
    /// Bytes received and found equal to the expected stream.
    pub bytes_verified: u64,
    pub bytes_sent: u64,
    /// Datagrams that came back after their wait was over (already counted lost).
    pub late: u64,
}

pub struct Recorder {
    who: String,
    counts: Mutex<Counts>,
    events: Mutex<File>,
    summary: PathBuf,
}

/// How a connection ended badly; `Corrupt` is the one no injected fault can explain.
#[derive(Debug)]
pub enum Failure {
    Lost(&'static str, String),
    Corrupt(String),
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The cause name of an I/O error, as the soak's table groups them.
pub fn cause_of(e: &io::Error) -> &'static str {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | BrokenPipe | ConnectionAborted => "reset",
        ConnectionRefused => "refused",
        TimedOut => "timeout",
        UnexpectedEof => "eof",
        _ => "other",
    }
}

impl Recorder {
    /// Events go to `<dir>/<who>-<pid>.events.jsonl`, the summary to `<dir>/<who>-<pid>.json`
    /// (the pid keeps a restarted backend from overwriting its predecessor's figures).
    pub fn create(dir: &str, who: &str) -> io::Result<Recorder> {
        std::fs::create_dir_all(dir)?;
        let pid = std::process::id();
        let events = File::create(format!("{dir}/{who}-{pid}.events.jsonl"))?;
        Ok(Recorder {
            who: who.to_string(),
            counts: Mutex::new(Counts::default()),
            events: Mutex::new(events),
            summary: PathBuf::from(format!("{dir}/{who}-{pid}.json")),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn verified(&self, n: usize) {
        self.counts().bytes_verified += n as u64;
    }

    pub fn sent(&self, n: usize) {
        self.counts().bytes_sent += n as u64;
    }

    pub fn late(&self) {
        self.counts().late += 1;
    }

    pub fn ok(&self) {
        self.counts().connections_ok += 1;
    }

    pub fn failed(&self, failure: &Failure, backend: Option<u64>) {
        let (event, cause, detail) = match failure {
            Failure::Lost(cause, detail) => {
                *self.counts().lost.entry(cause.to_string()).or_default() += 1;
                ("lost", *cause, detail.as_str())
            }
            Failure::Corrupt(detail) => {
                self.counts().corrupt += 1;
                ("corrupt", "corrupt", detail.as_str())
            }
        };
        let line = serde_json::json!({
            "t_ms": now_ms(), "who": self.who, "event": event, "cause": cause,
            "backend": backend, "detail": detail,
        });
        let mut f = self.events.lock().unwrap_or_else(|p| p.into_inner());
        // One write per line: a reader never sees half an event, even after a SIGKILL.
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }

    /// Rewrites the summary file (temp file + rename, so a reader never sees half of it).
    pub fn save(&self) {
        let counts = self.counts().clone();
        let doc = serde_json::json!({"who": self.who, "pid": std::process::id(), "t_ms": now_ms(), "counts": counts});
        let tmp = self.summary.with_extension("tmp");
        if std::fs::write(&tmp, format!("{doc}\n")).is_ok() {
            let _ = std::fs::rename(&tmp, &self.summary);
        }
    }
}
