//! `forwarder`: command line and wiring. The same binary is the supervisor and, re-executed with
//! hidden flags, each worker process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use forwarder::access_log;
use forwarder::capacity;
use forwarder::rules::file::RulesFile;
use forwarder::rules::{self, RuleSet};
use forwarder::service::{self, exit::Exit};
use forwarder::supervisor::{self, Supervisor, SupervisorConfig};
use forwarder::tcp::sockmap::{self, DataPath};
use forwarder::worker::{self, WorkerConfig};

/// Pipes one worker may hold for splicing (two descriptors each).
const PIPES_PER_WORKER: usize = 128;

/// TCP and UDP port forwarder and round-robin load balancer.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Rules file: rows of name,listen_port,dest_ip,dest_port [default: ./entries.csv, created with
    /// an example when missing]
    #[arg(long)]
    rules: Option<PathBuf>,

    /// Worker processes (0 = one per core, more if the connections need more descriptors)
    #[arg(long, default_value_t = 0)]
    workers: usize,

    /// Connections to plan for; workers are sized so they fit the open-file limit
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,

    /// Address of the web page
    #[arg(long, default_value = "127.0.0.1:3001")]
    web: SocketAddr,

    /// Do not serve the web page
    #[arg(long)]
    no_web: bool,

    /// Token required by the web page's mutating requests (generated when --web is not loopback)
    #[arg(long)]
    web_token: Option<String>,

    /// Serve the web page over HTTPS with this certificate chain (PEM; `certs --san HOST` makes one)
    #[arg(
        long,
        value_name = "PATH",
        requires = "web_key",
        conflicts_with = "no_web"
    )]
    web_cert: Option<PathBuf>,

    /// Private key of --web-cert (PEM)
    #[arg(long, value_name = "PATH", requires = "web_cert")]
    web_key: Option<PathBuf>,

    #[command(flatten)]
    web_limits: forwarder::web::Limits,

    /// Validate the rules file, print the rules, and exit (non-zero on any error)
    #[arg(long)]
    check: bool,

    /// Log filter (error, warn, info, debug, trace); RUST_LOG overrides
    #[arg(long, default_value = "info")]
    log_level: String,

    /// Give up on a backend connect after this long and try the next backend
    #[arg(long, default_value_t = 3000)]
    connect_timeout_ms: u64,

    /// Close connections idle this long (0 = never)
    #[arg(long, default_value_t = 0)]
    idle_timeout_s: u64,

    /// On SIGTERM/SIGINT, wait this long for established connections to finish
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,

    /// Seconds between active TCP health checks of every backend (0 = passive checks only)
    #[arg(long, default_value_t = 0)]
    health_interval_s: u64,

    /// Copy bulk data through user space instead of splice(2)
    #[arg(long)]
    no_splice: bool,

    /// How established TCP connections move bytes: splice (user space) or sockmap (the kernel,
    /// via a BPF verdict program; needs CAP_BPF and CAP_NET_ADMIN, else splice is used)
    #[arg(long, value_enum, default_value_t = DataPath::Splice)]
    data_path: DataPath,

    /// After loading the rules as root, run the supervisor and workers as this user (keeping only
    /// CAP_NET_BIND_SERVICE, for ports below 1024)
    #[arg(long, value_name = "NAME")]
    user: Option<String>,

    /// Refuse to start as root without --user
    #[arg(long)]
    refuse_root: bool,

    /// Clients every pool without its own allow= list admits: CIDR[,CIDR...] [default: all]
    #[arg(long, value_name = "CIDRS", value_parser = cidr_list("--allow"))]
    allow: Option<String>,

    /// Clients every pool refuses, on top of its own deny= list: CIDR[,CIDR...]
    #[arg(long, value_name = "CIDRS", value_parser = cidr_list("--deny"))]
    deny: Option<String>,

    /// Write one line per finished connection to this file (`-` = standard output); SIGUSR1
    /// reopens it (logrotate)
    #[arg(long, value_name = "PATH|-")]
    access_log: Option<String>,

    /// Format of --access-log lines
    #[arg(long, value_enum, default_value_t = access_log::Format::Text)]
    access_log_format: access_log::Format,

    /// End a UDP session (client address -> backend) after this long without a datagram
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    udp_idle_timeout_s: u64,

    /// UDP sessions to hold in all before evicting the least recently active (0 = as many as
    /// the open-file limit allows, one descriptor each)
    #[arg(long, default_value_t = 0)]
    udp_max_sessions: usize,

    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    #[arg(long, hide = true)]
    worker_fds: Option<String>,
    #[arg(long, hide = true, default_value_t = 0)]
    worker_max_connections: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    worker_udp_sessions: usize,
}

