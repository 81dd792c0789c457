//! The coordinator ↔ agent wire format: JSON lines over one TCP connection, read and written
//! only here. The coordinator says hello (with the token), the agent welcomes it (or refuses it
//! and closes), the coordinator sends the plans of the agent's worker processes, the agent relays
//! each worker's messages tagged with its shard number, and the coordinator sends go and stop.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::backends::BackendMap;
use crate::config::ShardPlan;
use crate::shard::WorkerMsg;

/// Bumped when the messages change incompatibly; an agent refuses another version.
pub const PROTOCOL: u32 = 1;

/// Limit for reaching an agent and for each step of the greeting.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// From the coordinator to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    Hello {
        protocol: u32,
        token: Option<String>,
    },
    /// One plan per worker process the agent is to start.
    Plans {
        plans: Vec<ShardPlan>,
    },
    /// The barrier is passed (with who serves which connection, if the coordinator asked).
    Go {
        backends: Option<BackendMap>,
    },
    Stop,
}

/// From an agent to the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    /// What the coordinator needs to size the agent's share into processes.
    Welcome {
        host: String,
        nofile: u64,
        cpus: usize,
    },
    Refused {
        reason: String,
    },
    /// A message of the agent's worker `shard` (an index into the plans it was sent).
    Shard {
        shard: usize,
        msg: WorkerMsg,
    },
    /// Worker `shard` ended (with the reason if it ended badly).
    Ended {
        shard: usize,
        problem: Option<String>,
    },
}

/// The reading side of a link.
pub type Reader = Lines<BufReader<OwnedReadHalf>>;

/// Writes one message as one line.
pub async fn send<T: Serialize>(w: &mut (impl AsyncWrite + Unpin), msg: &T) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await?;
    Ok(())
}

/// Reads the next message; `None` when the other side closed the connection.
pub async fn recv<T: DeserializeOwned>(r: &mut Reader) -> anyhow::Result<Option<T>> {
    match r.next_line().await? {
        None => Ok(None),
        Some(line) => {
            Ok(Some(serde_json::from_str(&line).with_context(|| {
                format!("unreadable message: {line:.200}")
            })?))
        }
    }
}

/// A line longer than the limit [`recv_bounded`] was given.
#[derive(Debug, thiserror::Error)]
#[error("a line longer than {0} bytes")]
pub struct LineTooLong(pub usize);

/// Like [`recv`], but reads at most `max` bytes for the line (a stranger cannot make the agent
/// buffer without end); a longer one is a [`LineTooLong`] error. Also `None` when the other side
/// closed in the middle of a line.
pub async fn recv_bounded<T: DeserializeOwned>(
    r: &mut Reader,
    max: usize,
) -> anyhow::Result<Option<T>> {
    let mut line = Vec::new();
    (&mut *r.get_mut())
        .take(max as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if line.last() != Some(&b'\n') {
        if line.len() > max {
            return Err(LineTooLong(max).into());
        }
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&line);
    Ok(Some(serde_json::from_str(text.trim_end()).with_context(
        || format!("unreadable message: {text:.200}"),
    )?))
}

/// Splits a connection into its two sides.
pub fn split(stream: TcpStream) -> (Reader, OwnedWriteHalf) {
    let (r, w) = stream.into_split();
    (BufReader::new(r).lines(), w)
}

/// A greeted agent, as the coordinator holds it.
pub struct AgentLink {
    /// As the user wrote it in `--agents` (names the agent in every message and in the report).
    pub name: String,
    pub host: String,
    pub nofile: u64,
    pub cpus: usize,
    pub reader: Reader,
    pub writer: OwnedWriteHalf,
}

/// Connects to the agent at `name` (`HOST:PORT`) and says hello.
pub async fn connect(name: &str, token: Option<&str>) -> anyhow::Result<AgentLink> {
    let stream = tokio::time::timeout(GREETING_TIMEOUT, TcpStream::connect(name))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {} s", GREETING_TIMEOUT.as_secs()))?
        .context("cannot connect")?;
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = split(stream);
    send(
        &mut writer,
        &ToAgent::Hello {
            protocol: PROTOCOL,
            token: token.map(str::to_string),
        },
    )
    .await?;
    let answer = tokio::time::timeout(GREETING_TIMEOUT, recv::<FromAgent>(&mut reader))
        .await
        .map_err(|_| anyhow::anyhow!("no welcome within {} s", GREETING_TIMEOUT.as_secs()))??;
    match answer {
        Some(FromAgent::Welcome { host, nofile, cpus }) => Ok(AgentLink {
            name: name.to_string(),
            host,
            nofile,
            cpus,
            reader,
            writer,
        }),
        Some(FromAgent::Refused { reason }) => bail!("refused: {reason}"),
        Some(other) => bail!("unexpected first message {other:?}"),
        None => bail!("closed the connection without a welcome"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader on a loopback connection whose other end wrote `bytes` and closed.
    async fn reader_of(bytes: &'static [u8]) -> Reader {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(bytes).await.unwrap();
        });
        let (stream, _) = listener.accept().await.unwrap();
        split(stream).0
    }

    #[tokio::test]
    async fn a_bounded_read_takes_a_line_refuses_a_long_one_and_sees_a_cut_one() {
        let mut r = reader_of(b"{\"type\":\"stop\"}\n{\"type\":\"stop\"}\n").await;
        assert!(matches!(
            recv_bounded::<ToAgent>(&mut r, 64).await.unwrap(),
            Some(ToAgent::Stop)
        ));
        // The rest of the stream is still read line by line afterwards.
        assert!(matches!(
            recv::<ToAgent>(&mut r).await.unwrap(),
            Some(ToAgent::Stop)
        ));

        let mut r = reader_of(&[b'x'; 100]).await;
        let e = recv_bounded::<ToAgent>(&mut r, 64).await.unwrap_err();
        assert!(e.is::<LineTooLong>(), "{e}");
        assert_eq!(e.to_string(), "a line longer than 64 bytes");

        let mut r = reader_of(b"{\"type\":").await;
        assert!(recv_bounded::<ToAgent>(&mut r, 64).await.unwrap().is_none());
    }
}
