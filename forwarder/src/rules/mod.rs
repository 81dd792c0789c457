//! The rules: `name,listen_port,dest_ip,dest_port[,options]` rows (the original tool's four
//! columns, an optional fifth) validated into pools; rows that share a listen address and transport
//! form one balanced pool. [`parse`] is the one reader and writer of the CSV text, [`options`] of
//! the fifth column, [`file`] the one owner of the file on disk. Every error names `file:line`, the
//! field and why, so a bad edit can be fixed without guessing.

pub mod file;
pub mod options;
mod parse;

pub use options::{BackendOptions, PoolOptions, Proto};
pub use parse::{
    destination, parse, parse_listen, parse_port, read_rows, to_csv, validate, Listen, Row,
};

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
    /// The destination; for a host name, `0.0.0.0:PORT` (the addresses are in `dns` answers).
    pub dest: SocketAddr,
    /// The host name to resolve (in the background, never on a connection's path), when
    /// `dest_ip` is not an address literal.
    pub host: Option<String>,
    /// This row's backend options (weight, PROXY protocol, limit).
    pub options: BackendOptions,
}

/// The backends reached through one listening address and transport, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub listen: SocketAddr,
    pub proto: Proto,
    /// What the pool's rows say about the whole pool (they agree, or the file is refused).
    pub options: PoolOptions,
    pub rules: Vec<Rule>,
}

impl Pool {
    /// How the page, the logs and the API name the pool: `0.0.0.0:8080`, `0.0.0.0:53/udp`.
    pub fn label(&self) -> String {
        Listen {
            addr: self.listen,
            proto: self.proto,
        }
        .to_string()
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
