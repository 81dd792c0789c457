//! The rules: `name,listen_port,dest_ip,dest_port[,options]` rows (the original tool's four
//! columns, an optional fifth) validated into pools; rows that share a listen address and transport
//! form one balanced pool. [`parse`] is the one reader and writer of the CSV text, [`options`] of
//! the fifth column, [`file`] the one owner of the file on disk. Every error names `file:line`, the
//! field and why, so a bad edit can be fixed without guessing.

pub mod file;
pub mod options;
mod parse;
pub mod range;

pub use options::{BackendOptions, PoolOptions, Proto};
pub use parse::{destination, parse, parse_listen, read_rows, to_csv, validate, Listen, Row};
pub use range::{parse_port, parse_port_range, PortRange};

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// One row of the rules file, as the user wrote it (the web page edits these).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// `PORT`, or `ADDR:PORT` to bind one address (`[v6]:PORT` for IPv6); `/udp` after it makes
    /// a UDP rule (`/tcp`, the default, may be written too).
    pub listen_port: String,
    /// IPv4/IPv6 literal or host name.
    pub dest_ip: String,
    pub dest_port: String,
    /// Space-separated `key=value` items ([`options`]); empty when the row has four columns.
    #[serde(default)]
    pub options: String,
}

/// A validated entry: where it listens and the resolved destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub entry: Entry,
    /// 1-based line in the file (0 when the entry did not come from a file).
    pub line: usize,
    pub listen: SocketAddr,
    pub proto: Proto,
    /// The destination; with a destination range, its first port; for a host name,
    /// `0.0.0.0:PORT` (the addresses are in `dns` answers).
    pub dest: SocketAddr,
    /// The destination ports: one, or a range as long as the pool's listen range (the port a
    /// client reached maps to the same offset in it).
    pub dest_ports: PortRange,
    /// The host name to resolve (in the background, never on a connection's path), when
    /// `dest_ip` is not an address literal.
    pub host: Option<String>,
    /// This row's backend options (weight, PROXY protocol, limit).
    pub options: BackendOptions,
}

/// The backends reached through one listening address and transport, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The address and the first port.
    pub listen: SocketAddr,
    /// Every port the pool listens on: `listen`'s alone, or a range starting there.
    pub ports: PortRange,
    pub proto: Proto,
    /// What the pool's rows say about the whole pool (they agree, or the file is refused).
    pub options: PoolOptions,
    pub rules: Vec<Rule>,
}

impl Pool {
    /// How the page, the logs and the API name the pool: `0.0.0.0:8080`, `0.0.0.0:53/udp`.
    /// A range reads `0.0.0.0:27000-27099`.
    pub fn label(&self) -> String {
        Listen {
            addr: self.listen,
            ports: self.ports,
            proto: self.proto,
        }
        .to_string()
    }
}

impl Rule {
    /// The destination as messages write it: `10.0.0.9:27000-27099` for a range.
    pub fn dest_label(&self) -> String {
        if let Some(host) = &self.host {
            return format!("{host}:{}", self.dest_ports);
        }
        if self.dest_ports.is_single() {
            self.dest.to_string()
        } else {
            let ip = match self.dest.ip() {
                std::net::IpAddr::V4(ip) => ip.to_string(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            };
            format!("{ip}:{}", self.dest_ports)
        }
    }
}

/// A whole validated rules file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub pools: Vec<Pool>,
}

/// One problem in a rules file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleError {
    pub file: String,
    pub line: usize,
    /// The CSV column at fault (`name`, `listen_port`, `dest_ip`, `dest_port`, `options`), or
    /// `row`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file, self.line, self.field, self.message
        )
    }
}

/// Every problem found in a rules file (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RulesError(pub Vec<RuleError>);

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Header written into a rules file the forwarder creates.
pub const EXAMPLE_FILE: &str = "\
# Forwarding rules: name,listen_port,dest_ip,dest_port[,options] (one rule per line).
# Rows that share a listen port form one pool, served round robin.
# listen_port may be ADDR:PORT to bind one address, and end in /udp for a UDP rule;
# a port may be a range FROM-TO (dest_port the same length, or one port for all of them);
# dest_ip may be a host name or IPv6 literal. The optional fifth column holds options, quoted:
#   web1,8080,10.0.0.11,80,\"weight=3 send_proxy=v2\"   ssh,22222,10.0.0.13,22,\"allow=10.0.0.0/24\"
# Changes are applied live (on save, or SIGHUP) without dropping connections.
# Example:
# web1,8080,127.0.0.1,9001
# web2,8080,127.0.0.1,9002
";

impl RuleSet {
    /// Every rule in file order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.pools.iter().flat_map(|p| p.rules.iter())
    }

    /// The entries in file order (what the web page shows and edits).
    pub fn entries(&self) -> Vec<Entry> {
        let mut rules: Vec<&Rule> = self.rules().collect();
        rules.sort_by_key(|r| r.line);
        rules.into_iter().map(|r| r.entry.clone()).collect()
    }
}
