//! `ssl-echo-client agent`: runs on each client PC and waits for a coordinator. A coordinator
//! that says hello with the right token sends the plans of this PC's worker processes; the agent
//! starts them, relays their messages, and passes on the go and the stop. The workers connect only
//! to the target in the plans; the agent itself connects nowhere. One coordinator at a time (another
//! is refused as busy); when it goes away the agent stops its workers and waits for the next. A
//! connection that has not greeted is bounded by [`crate::gate`]: it holds a slot only for the
//! hello limit, and one address can hold only a few.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::coordinator::{start_worker, Event};
use crate::gate::{Gate, Reason, LIMITS};
use crate::link::{self, FromAgent, ToAgent, PROTOCOL};

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
        let port = Arc::new(Port {
            args: args.clone(),
            nofile: limit.soft,
            gate: Mutex::new(Gate::new(LIMITS)),
            run: tokio::sync::Mutex::new(()),
        });
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: the listener stays readable, so wait instead of spinning.
                    tracing::warn!("accepting a coordinator: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admitted = port.gate().admit(peer.ip());
            if let Err(reason) = admitted {
                port.note(peer.ip(), reason);
                drop(stream); // refused at once: it costs nothing more
                continue;
            }
            let port = Arc::clone(&port);
            tokio::spawn(async move {
                let greeting = Greeting {
                    port: &port,
                    ip: peer.ip(),
                };
                match serve(stream, greeting).await {
                    Ok(Served::Run) => eprintln!("coordinator {peer}: run over"),
                    Ok(Served::Nothing) => {}
                    Err(e) => eprintln!("coordinator {peer}: {e:#}"),
                }
            });
        }
    })
}

/// What every connection to the control port shares.
struct Port {
    args: AgentArgs,
    nofile: u64,
    gate: Mutex<Gate>,
    /// Held by the one coordinator whose run is on; another one is refused as busy.
    run: tokio::sync::Mutex<()>,
}

impl Port {
    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        // The gate's counters stay usable even if a task panicked while holding the lock.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a refusal or cut, and logs it when a line about this address is due.
    fn note(&self, ip: IpAddr, reason: Reason) {
        if let Some(line) = self.gate().count(ip, reason, Instant::now()) {
            tracing::warn!("{line}");
        }
    }
}

/// A connection still greeting: holds its address's slot in the gate until dropped.
struct Greeting<'a> {
    port: &'a Port,
    ip: IpAddr,
}

impl Drop for Greeting<'_> {
    fn drop(&mut self) {
        self.port.gate().release(self.ip);
    }
}

/// How a connection to the control port ended (errors aside).
enum Served {
    /// A coordinator's run went from plans to the end.
    Run,
    /// Nothing ran: a coordinator only checking the agent, or a stranger refused or cut (counted
    /// and logged by the gate).
    Nothing,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads one line within `limit` and `max` bytes; a slow, overlong or unreadable line is counted
/// against the address and ends the connection (`Ok(None)`: the other side closed).
async fn read_head(
    reader: &mut link::Reader,
    greeting: &Greeting<'_>,
    limit: std::time::Duration,
    max: usize,
) -> Result<Option<ToAgent>, Reason> {
    match tokio::time::timeout(limit, link::recv_bounded::<ToAgent>(reader, max)).await {
        Err(_) => Err(Reason::Slow),
        Ok(Ok(msg)) => Ok(msg),
        Ok(Err(e)) if e.is::<link::LineTooLong>() => Err(Reason::TooLong),
        Ok(Err(e)) => {
            tracing::debug!("control port: {}: {e:#}", greeting.ip);
            Err(Reason::Refused)
        }
    }
    .inspect_err(|&reason| greeting.port.note(greeting.ip, reason))
}

/// One connection to the control port: a coordinator from hello to the end of its run, or a
/// stranger cut within the limits of [`LIMITS`].
async fn serve(stream: TcpStream, greeting: Greeting<'_>) -> anyhow::Result<Served> {
    let port = greeting.port;
    let args = &port.args;
    let limits = *port.gate().limits();
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = link::split(stream);
    let hello = match read_head(
        &mut reader,
        &greeting,
        limits.hello_timeout,
        limits.hello_bytes,
    )
    .await
    {
        Ok(Some(hello)) => hello,
        Ok(None) | Err(_) => return Ok(Served::Nothing),
    };
    let refusal = match &hello {
        ToAgent::Hello { protocol, .. } if *protocol != PROTOCOL => Some(format!(
            "protocol {protocol}, this agent speaks {PROTOCOL} (use the same version on every PC)"
        )),
        ToAgent::Hello { token, .. } => match (&args.token, token) {
            (None, _) => None,
            (Some(want), Some(got)) if constant_time_eq(want.as_bytes(), got.as_bytes()) => None,
            (Some(_), Some(_)) => Some("wrong token".to_string()),
            (Some(_), None) => Some("this agent needs a token (--agent-token)".to_string()),
        },
        _ => Some("expected a hello".to_string()),
    };
    let running = match refusal {
        Some(reason) => Err((Reason::Refused, reason)),
        None => port.run.try_lock().map_err(|_| {
            (
                Reason::Busy,
                "busy: another coordinator's run is on".to_string(),
            )
        }),
    };
    let _running = match running {
        Ok(guard) => guard,
        Err((why, reason)) => {
            port.note(greeting.ip, why);
            let _ = link::send(
                &mut writer,
                &FromAgent::Refused {
                    reason: reason.clone(),
                },
            )
            .await;
            bail!("refused: {reason}");
        }
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nofile = port.nofile;
    link::send(&mut writer, &FromAgent::Welcome { host, nofile, cpus }).await?;
    let plans = read_head(
        &mut reader,
        &greeting,
        limits.plans_timeout,
        limits.plans_bytes,
    )
    .await;
    let mut plans = match plans {
        Ok(Some(ToAgent::Plans { plans })) => plans,
        Ok(None) => return Ok(Served::Nothing), // only checking that the agent is there
        Ok(Some(other)) => bail!("expected the plans, got {other:?}"),
        Err(reason) => bail!("no plans: {}", reason.name()),
    };
    // The greeting is over: the run does not hold the address's slot.
    drop(greeting);
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
    Ok(Served::Run)
}
