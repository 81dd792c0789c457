//! `forwarder`: command line and wiring. The same binary is the supervisor and, re-executed with
//! one hidden flag naming the descriptors it inherits, each worker process (whose settings come
//! as a typed frame on the control socket: [`forwarder::worker::WorkerConfig`]).

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
use forwarder::tcp::data_path::{self, Choice, DataPath};
use forwarder::worker::{self, WorkerConfig};

/// Pipes one worker may hold for splicing (two descriptors each).
const PIPES_PER_WORKER: usize = 128;

/// TCP and UDP port forwarder and round-robin load balancer.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

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

    /// Shortest time a backend host name's answer is kept before asking again (its TTL is
    /// raised to this)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    dns_min_ttl_s: u64,

    /// Longest time a backend host name's answer is kept before asking again (its TTL is cut
    /// to this)
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    dns_max_ttl_s: u64,

    /// Which addresses of a backend host name become pool members
    #[arg(long, value_enum, default_value_t = forwarder::dns::Family::PreferIpv4)]
    dns_family: forwarder::dns::Family,

    /// The same as --data-path copy (kept for scripts that used it)
    #[arg(long)]
    no_splice: bool,

    /// How established TCP connections move bytes: copy or splice (user space), auto (whichever a
    /// calibration at start finds cheaper here), or sockmap (the kernel, via a BPF verdict
    /// program; needs CAP_BPF and CAP_NET_ADMIN, else splice is used) [default: auto]
    #[arg(long, value_enum)]
    data_path: Option<DataPath>,

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

    /// Outbound address of every backend connection whose row has no source= (bind before
    /// connect); once for IPv4 and once for IPv6 at most [default: the route's choice]
    #[arg(long, value_name = "ADDR")]
    source: Vec<std::net::IpAddr>,

    /// Set by the supervisor when it starts a worker: the inherited stats mapping and control
    /// socket. The worker's settings then come as one frame on that socket.
    #[arg(long, hide = true, value_name = "STATS,CONTROL")]
    worker_fds: Option<String>,
    /// With --worker-fds: which worker this is, as a label for `ps` (the configuration frame
    /// says it too, and the two must agree).
    #[arg(long, hide = true, requires = "worker_fds")]
    worker_index: Option<usize>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print, apply or undo the policy routing rules with `transparent` need on this gateway
    /// (fwmark 0x1281 -> local route table 1281, nft table inet forwarder_tproxy)
    TransparentSetup {
        #[arg(value_enum)]
        action: service::tproxy::Action,
    },
}

