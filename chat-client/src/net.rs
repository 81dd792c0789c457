//! The connection to chat-server, run on background threads so the window never waits on the
//! network: one thread resolves, connects and reads lines; a second writes what the UI queues.
//! Everything that happens comes back to the UI as a [`NetEvent`] on a channel, and the `wake`
//! callback asks the UI to repaint so it looks at the channel.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_server::protocol::ServerLine;

/// How long one connect attempt may take before the UI hears it failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the network threads report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEvent {
    /// The TCP connection is up (the server greets next).
    Connected { peer: String },
    /// A line from the server.
    Line(ServerLine),
    /// A line that does not follow the protocol (shown, not fatal).
    Garbled(String),
    /// The connection ended or never started; `error` says why, for the user.
    Closed { error: String },
}

/// Called from the network threads when an event is waiting.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// A connection in progress or established. Dropping it ends the connection politely: the writer
/// sends what was queued (a last `/quit`, say), then shuts the socket down, which ends the reader.
pub struct Connection {
    outgoing: Sender<String>,
    events: Receiver<NetEvent>,
    socket: Arc<Mutex<Option<TcpStream>>>,
    pub target: String,
}

impl Connection {
    /// Starts connecting to `host:port` in the background.
    pub fn start(host: &str, port: u16, wake: Wake) -> Connection {
        let (events_tx, events) = channel();
        let (outgoing, outgoing_rx) = channel::<String>();
        let socket = Arc::new(Mutex::new(None));
        let target = format_target(host, port);
        let shared = Arc::clone(&socket);
        let (host, name) = (host.to_string(), target.clone());
        let spawned = std::thread::Builder::new()
            .name("chat-net".into())
            .spawn(move || {
                let send = |event| {
                    let _ = events_tx.send(event);
                    wake();
                };
                let stream = match connect(&host, port) {
                    Ok(s) => s,
                    Err(error) => {
                        return send(NetEvent::Closed {
                            error: format!("cannot connect to {name}: {error}"),
                        })
                    }
                };
                let _ = stream.set_nodelay(true);
                let (Ok(writer), Ok(reader)) = (stream.try_clone(), stream.try_clone()) else {
                    return send(NetEvent::Closed {
                        error: "cannot set up the connection (out of file descriptors?)".into(),
                    });
                };
                *shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
                let peer = reader
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| name.clone());
                send(NetEvent::Connected { peer });
                let _ = std::thread::Builder::new()
                    .name("chat-net-write".into())
                    .spawn(move || write_lines(writer, outgoing_rx));
                let error = read_lines(reader, &send);
                send(NetEvent::Closed { error });
            });
        if let Err(e) = spawned {
            let (tx, rx) = channel();
            let _ = tx.send(NetEvent::Closed {
                error: format!("cannot start the network thread: {e}"),
            });
            return Connection {
                outgoing,
                events: rx,
                socket,
                target,
            };
        }
        Connection {
            outgoing,
            events,
            socket,
            target,
        }
    }

    /// Queues one line for the server (without its newline).
    pub fn send(&self, line: &str) {
        // A closed writer means the connection is gone; the reader reports that as Closed.
        let _ = self.outgoing.send(line.to_string());
    }

    /// The next event, if one is waiting.
    pub fn poll(&self) -> Option<NetEvent> {
        // Disconnected only after the final Closed event was taken, so both mean "nothing".
        self.events.try_recv().ok()
    }

    /// Closes the socket at once, dropping anything not yet sent; the threads notice and end.
    pub fn close(&self) {
        if let Some(s) = self.socket.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// `host:port`, with brackets around an IPv6 address.
pub fn format_target(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .collect();
    let mut last = format!("{host:?} resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Reads lines until the connection ends; returns why it ended.
fn read_lines(stream: TcpStream, send: &impl Fn(NetEvent)) -> String {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return "the server closed the connection".into(),
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                let line = String::from_utf8_lossy(&buf);
                match ServerLine::parse(&line) {
                    Ok(parsed) => send(NetEvent::Line(parsed)),
                    Err(e) => send(NetEvent::Garbled(e.to_string())),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return format!("connection lost: {e}"),
        }
    }
}

fn write_lines(mut stream: TcpStream, lines: Receiver<String>) {
    for line in lines {
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        if stream.write_all(&bytes).is_err() {
            break;
        }
    }
    // The UI dropped the connection: queued lines are in the kernel's buffer and still go out
    // before the FIN; shutting down reading too ends the reader thread.
    let _ = stream.shutdown(Shutdown::Both);
}
