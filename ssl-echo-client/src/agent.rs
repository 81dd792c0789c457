//! `ssl-echo-client agent`: runs on each client PC and waits for a coordinator. A coordinator
//! that says hello with the right token sends the plans of this PC's worker processes; the agent
//! starts them, relays their messages, and passes on the go and the stop. The workers connect only
//! to the target in the plans; the agent itself connects nowhere. One coordinator at a time; when
//! it goes away the agent stops its workers and waits for the next.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::coordinator::{start_worker, Event};
use crate::link::{self, FromAgent, ToAgent, GREETING_TIMEOUT, PROTOCOL};

/// `ssl-echo-client agent` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Address and port to wait for the coordinator on.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,

    /// Token the coordinator must send (its --agent-token); required off loopback. The link is
    /// not encrypted: use it on a lab network.
    #[arg(long, env = "SSL_ECHO_CLIENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// This PC's local addresses to spread its connections over (comma-separated); replaces the
    /// coordinator's --source-ip.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub source_ip: Vec<IpAddr>,
}

/// Runs the agent until it is killed.
pub fn main(args: &AgentArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() && args.token.as_deref().is_none_or(str::is_empty) {
        bail!(
            "--listen {}: an agent off loopback needs --token (any coordinator that reaches the \
             port could otherwise make this PC open connections)",
            args.listen
        );
    }
    let limit = testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    // The agent only relays; its workers do the work.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}", args.listen))?;
        eprintln!(
            "agent listening on {} (open-file limit {})",
            listener.local_addr()?,
            limit.soft
        );
        loop {
            let (stream, peer) = listener.accept().await.context("accepting")?;
            match serve(stream, args, limit.soft).await {
                Ok(()) => eprintln!("coordinator {peer}: run over"),
                Err(e) => eprintln!("coordinator {peer}: {e:#}"),
            }
        }
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One coordinator, from hello to the end of its run.
async fn serve(stream: TcpStream, args: &AgentArgs, nofile: u64) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = link::split(stream);
    let hello = tokio::time::timeout(GREETING_TIMEOUT, link::recv::<ToAgent>(&mut reader))
        .await
        .context("no hello in time")??;
    let refusal = match &hello {
        Some(ToAgent::Hello { protocol, .. }) if *protocol != PROTOCOL => Some(format!(
            "protocol {protocol}, this agent speaks {PROTOCOL} (use the same version on every PC)"
        )),
        Some(ToAgent::Hello { token, .. }) => match (&args.token, token) {
            (None, _) => None,
            (Some(want), Some(got)) if constant_time_eq(want.as_bytes(), got.as_bytes()) => None,
            (Some(_), Some(_)) => Some("wrong token".to_string()),
            (Some(_), None) => Some("this agent needs a token (--agent-token)".to_string()),
        },
        _ => Some("expected a hello".to_string()),
    };
    if let Some(reason) = refusal {
        let _ = link::send(
            &mut writer,
            &FromAgent::Refused {
                reason: reason.clone(),
            },
        )
        .await;
        bail!("refused: {reason}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    link::send(&mut writer, &FromAgent::Welcome { host, nofile, cpus }).await?;
    let mut plans = match link::recv::<ToAgent>(&mut reader).await? {
        Some(ToAgent::Plans { plans }) => plans,
        None => return Ok(()), // only checking that the agent is there
        Some(other) => bail!("expected the plans, got {other:?}"),
    };
    if !args.source_ip.is_empty() {
        for p in &mut plans {
            p.config.source_ips = args.source_ip.clone();
        }
    }
    let connections: u64 = plans.iter().map(|p| p.connections).sum();
    eprintln!(
        "running {connections} connections to {} over {} process{}",
        plans
            .first()
            .map_or("-".to_string(), |p| p.config.addr.to_string()),
        plans.len(),
        if plans.len() == 1 { "" } else { "es" }
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut controls = Vec::with_capacity(plans.len());
    for (k, plan) in plans.iter().enumerate() {
        controls.push(start_worker(k, plan, tx.clone())?);
    }
    drop(tx);
    let mut ended = 0;
    let mut coordinator_gone = false;
    while ended < plans.len() {
        tokio::select! {
            event = rx.recv() => {
                let msg = match event {
                    None => break,
                    Some(Event::Msg(shard, msg)) => FromAgent::Shard { shard, msg },
                    Some(Event::Ended(shard, problem)) => {
                        ended += 1;
                        FromAgent::Ended { shard, problem }
                    }
                    Some(Event::AgentLost(..)) => continue,
                };
                if !coordinator_gone && link::send(&mut writer, &msg).await.is_err() {
                    coordinator_gone = true;
                    controls.clear(); // closes their stdin: they stop
                }
            }
            line = link::recv::<ToAgent>(&mut reader), if !coordinator_gone => {
                match line {
                    Ok(Some(ToAgent::Go { backends })) => {
                        let at = Instant::now();
                        for c in &mut controls {
                            c.go(at, backends.as_ref()).await;
                        }
                    }
                    Ok(Some(ToAgent::Stop)) => {
                        for c in &mut controls {
                            c.stop().await;
                        }
                    }
                    Ok(Some(other)) => tracing::warn!("ignoring {other:?} from the coordinator"),
                    Ok(None) | Err(_) => {
                        eprintln!("the coordinator went away: stopping the workers");
                        coordinator_gone = true;
                        controls.clear();
                    }
                }
            }
        }
    }
    Ok(())
}