fn main() -> ExitCode {
    testbed::docs::generate_if_asked::<Args>(&service::man_sections());
    let args = Args::parse();
    testbed::logging::init(&args.log_level);
    let result = match args.worker_index {
        Some(index) => run_worker(&args, index),
        None => run_supervisor(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forwarder: {e:#}");
            service::exit::code_of(&e)
        }
    }
}

fn run_worker(args: &Args, index: usize) -> anyhow::Result<ExitCode> {
    service::signals::ignore_in_worker();
    testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let fds = args.worker_fds.as_deref().context("--worker-fds missing")?;
    let (stats, control) = fds
        .split_once(',')
        .context("--worker-fds is STATS,CONTROL")?;
    let config = WorkerConfig {
        index,
        max_connections: args.worker_max_connections.max(1),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        idle_timeout: (args.idle_timeout_s > 0).then(|| Duration::from_secs(args.idle_timeout_s)),
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        splice: !args.no_splice,
        max_pipes: PIPES_PER_WORKER,
        data_path: args.data_path,
        default_allow: parse_cidrs("--allow", &args.allow)?,
        default_deny: parse_cidrs("--deny", &args.deny)?,
        access_log: args
            .access_log
            .as_deref()
            .map(|t| (access_log::Target::parse(t), args.access_log_format)),

        udp_idle_timeout: Duration::from_secs(args.udp_idle_timeout_s),
        udp_max_sessions: args.worker_udp_sessions.max(1),
    };
    worker::run(config, stats.parse()?, control.parse()?)?;
    Ok(ExitCode::SUCCESS)
}

fn run_supervisor(args: &Args) -> anyhow::Result<ExitCode> {
    let rules_path = match &args.rules {
        Some(p) => p.clone(),
        None => default_rules_file()?,
    };
    let label = rules_path.display().to_string();
    let file = RulesFile::open(&rules_path).map_err(|e| {
        eprintln!("{e}");
        Exit::config(format!("{label}: cannot be read; nothing started"))
    })?;
    let set = match &file.current().rules {
        Ok(set) => set.clone(),
        Err(e) => {
            eprintln!("{e}");
            bail!(Exit::config(format!(
                "{label}: {} error(s); nothing started",
                e.0.len()
            )));
        }
    };
    print_rules(&label, &set);
    if let Err(e) = supervisor::check_bindable(&set, &label) {
        eprintln!("{e}");
        bail!(Exit::cannot_bind(format!(
            "{label}: {} port(s) cannot be listened on",
            e.0.len()
        )));
    }
    if args.check {
        eprintln!("{label}: OK");
        return Ok(ExitCode::SUCCESS);
    }
    service::privilege::drop_to(args.user.as_deref(), args.refuse_root)
        .map_err(|e| Exit::config(e.to_string()))?;

    // Read before anything starts, so a bad pair is one line and nothing to clean up.
    let web_tls = match (&args.web_cert, &args.web_key) {
        (Some(cert), Some(key)) if !args.no_web => Some(forwarder::web::tls::load(cert, key)?),
        _ => None,
    };

    let limit = testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let plan = capacity::plan(
        args.max_connections,
        args.workers,
        limit.soft,
        PIPES_PER_WORKER * 2,
        cores,
    );
    if plan.workers > forwarder::stats::MAX_WORKERS {
        bail!(
            "--workers {}: at most {} worker processes",
            plan.workers,
            forwarder::stats::MAX_WORKERS
        );
    }
    let (udp_per_worker, udp_total) = capacity::udp_sessions(&plan, args.udp_max_sessions);
    eprintln!(
        "capacity ≈ {} connections with {} workers (open-file limit {} per process{}; 2 descriptors per connection), or {} UDP sessions (1 descriptor each)",
        plan.total,
        plan.workers,
        limit.soft,
        if limit.soft_before < limit.soft {
            format!(", raised from {}", limit.soft_before)
        } else {
            String::new()
        },
        udp_total
    );
    if plan.total < args.max_connections {
        tracing::warn!(
            "{} workers hold about {} connections, fewer than --max-connections {}",
            plan.workers,
            plan.total,
            args.max_connections
        );
    }

    if plan.workers > 1 && read_sysctl("net/ipv4/tcp_migrate_req").as_deref() == Some("0") {
        tracing::info!(
            "net.ipv4.tcp_migrate_req is 0: should a worker die, connections still waiting in its \
             accept queue are reset; `sysctl -w net.ipv4.tcp_migrate_req=1` hands them to the other workers"
        );
    }

    let config = SupervisorConfig {
        rules: Arc::new(file),
        workers: plan.workers,
        per_worker_connections: plan.per_worker,
        capacity: plan.total,
        udp_capacity: udp_total,
        worker_args: worker_args(args, udp_per_worker, sockmap::check(args.data_path)),
        health_interval: (args.health_interval_s > 0)
            .then(|| Duration::from_secs(args.health_interval_s)),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
    };
    let sup = Supervisor::new(config, set)?;
    if let Some(problem) = service::privilege::rules_write_problem(&rules_path) {
        tracing::warn!("{problem}");
    }
    service::signals::log_status_on_usr1(sup.clone())?;
    if !args.no_web {
        let limits = args.web_limits.clone();
        forwarder::web::start(
            sup.clone(),
            args.web,
            args.web_token.clone(),
            web_tls,
            limits,
        )
        .map_err(service::exit::bind_failure)?;
    }
    sup.run()?;
    Ok(ExitCode::SUCCESS)
}

/// `./entries.csv`, created with a commented example when it does not exist.
fn default_rules_file() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from("entries.csv");
    if !path.exists() {
        std::fs::write(&path, rules::EXAMPLE_FILE)
            .with_context(|| format!("creating {}", path.display()))?;
        eprintln!("created {} with an example (no rules yet)", path.display());
    }
    Ok(path)
}

