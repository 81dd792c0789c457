//! The command line, and turning it (plus the prompts, on a terminal) into a [`RunConfig`].

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;

use crate::agent::AgentArgs;
use crate::config::{Churn, Payload, RunConfig, Workload, MAX_MESSAGE_BYTES};
use crate::coordinator::OnLoss;
use crate::prompt::{self, DEFAULT_CONNECTIONS, DEFAULT_COUNT, DEFAULT_MESSAGE};
use crate::slo::Slo;
use crate::tls::{TlsOptions, TlsVersion};

/// Opens N TLS (or plain TCP) connections to an echo server, sends a message M times on each
/// (or for a duration), checks every echo, measures response times, and writes a spreadsheet
/// report. With no message, count or connections given on a terminal, it asks for them.
#[derive(Debug, Parser)]
#[command(name = "ssl-echo-client", version)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Host name or IP address of the echo server (or of the forwarder in front of it).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to connect to.
    #[arg(long, default_value_t = 8005)]
    pub port: u16,

    /// Text of every message; the echo must match it byte for byte [default: "Hello, echo server!"].
    #[arg(long)]
    pub message: Option<String>,

    /// Messages per connection [default: 10].
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// Send for this many seconds after the barrier instead of a fixed count.
    #[arg(long, value_name = "SECS", conflicts_with = "count", value_parser = positive_f64)]
    pub duration: Option<f64>,

    /// Number of connections [default: 1000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: Option<u64>,

    /// New connections per second while opening them (0 = as fast as the server takes them).
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = non_negative_f64)]
    pub connect_rate: f64,

    /// Processes to spread the connections over [default: as many as the open-file limit needs].
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u64).range(1..=64),
          conflicts_with = "agents")]
    pub processes: Option<u64>,

    /// Run the connections on these agents (`ssl-echo-client agent` on each client PC) instead
    /// of this PC, split evenly, with one barrier and one report.
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub agents: Vec<String>,

    /// Token the agents were started with (--token).
    #[arg(
        long,
        value_name = "T",
        env = "SSL_ECHO_CLIENT_TOKEN",
        hide_env_values = true
    )]
    pub agent_token: Option<String>,

    /// When an agent cannot be reached, dies, or does not reach the barrier in time: stop the
    /// whole run (report written, exit status 3), or go on without it (its connections count
    /// as failed).
    #[arg(long, value_enum, default_value = "stop")]
    pub on_agent_loss: OnLoss,

    /// Longest wait for every connection of every process (and agent) to be up or failed.
    #[arg(long, value_name = "SECS", default_value_t = 600.0, value_parser = positive_f64)]
    pub barrier_timeout_s: f64,

    /// Local addresses to bind the connections to, in turn (comma-separated): each address has
    /// its own ephemeral ports toward one destination.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub source_ip: Vec<IpAddr>,

    /// The forwarder's web page (http://HOST:PORT): once every connection is up, ask it which
    /// backend serves each one, for the per-backend table.
    #[arg(long, value_name = "URL")]
    pub forwarder: Option<String>,

    /// The forwarder's web token, if its page needs one.
    #[arg(long, value_name = "T")]
    pub forwarder_token: Option<String>,

    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, default_value = "certs/ca.crt")]
    pub ca: PathBuf,

    /// Plain TCP instead of TLS.
    #[arg(long)]
    pub plain: bool,

    /// Name sent in SNI and checked against the certificate [default: the host].
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// Only this TLS version [default: 1.2 and 1.3, 1.3 preferred].
    #[arg(long, value_enum, value_name = "VERSION", conflicts_with = "plain")]
    pub tls_version: Option<TlsVersion>,

    /// Cipher suites to offer, by rustls name, in preference order (comma-separated, e.g.
    /// TLS13_AES_128_GCM_SHA256); an unknown name is refused with the list of valid ones
    /// [default: all of the ring provider's].
    #[arg(
        long,
        value_name = "SUITE,...",
        value_delimiter = ',',
        conflicts_with = "plain"
    )]
    pub ciphers: Vec<String>,

    /// ALPN protocols to offer, in preference order (repeatable or comma-separated, e.g.
    /// h2,http/1.1) [default: none].
    #[arg(
        long,
        value_name = "PROTO,...",
        value_delimiter = ',',
        conflicts_with = "plain"
    )]
    pub alpn: Vec<String>,

    /// Client certificate chain (PEM), for servers that require one (with --key).
    #[arg(long, value_name = "PATH", requires = "key", conflicts_with = "plain")]
    pub cert: Option<PathBuf>,

    /// Private key of --cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PATH", requires = "cert", conflicts_with = "plain")]
    pub key: Option<PathBuf>,

    /// Offer each new connection a session from an earlier one of the same process (TLS 1.3
    /// tickets, TLS 1.2 session IDs or tickets), as a returning browser does; the report gives
    /// the share that resumed. Without it every handshake is a full one.
    #[arg(long, conflicts_with = "plain")]
    pub resume: bool,

    /// Handshake capacity: open R new connections per second (over the whole run), open loop,
    /// for --duration seconds [default 10] or until --connections were opened; each lives
    /// --lifetime and closes. No barrier; reports handshakes/s achieved vs asked.
    #[arg(long, value_name = "R", value_parser = positive_f64,
          conflicts_with_all = ["count", "connect_rate"])]
    pub churn: Option<f64>,

    /// With --churn: how long each connection lives after its handshake: seconds (`2`, `2.5s`,
    /// `500ms`) or messages (`10msg`) [default: 1msg].
    #[arg(long, value_name = "T", requires = "churn", value_parser = parse_lifetime)]
    pub lifetime: Option<Workload>,

    /// Spreadsheet to write [default: reports/client-data-<N>-<timestamp>.xlsx].
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// Print the summary as JSON on stdout (human output stays on stderr).
    #[arg(long)]
    pub json: bool,

    /// Messages per second per connection on a fixed schedule; response times are then also
    /// measured from the intended send time (coordinated omission corrected, as wrk2).
    #[arg(long, value_name = "R", value_parser = positive_f64)]
    pub rate: Option<f64>,

    /// Limit in milliseconds for the TCP connect, the TLS handshake, and each echo.
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,

    /// Failed or lost connections the run may have and still exit 0; above it the exit status
    /// is 3 (the report is written either way).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_errors: u64,

    /// A service-level objective, judged at the end on the corrected figures under --rate (exit
    /// status 4 when one fails): `p99<20ms`, `errors<0.1%`, `handshake.p99<150ms`, `rate>=5000`.
    /// Repeat for several.
    #[arg(long, value_name = "OBJECTIVE")]
    pub slo: Vec<Slo>,

    /// Write one JSON record per second of phase 2 here (messages, msg/s, percentiles, client
    /// CPU and hiccups), as the run goes.
    #[arg(long, value_name = "PATH")]
    pub json_lines: Option<PathBuf>,

    /// Write the response times here in HdrHistogram's interval-log format, one interval per
    /// second (plot with HdrHistogram's tools).
    #[arg(long, value_name = "PATH")]
    pub hdr_log: Option<PathBuf>,

    /// Messages of N random bytes (from --seed) instead of --message text.
    #[arg(long, value_name = "N", conflicts_with_all = ["message", "message_file"],
          value_parser = clap::value_parser!(u64).range(1..=MAX_MESSAGE_BYTES))]
    pub size: Option<u64>,

    /// Seed of the --size bytes: the same seed gives the same bytes.
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,

    /// Send this file's bytes as every message instead of --message text.
    #[arg(long, value_name = "PATH", conflicts_with = "message")]
    pub message_file: Option<PathBuf>,

    /// Messages per second over all connections together on a fixed schedule (split evenly:
    /// --rate R/N each); instead of --rate.
    #[arg(long, value_name = "R", value_parser = positive_f64, conflicts_with = "rate")]
    pub total_rate: Option<f64>,

    /// While waiting at the barrier, each open connection echoes one message this often (not
    /// counted in the figures), so a gateway's idle timeout does not cut the first connections
    /// while the last are opened (0 = off).
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = non_negative_f64)]
    pub keepalive_s: f64,

    /// Connections of one process being opened (connect + handshake) at once at most.
    #[arg(long, value_name = "N", default_value_t = crate::shard::MAX_CONNECTING as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connecting: u64,

    /// Log filter (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "warn")]
    pub log_level: String,

    /// Internal: run as one worker process of a multi-process run (JSON plan).
    #[arg(long = "worker-plan", hide = true)]
    pub worker_plan: Option<String>,
}

