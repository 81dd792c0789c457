//! Entry point: parse the command line, plan the processes, run, report.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use ssl_echo_client::args::Args;
use ssl_echo_client::summary::Summary;
use ssl_echo_client::{coordinator, report, worker};

/// Descriptors each process keeps for itself (stdio, the runtime's epoll and wakers, pipes to
/// workers, the CA file, the report) besides one per connection.
const FD_RESERVE: u64 = 100;

fn main() -> ExitCode {
    testbed::docs::generate_if_asked::<Args>(&[]);
    let args = Args::parse();
    testbed::logging::init(&args.log_level);
    let result = match &args.worker_plan {
        Some(plan) => worker::main(plan),
        None => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssl-echo-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let limit = testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let needed = testbed::fdlimit::processes_needed(config.connections, 1, FD_RESERVE, limit.soft);
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
    let report_path = args.report.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "reports/client-data-{}-{}.xlsx",
            config.connections,
            chrono::Local::now().format("%Y%m%d-%H%M%S")
        ))
    });

    // One process: all cores to the connections. Several: the parent only coordinates.
    let runtime = if processes == 1 {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    let show = std::io::stderr().is_terminal();
    let outcome = runtime.block_on(coordinator::run(config, processes, show))?;

    let mut summary = Summary::of(&outcome);
    let written = report::write(&report_path, &outcome, &summary);
    if written.is_ok() {
        summary.report = Some(report_path.display().to_string());
    }
    eprint!("{}", summary.table());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    written
}
