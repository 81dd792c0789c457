//! Counters: what one worker slot has done ([`WorkerCounters`], kept in shared memory, see
//! `shared.rs`), the supervisor's sum over all workers ([`Snapshot`], written to `--stats-file`),
//! and the human stats line with per-second rates.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Cumulative counters of one worker slot, over every process that ran in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounters {
    /// Open connections right now.
    pub connections_now: u64,
    /// Connections accepted.
    pub connections_total: u64,
    /// TLS handshakes completed (0 in `--plain` mode).
    pub handshakes_total: u64,
    /// Handshakes that failed (garbage, wrong protocol, bad alert).
    pub handshake_failures: u64,
    /// Connections closed because the handshake did not finish in time.
    pub handshake_timeouts: u64,
    /// Plaintext bytes handed back to clients.
    pub bytes_echoed: u64,
    /// Reads of plaintext processed (one client write usually arrives as one read).
    pub messages_echoed: u64,
    /// Connections ended by an I/O or TLS error after the handshake.
    pub connection_errors: u64,
    /// accept() failures (EMFILE and friends).
    pub accept_errors: u64,
    /// Completed handshakes by negotiated version, so a test (or an operator) sees what clients
    /// got without a capture.
    #[serde(default)]
    pub tls12_handshakes: u64,
    #[serde(default)]
    pub tls13_handshakes: u64,
    /// Completed handshakes that resumed an earlier session.
    #[serde(default)]
    pub resumed_handshakes: u64,
    /// Handshakes refused because `--client-ca` was given and the client sent no certificate or
    /// one the CA did not sign (also counted in `handshake_failures`).
    #[serde(default)]
    pub client_cert_refused: u64,
}

/// Number of `u64` fields in [`WorkerCounters`].
pub const COUNTER_WORDS: usize = 13;

impl WorkerCounters {
    /// The fields in a fixed order, for the shared-memory slot.
    pub fn to_words(self) -> [u64; COUNTER_WORDS] {
        [
            self.connections_now,
            self.connections_total,
            self.handshakes_total,
            self.handshake_failures,
            self.handshake_timeouts,
            self.bytes_echoed,
            self.messages_echoed,
            self.connection_errors,
            self.accept_errors,
            self.tls12_handshakes,
            self.tls13_handshakes,
            self.resumed_handshakes,
            self.client_cert_refused,
        ]
    }

    /// Inverse of [`WorkerCounters::to_words`].
    pub fn from_words(w: [u64; COUNTER_WORDS]) -> WorkerCounters {
        WorkerCounters {
            connections_now: w[0],
            connections_total: w[1],
            handshakes_total: w[2],
            handshake_failures: w[3],
            handshake_timeouts: w[4],
            bytes_echoed: w[5],
            messages_echoed: w[6],
            connection_errors: w[7],
            accept_errors: w[8],
            tls12_handshakes: w[9],
            tls13_handshakes: w[10],
            resumed_handshakes: w[11],
            client_cert_refused: w[12],
        }
    }

    /// Adds `other` to `self`, field by field.
    pub fn add(&mut self, other: &WorkerCounters) {
        self.connections_now += other.connections_now;
        self.connections_total += other.connections_total;
        self.handshakes_total += other.handshakes_total;
        self.handshake_failures += other.handshake_failures;
        self.handshake_timeouts += other.handshake_timeouts;
        self.bytes_echoed += other.bytes_echoed;
        self.messages_echoed += other.messages_echoed;
        self.connection_errors += other.connection_errors;
        self.accept_errors += other.accept_errors;
        self.tls12_handshakes += other.tls12_handshakes;
        self.tls13_handshakes += other.tls13_handshakes;
        self.resumed_handshakes += other.resumed_handshakes;
        self.client_cert_refused += other.client_cert_refused;
    }
}

/// One worker's line in the stats file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerEntry {
    pub index: usize,
    pub pid: u32,
    pub restarts: u64,
    /// Everything this worker slot did, over all its incarnations.
    pub connections_total: u64,
    pub connections_now: u64,
}