/// The other modes of the binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run on a client PC and wait for a coordinator (`ssl-echo-client --agents ...`).
    Agent(AgentArgs),
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a number above 0".to_string()),
        Err(_) => Err(format!("{s:?} is not a number")),
    }
}

/// `--lifetime`: `2`, `2.5s`, `500ms` (seconds) or `10msg` (messages).
fn parse_lifetime(s: &str) -> Result<Workload, String> {
    let t = s.trim();
    let bad =
        || format!("{s:?}: expected seconds (2, 2.5s, 500ms) or a number of messages (10msg)");
    if let Some(n) = t.strip_suffix("msg").or_else(|| t.strip_suffix("messages")) {
        return match n.trim().parse::<u64>() {
            Ok(m) if m > 0 => Ok(Workload::Count(m)),
            Ok(_) => Err(format!("{s:?}: at least 1 message")),
            Err(_) => Err(bad()),
        };
    }
    let (number, scale) = match t.strip_suffix("ms") {
        Some(n) => (n, 0.001),
        None => (t.strip_suffix('s').unwrap_or(t), 1.0),
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(Workload::DurationSecs(v * scale)),
        Ok(_) => Err(format!("{s:?}: must be above 0")),
        Err(_) => Err(bad()),
    }
}

/// Seconds of opening in churn mode when neither --duration nor --connections says.
pub const DEFAULT_CHURN_WINDOW_S: f64 = 10.0;