fn main() -> ExitCode {
    testbed::docs::generate_if_asked::<Args>(&service::man_sections());
    let args = Args::parse();
    if let Some(Command::TransparentSetup { action }) = args.command {
        testbed::logging::init(&args.log_level);
        return match service::tproxy::run(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("forwarder transparent-setup: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match &args.worker_fds {
        Some(fds) => run_worker(fds, args.worker_index),
        None => {
            testbed::logging::init(&args.log_level);
            run_supervisor(&args)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forwarder: {e:#}");
            service::exit::code_of(&e)
        }
    }
}

/// A worker: every setting comes from the supervisor's configuration frame, none from flags.
fn run_worker(fds: &str, label: Option<usize>) -> anyhow::Result<ExitCode> {
    service::signals::ignore_in_worker();
    let (stats, control) = fds
        .split_once(',')
        .context("--worker-fds is STATS,CONTROL")?;
    let mut fds = worker::Inherited {
        stats_fd: stats.parse().context("--worker-fds: STATS")?,
        control_fd: control.parse().context("--worker-fds: CONTROL")?,
        pending: Default::default(),
    };
    let config = worker::receive_config(&mut fds).context("starting a worker")?;
    if let Some(label) = label.filter(|&l| l != config.index) {
        bail!(
            "--worker-index {label} but the configuration frame is worker {}'s",
            config.index
        );
    }
    testbed::logging::init(&config.log_level);
    testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    worker::run(config, fds)?;
    Ok(ExitCode::SUCCESS)
}

fn run_supervisor(args: &Args) -> anyhow::Result<ExitCode> {
    // Flags that contradict each other: said before anything is read or started.
    let asked = asked_data_path(args).map_err(|e| Exit::config(e.to_string()))?;
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
    let default_sources =
        forwarder::outbound::parse_default_sources(&args.source).map_err(Exit::config)?;
    print_rules(&label, &set);
    let transparent: Vec<String> = set
        .rules()
        .filter(|r| r.options.transparent)
        .map(|r| format!("{} ({} -> {})", r.entry.name, r.entry.listen_port, r.dest))
        .collect();
    if !transparent.is_empty() {
        eprintln!(
            "transparent (the backend sees the client's address; replies must route back through \
             this host, see `forwarder transparent-setup print`): {}",
            transparent.join(", ")
        );
    }
    if asked == DataPath::Sockmap {
        for p in set.pools.iter().filter(|p| p.options.rates.any()) {
            eprintln!(
                "  {}: bandwidth limits: relayed in user space (the sockmap data path cannot hold bytes back)",
                p.label()
            );
        }
    }
    // Raised before `--check` answers, so it checks against the limit the start will have.
    let limit = testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let listen_budget = capacity::listen_budget(limit.soft, PIPES_PER_WORKER * 2);
    let steering = match &args.user {
        Some(user) => Err(format!(
            "--user {user} drops CAP_NET_ADMIN, which nftables needs"
        )),
        None => forwarder::steer::Steering::probe(&rules_path),
    };
    let steering_state = steering.as_ref().map(|_| ()).map_err(|s| s.as_str());
    print_steering(&set, &steering);
    if let Err(e) = forwarder::ranges::check_limits(&set, &label, listen_budget, steering_state) {
        eprintln!("{e}");
        bail!(Exit::config(format!(
            "{label}: {} error(s); nothing started",
            e.0.len()
        )));
    }
    if let Err(e) = supervisor::check_bindable(&set, &label, steering.is_ok()) {
        eprintln!("{e}");
        bail!(Exit::cannot_bind(format!(
            "{label}: {} port(s) cannot be listened on",
            e.0.len()
        )));
    }
    if args.check {
        // Host names are looked up now as a warning only: a name that does not resolve leaves
        // its backend down until it does, it does not refuse the file.
        warn_unresolved(&set, &label, &dns_config(args));
        eprintln!("{label}: OK");
        return Ok(ExitCode::SUCCESS);
    }
    // Transparent sources and marks need CAP_NET_ADMIN after --user too (only when a rule asks).
    let net_admin = set
        .rules()
        .any(|r| r.options.transparent || r.options.mark.is_some());
    let keep: &[u32] = if net_admin {
        &[service::privilege::CAP_NET_ADMIN]
    } else {
        &[]
    };
    service::privilege::drop_to(args.user.as_deref(), args.refuse_root, keep)
        .map_err(|e| Exit::config(e.to_string()))?;

    // Read before anything starts, so a bad pair is one line and nothing to clean up.
    let web_tls = match (&args.web_cert, &args.web_key) {
        (Some(cert), Some(key)) if !args.no_web => Some(forwarder::web::tls::load(cert, key)?),
        _ => None,
    };

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let plan = capacity::plan(
        args.max_connections,
        args.workers,
        limit.soft,
        PIPES_PER_WORKER * 2
            + forwarder::ranges::listeners_per_worker(&set, steering.is_ok())
                .saturating_sub(capacity::LISTENERS_IN_RESERVE),
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

    let data_path = data_path::choose(asked);
    eprintln!("{}", data_path.describe());
    let config = SupervisorConfig {
        rules: Arc::new(file),
        workers: plan.workers,
        capacity: plan.total,
        udp_capacity: udp_total,
        worker: worker_config(args, plan.per_worker, udp_per_worker, &data_path)?,
        data_path,
        health_interval: (args.health_interval_s > 0)
            .then(|| Duration::from_secs(args.health_interval_s)),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        default_sources,
        listen_budget,
        steering,
        dns: dns_config(args),
    };
    let sup = Supervisor::new(config, set)?;
    if let Some(problem) = service::privilege::rules_write_problem(&rules_path) {
        tracing::warn!("{problem}");
    }
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

/// How each range is served, and why (for `--check` and the start).
fn print_steering(set: &RuleSet, steering: &Result<forwarder::steer::Steering, String>) {
    use forwarder::steer::{wants_steering, STEER_MIN_PORTS};
    for p in set.pools.iter().filter(|p| !p.ports.is_single()) {
        let how = match steering {
            Ok(s) if wants_steering(p) => format!(
                "steered to one listening socket per worker by nftables (table inet {}): {STEER_MIN_PORTS} ports or more",
                s.table
            ),
            Err(why) if wants_steering(p) => {
                format!("served port by port, one listening socket per port per worker: {why}")
            }
            _ if p.proto == rules::Proto::Udp => {
                "served port by port, one socket per port per worker (UDP ranges always are)"
                    .to_string()
            }
            _ => format!(
                "served port by port, one listening socket per port per worker (fewer than {STEER_MIN_PORTS} ports)"
            ),
        };
        eprintln!("  {}: {} ports {how}", p.label(), p.ports.len());
    }
}

/// Flags a worker needs, passed on from the supervisor's own command line.
/// The settings every worker gets (its index is set as it starts): the one frame that carries
/// the command line to the workers.
fn worker_config(
    args: &Args,
    max_connections: usize,
    udp_sessions: usize,
    data_path: &Choice,
) -> anyhow::Result<WorkerConfig> {
    // Workers start elsewhere than the supervisor may be asked to run: an absolute path.
    let access_log = args.access_log.as_deref().map(|t| {
        let target = match access_log::Target::parse(t) {
            access_log::Target::File(p) => {
                access_log::Target::File(std::path::absolute(&p).unwrap_or(p))
            }
            stdout => stdout,
        };
        (target, args.access_log_format)
    });
    Ok(WorkerConfig {
        index: 0,
        log_level: args.log_level.clone(),
        max_connections: max_connections.max(1),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        idle_timeout: (args.idle_timeout_s > 0).then(|| Duration::from_secs(args.idle_timeout_s)),
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        splice: data_path.splices(),
        max_pipes: PIPES_PER_WORKER,
        data_path: data_path.path,
        default_allow: parse_cidrs("--allow", &args.allow)?,
        default_deny: parse_cidrs("--deny", &args.deny)?,
        access_log,
        udp_idle_timeout: Duration::from_secs(args.udp_idle_timeout_s),
        udp_max_sessions: udp_sessions.max(1),
    })
}

/// `--data-path`, with `--no-splice` as its old spelling of `copy`.
fn asked_data_path(args: &Args) -> anyhow::Result<DataPath> {
    match (args.no_splice, args.data_path) {
        (false, asked) => Ok(asked.unwrap_or_default()),
        (true, None | Some(DataPath::Copy)) => Ok(DataPath::Copy),
        (true, Some(other)) => bail!(
            "--no-splice means --data-path copy; it contradicts --data-path {}",
            other.name()
        ),
    }
}

fn dns_config(args: &Args) -> forwarder::dns::DnsConfig {
    forwarder::dns::DnsConfig {
        min_ttl: Duration::from_secs(args.dns_min_ttl_s),
        max_ttl: Duration::from_secs(args.dns_max_ttl_s.max(args.dns_min_ttl_s)),
        family: args.dns_family,
    }
}

/// `--check`: says which host names do not resolve now (`file:line: dest_ip: warning: ...`).
fn warn_unresolved(
    set: &forwarder::rules::RuleSet,
    label: &str,
    config: &forwarder::dns::DnsConfig,
) {
    let rules: Vec<_> = set.rules().filter(|r| r.host.is_some()).collect();
    if rules.is_empty() {
        return;
    }
    let resolver = match forwarder::dns::Resolver::new(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{label}: warning: cannot check host names: {e:#}");
            return;
        }
    };
    for r in rules {
        let host = r.host.as_deref().unwrap_or_default();
        match resolver.lookup(host) {
            Ok((addrs, _)) => eprintln!(
                "{label}:{}: dest_ip: {host} resolves to {}",
                r.line,
                forwarder::dns::list(&addrs)
            ),
            Err(why) => eprintln!(
                "{label}:{}: dest_ip: warning: {host} does not resolve ({why}); its backend stays down until it does",
                r.line
            ),
        }
    }
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