/// The whole server's state as written to `--stats-file`. Field names are an interface: the lab
/// script reads `connections_total` to check load balancing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    #[serde(flatten)]
    pub totals: WorkerCounters,
    pub workers: usize,
    pub plain: bool,
    pub listen: String,
    pub pid: u32,
    pub uptime_s: f64,
    pub worker_restarts: u64,
    /// True in the last write, made when the server exits.
    pub final_report: bool,
    pub per_worker: Vec<WorkerEntry>,
}

/// Writes `snapshot` as JSON to a temporary file next to `path` and renames it over `path`, so a
/// reader sees either the previous or the new complete file, never half of one.
pub fn write_snapshot(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "stats.json".into());
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut f, snapshot)?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The stats line for one interval: current and total connections, then rates over the interval.
pub fn stats_line(prev: &WorkerCounters, now: &WorkerCounters, secs: f64) -> String {
    let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / secs.max(1e-9);
    format!(
        "connections now {} total {} | handshakes/s {:.0} | messages/s {:.0} | bytes/s {}",
        now.connections_now,
        now.connections_total,
        rate(prev.handshakes_total, now.handshakes_total),
        rate(prev.messages_echoed, now.messages_echoed),
        human_bytes(rate(prev.bytes_echoed, now.bytes_echoed)),
    ) + &refused_since(prev, now)
}

/// ` | client certificates refused N` when some were refused in the interval, else nothing.
fn refused_since(prev: &WorkerCounters, now: &WorkerCounters) -> String {
    match now
        .client_cert_refused
        .saturating_sub(prev.client_cert_refused)
    {
        0 => String::new(),
        n => format!(" | client certificates refused {n}"),
    }
}

/// `1234567.0` → `"1.23 MB"` (decimal units, like network rates are usually given).
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_over_the_interval() {
        let prev = WorkerCounters {
            handshakes_total: 10,
            messages_echoed: 100,
            bytes_echoed: 1_000,
            ..Default::default()
        };
        let now = WorkerCounters {
            connections_now: 3,
            connections_total: 40,
            handshakes_total: 30,
            messages_echoed: 500,
            bytes_echoed: 5_001_000,
            ..Default::default()
        };
        assert_eq!(
            stats_line(&prev, &now, 2.0),
            "connections now 3 total 40 | handshakes/s 10 | messages/s 200 | bytes/s 2.50 MB"
        );
    }

    #[test]
    fn sums_add_every_field() {
        let w = WorkerCounters::from_words([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        let mut sum = WorkerCounters::default();
        sum.add(&w);
        sum.add(&w);
        assert_eq!(
            sum.to_words(),
            [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26]
        );
    }

    #[test]
    fn snapshot_json_has_the_names_the_lab_reads() {
        let snap = Snapshot {
            totals: WorkerCounters {
                connections_total: 9,
                ..Default::default()
            },
            workers: 2,
            plain: true,
            listen: "127.0.0.1:1".into(),
            pid: 1,
            uptime_s: 0.5,
            worker_restarts: 0,
            final_report: false,
            per_worker: vec![],
        };
        let v: serde_json::Value = serde_json::to_value(&snap).unwrap();
        for key in [
            "connections_now",
            "connections_total",
            "handshakes_total",
            "bytes_echoed",
            "messages_echoed",
            "tls12_handshakes",
            "tls13_handshakes",
            "resumed_handshakes",
            "client_cert_refused",
            "workers",
            "plain",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert_eq!(v["connections_total"], 9);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        write_snapshot(&path, &snap).unwrap();
        let back: Snapshot =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, snap);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn words_round_trip_in_field_order() {
        let words = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13];
        let c = WorkerCounters::from_words(words);
        assert_eq!(c.connections_now, 1);
        assert_eq!(c.accept_errors, 9);
        assert_eq!(c.client_cert_refused, 13);
        assert_eq!(c.to_words(), words);
    }

    #[test]
    fn human_bytes_uses_decimal_units() {
        assert_eq!(human_bytes(999.0), "999 B");
        assert_eq!(human_bytes(1_500.0), "1.50 kB");
        assert_eq!(human_bytes(2_000_000_000.0), "2.00 GB");
    }
}