/// The rule table, as the original printed it: each listening port and its destinations.
fn print_rules(label: &str, set: &RuleSet) {
    eprintln!("rules from {label}:");
    if set.pools.is_empty() {
        eprintln!("  (none: add rows name,listen_port,dest_ip,dest_port)");
    }
    for p in &set.pools {
        let mode = match (p.rules.len() > 1, p.options.balance) {
            (false, _) => "",
            (true, rules::options::Balance::RoundRobin) => "  (round robin)",
            (true, rules::options::Balance::LeastConn) => "  (least connections)",
            (true, rules::options::Balance::Source) => "  (source hash)",
        };
        eprintln!(
            "  {:<22} -> {}{mode}",
            p.label(),
            supervisor::describe_pool(p)
        );
    }
}

/// Flags a worker needs, passed on from the supervisor's own command line.
fn worker_args(args: &Args, udp_sessions: usize, data_path: DataPath) -> Vec<String> {
    let mut v = vec![
        "--log-level".into(),
        args.log_level.clone(),
        "--connect-timeout-ms".into(),
        args.connect_timeout_ms.to_string(),
        "--idle-timeout-s".into(),
        args.idle_timeout_s.to_string(),
        "--drain-timeout-s".into(),
        args.drain_timeout_s.to_string(),
        "--udp-idle-timeout-s".into(),
        args.udp_idle_timeout_s.to_string(),
        "--worker-udp-sessions".into(),
        udp_sessions.to_string(),
    ];
    if args.no_splice {
        v.push("--no-splice".into());
    }
    if data_path == DataPath::Sockmap {
        v.extend(["--data-path".into(), "sockmap".into()]);
    }
    if let Some(path) = &args.access_log {
        // Workers start elsewhere than the supervisor may be asked to run: an absolute path.
        let path = match access_log::Target::parse(path) {
            access_log::Target::File(p) => {
                std::path::absolute(&p).unwrap_or(p).display().to_string()
            }
            access_log::Target::Stdout => "-".into(),
        };
        let format = match args.access_log_format {
            access_log::Format::Text => "text",
            access_log::Format::Json => "json",
        };
        v.extend([
            "--access-log".into(),
            path,
            "--access-log-format".into(),
            format.into(),
        ]);
    }
    for (flag, value) in [("--allow", &args.allow), ("--deny", &args.deny)] {
        if let Some(value) = value {
            v.extend([flag.to_string(), value.clone()]);
        }
    }
    v
}

/// A clap value parser that checks a CIDR list and keeps its text (workers get the text).
fn cidr_list(flag: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |s: &str| rules::options::cidrs(flag, s).map(|_| s.to_string())
}

fn parse_cidrs(flag: &str, value: &Option<String>) -> anyhow::Result<Vec<ipnet::IpNet>> {
    match value {
        Some(v) => rules::options::cidrs(flag, v).map_err(anyhow::Error::msg),
        None => Ok(Vec::new()),
    }
}

/// A kernel setting from /proc/sys (path with slashes), trimmed; `None` when it cannot be read.
fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()
        .map(|s| s.trim().to_string())
}
