//! Entry point: parse the command line, plan the processes, run, report.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use ssl_echo_client::args::{Args, Command};
use ssl_echo_client::backends::ForwarderApi;
use ssl_echo_client::coordinator::{self, OnLoss, Options, Placement, FD_RESERVE};
use ssl_echo_client::summary::Summary;
use ssl_echo_client::{agent, csv, link, report, worker};

fn main() -> ExitCode {
    testbed::docs::generate_if_asked::<Args>(&[]);
    let args = Args::parse();
    testbed::logging::init(&args.log_level);
    let result = match (&args.command, &args.worker_plan) {
        (Some(Command::Agent(a)), _) => agent::main(a).map(|()| ExitCode::SUCCESS),
        (None, Some(plan)) => worker::main(plan).map(|()| ExitCode::SUCCESS),
        (None, None) => run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ssl-echo-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of a run that completed with more failed or lost connections than `--max-errors`
/// allows (1 stays "could not run", 2 is clap's "bad command line").
const EXIT_TOO_MANY_ERRORS: u8 = 3;

/// Exit status of a run that completed within `--max-errors` but missed an objective (`--slo`).
/// 3 wins when both apply: too many errors make the figures moot.
const EXIT_SLO_FAILED: u8 = 4;

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let config = args.resolve()?;
    let forwarder = args
        .forwarder
        .as_deref()
        .map(|url| ForwarderApi::new(url, args.forwarder_token.clone()))
        .transpose()?;
    let limit = testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let report_path = args.report.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "reports/client-data-{}-{}.xlsx",
            config.connections,
            chrono::Local::now().format("%Y%m%d-%H%M%S")
        ))
    });

    if config.tls() {
        if let Some(path) = std::env::var_os(ssl_echo_client::tls::KEY_LOG_ENV) {
            // With --agents the connections are made on the agents' PCs, from their environment.
            if !args.agents.is_empty() {
                eprintln!(
                    "{}: the agents make the connections; set it where each agent runs",
                    ssl_echo_client::tls::KEY_LOG_ENV
                );
            } else {
                eprintln!(
                "{}={}: writing every connection's TLS secrets there (whoever has the file can \
                 decrypt a capture of this run)",
                ssl_echo_client::tls::KEY_LOG_ENV,
                    std::path::Path::new(&path).display()
                );
            }
        }
    }
    let agents = !args.agents.is_empty();
    let processes = if agents {
        1 // this process only coordinates
    } else {
        let needed =
            testbed::fdlimit::processes_needed(config.open_at_once(), 1, FD_RESERVE, limit.soft);
        let processes = args.processes.unwrap_or(needed).min(config.connections);
        eprintln!(
            "{} connection{} over {} process{} (open-file limit {})",
            config.connections,
            if config.connections == 1 { "" } else { "s" },
            processes,
            if processes == 1 { "" } else { "es" },
            limit.soft
        );
        if processes < needed {
            tracing::warn!(
                "--processes {processes} is fewer than the {needed} the open-file limit needs; \
                 connections beyond it will fail with \"too many open files\""
            );
        }
        processes
    };
    // One process: all cores to the connections. Several, or agents: this one only coordinates.
    let runtime = if processes == 1 && !agents {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    let opts = Options {
        show: std::io::stderr().is_terminal(),
        forwarder,
        barrier_timeout: std::time::Duration::from_secs_f64(args.barrier_timeout_s),
        on_loss: args.on_agent_loss,
        json_lines: args.json_lines.clone(),
        hdr_log: args.hdr_log.clone(),
    };
    let outcome = runtime.block_on(async {
        let placement = if agents {
            Placement::Agents(greet_agents(args, &config).await?)
        } else {
            Placement::Here { processes }
        };
        coordinator::run(config, placement, opts).await
    })?;

    let mut summary = Summary::of(&outcome);
    let slo_met = summary.judge(&args.slo);
    let written = report::write(&report_path, &outcome, &summary);
    if written.is_ok() {
        summary.report = Some(report_path.display().to_string());
    }
    let csv_path = csv::path_next_to(&report_path);
    let csv_written = csv::write(&csv_path, &outcome);
    eprint!("{}", summary.table());
    if let Some(w) = summary.saturation_warning() {
        tracing::warn!("{w}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    written?;
    csv_written?;
    if outcome.stopped_by_loss {
        eprintln!(
            "ssl-echo-client: the run was stopped: {}",
            outcome
                .lost
                .iter()
                .map(|l| format!("{} lost: {}", l.who, l.reason))
                .collect::<Vec<_>>()
                .join("; ")
        );
        return Ok(ExitCode::from(EXIT_TOO_MANY_ERRORS));
    }
    if summary.errors_total > args.max_errors {
        eprintln!(
            "ssl-echo-client: {} connection{} failed or {} lost (--max-errors {})",
            summary.errors_total,
            if summary.errors_total == 1 { "" } else { "s" },
            if summary.errors_total == 1 {
                "was"
            } else {
                "were"
            },
            args.max_errors
        );
        return Ok(ExitCode::from(EXIT_TOO_MANY_ERRORS));
    }
    if !slo_met {
        let failed: Vec<&str> = summary
            .slo
            .iter()
            .filter(|v| !v.passed)
            .map(|v| v.slo.as_str())
            .collect();
        eprintln!(
            "ssl-echo-client: objective{} not met: {}",
            if failed.len() == 1 { "" } else { "s" },
            failed.join(", ")
        );
        return Ok(ExitCode::from(EXIT_SLO_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Connects to every agent of `--agents`. One that cannot be reached or refuses stops the run
/// before anything started, or (`--on-agent-loss continue`) is left out and its share goes to the
/// others.
async fn greet_agents(
    args: &Args,
    config: &ssl_echo_client::config::RunConfig,
) -> anyhow::Result<Vec<link::AgentLink>> {
    // Every agent at once: a slow one does not delay the others' greeting.
    let greetings: Vec<_> = args
        .agents
        .iter()
        .map(|name| {
            let (name, token) = (name.clone(), args.agent_token.clone());
            tokio::spawn(async move {
                let result = link::connect(&name, token.as_deref()).await;
                (name, result)
            })
        })
        .collect();
    let mut links = Vec::new();
    for greeting in greetings {
        // A greeting does not panic; if one did, the run could not go on anyway.
        let (name, result) = greeting.await.expect("greeting task");
        match result {
            Ok(link) => {
                eprintln!(
                    "agent {name} ({}): open-file limit {}, {} cores",
                    link.host, link.nofile, link.cpus
                );
                links.push(link);
            }
            Err(e) if args.on_agent_loss == OnLoss::Continue => {
                eprintln!("agent {name} left out: {e:#}");
            }
            Err(e) => {
                anyhow::bail!("agent {name}: {e:#} (--on-agent-loss continue goes on without it)")
            }
        }
    }
    anyhow::ensure!(!links.is_empty(), "no agent could be reached");
    eprintln!(
        "{} connections to {} over {} agent{}",
        config.connections,
        config.addr,
        links.len(),
        if links.len() == 1 { "" } else { "s" }
    );
    Ok(links)
}