fn non_negative_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(_) => Err("must be a number of at least 0".to_string()),
        Err(_) => Err(format!("{s:?} is not a number")),
    }
}

impl Args {
    /// True when the user gave none of the inputs the original client asked for.
    fn nothing_to_send_given(&self) -> bool {
        self.message.is_none()
            && self.churn.is_none()
            && self.size.is_none()
            && self.message_file.is_none()
            && self.count.is_none()
            && self.duration.is_none()
            && self.connections.is_none()
    }

    /// Resolves the run: asks on a terminal if needed, looks the host up once, checks the rest.
    pub fn resolve(&self) -> anyhow::Result<RunConfig> {
        let (message, workload, connections) =
            if self.nothing_to_send_given() && std::io::stdin().is_terminal() {
                let a = prompt::ask(&mut std::io::stdin().lock(), &mut std::io::stderr())
                    .context("reading the answers")?;
                (a.message, Workload::Count(a.count), a.connections)
            } else {
                let workload = match (self.count, self.duration) {
                    (_, Some(d)) => Workload::DurationSecs(d),
                    (c, None) => Workload::Count(c.unwrap_or(DEFAULT_COUNT)),
                };
                (
                    self.message
                        .clone()
                        .unwrap_or_else(|| DEFAULT_MESSAGE.to_string()),
                    workload,
                    self.connections.unwrap_or(DEFAULT_CONNECTIONS),
                )
            };
        if message.is_empty() {
            bail!("--message must not be empty: an empty message has no echo to check");
        }
        let payload = match (self.size, &self.message_file) {
            (Some(size), _) => Some(Payload::Random {
                size,
                seed: self.seed,
            }),
            (None, Some(path)) => Some(read_message_file(path)?),
            (None, None) => None,
        };
        let rate = match self.total_rate {
            Some(total) => Some(total / connections as f64),
            None => self.rate,
        };
        let addr = resolve_addr(&self.host, self.port)?;
        let (workload, connections, churn) = match self.churn {
            None => (workload, connections, None),
            Some(rate) => {
                let window_s = match (self.duration, self.connections) {
                    (Some(d), _) => d,
                    (None, Some(n)) => n as f64 / rate,
                    (None, None) => DEFAULT_CHURN_WINDOW_S,
                };
                let scheduled = ((rate * window_s).round() as u64).max(1);
                let connections = self.connections.map_or(scheduled, |n| n.min(scheduled));
                let lifetime = self.lifetime.unwrap_or(Workload::Count(1));
                (lifetime, connections, Some(Churn { rate, window_s }))
            }
        };
        Ok(RunConfig {
            host: self.host.clone(),
            addr,
            server_name: self
                .server_name
                .clone()
                .unwrap_or_else(|| self.host.clone()),
            ca: (!self.plain).then(|| self.ca.clone()),
            message,
            workload,
            connections,
            // In churn mode the opening rate is the churn rate; split() shares it out.
            connect_rate: churn.map_or(self.connect_rate, |c| c.rate),
            rate,
            timeout_ms: self.timeout_ms,
            source_ips: self.source_ip.clone(),
            tls_options: TlsOptions {
                version: self.tls_version,
                ciphers: self.ciphers.clone(),
                alpn: self.alpn.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
                resume: self.resume,
            },
            churn,
            max_connecting: self.max_connecting,
            keepalive_ms: (self.keepalive_s * 1000.0).round() as u64,
            payload,
        })
    }
}

