//! What the UDP tests share: the forwarder started with its web page (the figures are read
//! from /metrics and the API), and which UDP ports are bound.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use super::{local, WAIT};
use testbed::testing::{free_port, wait_until, ChildGuard};

/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

/// A forwarder with its web page (for the figures) and its rules file.
pub struct Forwarder {
    pub process: ChildGuard,
    pub rules: std::path::PathBuf,
    pub web: u16,
    _dir: tempfile::TempDir,
}

impl Forwarder {
    /// Starts the forwarder and waits until every UDP port in `udp_ports` is bound.
    pub fn start(rules: &str, workers: usize, extra: &[&str], udp_ports: &[u16]) -> Forwarder {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.csv");
        std::fs::write(&path, rules).unwrap();
        let web = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forwarder"));
        cmd.arg("--rules")
            .arg(&path)
            .arg("--web")
            .arg(format!("127.0.0.1:{web}"))
            .arg("--workers")
            .arg(workers.to_string())
            .args(extra);
        let process = ChildGuard::spawn(cmd);
        assert!(
            wait_until(WAIT, || super::is_listening(web)),
            "no web page:\n{}",
            process.output()
        );
        let f = Forwarder {
            process,
            rules: path,
            web,
            _dir: dir,
        };
        for &port in udp_ports {
            f.wait_bound(port, workers);
        }
        f
    }

    /// Waits until `n` sockets hold UDP port `port` (one per worker).
    pub fn wait_bound(&self, port: u16, n: usize) {
        assert!(
            wait_until(WAIT, || udp_sockets_on(port) >= n),
            "forwarder never bound udp {port}:\n{}",
            self.process.output()
        );
    }

    pub fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(local(self.web)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        body.to_string()
    }

    /// The value of the metrics line that starts with `series` (name and labels).
    pub fn metric(&self, series: &str) -> Option<u64> {
        self.get("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path)).unwrap()
    }

    pub fn rewrite_rules(&self, text: &str) {
        let before = self.process.output().matches("reloading").count();
        let tmp = self.rules.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.rules).unwrap();
        assert!(
            wait_until(WAIT, || self.process.output().matches("reloading").count()
                > before),
            "no reload noticed:\n{}",
            self.process.output()
        );
    }

    pub fn rss_kib(&self) -> u64 {
        let mut pids = super::children_of(self.process.pid());
        pids.push(self.process.pid());
        pids.iter().map(|&p| super::rss_kib(p)).sum()
    }
}

/// Sockets bound to UDP port `port` (IPv4 or IPv6), read from /proc.
pub fn udp_sockets_on(port: u16) -> usize {
    let hex = format!(":{port:04X} ");
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .map(|table| {
            std::fs::read_to_string(table).map_or(0, |text| {
                text.lines()
                    .skip(1)
                    .filter(|line| {
                        let local = line.split_whitespace().nth(1).unwrap_or("");
                        format!("{local} ").ends_with(&hex)
                    })
                    .count()
            })
        })
        .sum()
}