/// Reads `--message-file` once (the parent), for every process and agent.
fn read_message_file(path: &std::path::Path) -> anyhow::Result<Payload> {
    use base64::Engine as _;
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("--message-file {shown}"))?;
    if meta.len() > MAX_MESSAGE_BYTES {
        bail!(
            "--message-file {shown}: {} bytes is more than the {MAX_MESSAGE_BYTES} a message may have",
            meta.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("--message-file {shown}"))?;
    if bytes.is_empty() {
        bail!("--message-file {shown}: the file is empty: an empty message has no echo to check");
    }
    Ok(Payload::File {
        path: shown.to_string(),
        base64: base64::engine::general_purpose::STANDARD.encode(bytes),
    })
}

/// Looks `host` up once; IPv4 first (the servers listen on 0.0.0.0 by default).
pub fn resolve_addr(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("--host {host:?}: cannot resolve it"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("--host {host:?}: resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("ssl-echo-client").chain(args.iter().copied()))
    }

    #[test]
    fn flags_resolve_into_a_run() {
        let a = parse(&[
            "--host",
            "localhost",
            "--port",
            "9000",
            "--message",
            "ping",
            "--duration",
            "15",
            "--connections",
            "20000",
            "--plain",
        ])
        .unwrap();
        let c = a.resolve().unwrap();
        assert_eq!(c.addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.server_name, "localhost");
        assert_eq!(c.workload, Workload::DurationSecs(15.0));
        assert_eq!(c.connections, 20_000);
        assert!(c.ca.is_none());
    }

    #[test]
    fn defaults_without_a_terminal() {
        let c = parse(&["--count", "3"]).unwrap().resolve().unwrap();
        assert_eq!(c.message, DEFAULT_MESSAGE);
        assert_eq!(c.workload, Workload::Count(3));
        assert_eq!(c.connections, DEFAULT_CONNECTIONS);
        assert_eq!(c.ca, Some(PathBuf::from("certs/ca.crt")));
        assert_eq!(c.addr.port(), 8005);
        assert_eq!(c.timeout_ms, 10_000);
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        let e = parse(&["--count", "5", "--duration", "3"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let e = parse(&["--connections", "0"]).unwrap_err();
        assert!(e.to_string().contains("0 is not in 1.."), "{e}");
        let e = parse(&["--rate=-1"]).unwrap_err();
        assert!(e.to_string().contains("must be a number above 0"), "{e}");
        let e = parse(&["--connect-rate", "fast"]).unwrap_err();
        assert!(e.to_string().contains("\"fast\" is not a number"), "{e}");
        let e = parse(&["--message", "", "--count", "1"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("--message must not be empty"), "{e}");
        let e = parse(&["--plain", "--tls-version", "1.2"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let e = parse(&["--cert", "c.pem"]).unwrap_err();
        assert!(e.to_string().contains("--key"), "{e}");
        let e = parse(&["--lifetime", "2s"]).unwrap_err();
        assert!(e.to_string().contains("--churn"), "{e}");
        let e = parse(&["--churn", "10", "--lifetime", "soon"]).unwrap_err();
        assert!(e.to_string().contains("expected seconds"), "{e}");
        let e = parse(&["--slo", "p99<20"]).unwrap_err();
        assert!(e.to_string().contains("a time needs a unit"), "{e}");
        let e = parse(&["--size", "10", "--message", "x"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let e = parse(&["--rate", "1", "--total-rate", "5"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let e = parse(&["--message-file", "/nonexistent/m.bin", "--count", "1"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(
            format!("{e:#}").starts_with("--message-file /nonexistent/m.bin: "),
            "{e:#}"
        );
    }

    #[test]
    fn tls_flags_reach_the_run() {
        let c = parse(&[
            "--count",
            "1",
            "--tls-version",
            "1.2",
            "--ciphers",
            "A,B",
            "--alpn",
            "h2",
            "--alpn",
            "http/1.1,x",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--resume",
        ])
        .unwrap()
        .resolve()
        .unwrap();
        let t = &c.tls_options;
        assert_eq!(t.version, Some(TlsVersion::V12));
        assert_eq!(t.ciphers, ["A", "B"]);
        assert_eq!(t.alpn, ["h2", "http/1.1", "x"]);
        assert_eq!(t.cert, Some(PathBuf::from("c.pem")));
        assert!(t.resume);
        assert!(c.churn.is_none());
    }

    #[test]
    fn churn_sets_the_window_the_count_and_the_lifetime() {
        let c = parse(&["--churn", "50", "--duration", "3", "--lifetime", "500ms"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(
            c.churn,
            Some(Churn {
                rate: 50.0,
                window_s: 3.0
            })
        );
        assert_eq!(c.connections, 150);
        assert_eq!(c.connect_rate, 50.0);
        assert_eq!(c.workload, Workload::DurationSecs(0.5));
        let c = parse(&["--churn", "20", "--connections", "10", "--lifetime", "3msg"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.churn.unwrap().window_s, 0.5);
        assert_eq!(c.connections, 10);
        assert_eq!(c.workload, Workload::Count(3));
        let c = parse(&["--churn", "5"]).unwrap().resolve().unwrap();
        assert_eq!(c.connections, 50);
        assert_eq!(c.workload, Workload::Count(1));
        let e = parse(&["--churn", "5", "--count", "2"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
    }

    #[test]
    fn traffic_shape_flags_resolve() {
        let c = parse(&[
            "--count",
            "1",
            "--connections",
            "40",
            "--total-rate",
            "1000",
            "--size",
            "64",
        ])
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(c.rate, Some(25.0));
        assert_eq!(c.payload, Some(Payload::Random { size: 64, seed: 1 }));
        assert_eq!(c.payload_bytes().unwrap().len(), 64);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.bin");
        std::fs::write(&f, [0u8, 255, 10]).unwrap();
        let c = parse(&["--count", "1", "--message-file", f.to_str().unwrap()])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(c.payload_bytes().unwrap(), [0u8, 255, 10]);
        let a = parse(&["--slo", "p99<20ms", "--slo", "errors<0.1%"]).unwrap();
        assert_eq!(a.slo.len(), 2);
    }
}
