//! Shared by the chat-server integration tests: start the real binary on a free loopback port and
//! talk to it like a line-based client would, reading with deadlines rather than sleeping.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use chat_server::protocol::ServerLine;
use testbed_dev::testing::{free_port, ChildGuard};

/// Generous: a bound for a failing test, not a performance claim.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct ChatServer {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
}

/// Starts chat-server on a free loopback port with `extra` flags and waits until it listens.
pub fn start(extra: &[&str]) -> ChatServer {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-server"));
    cmd.arg("--listen").arg(addr.to_string()).args(extra);
    let guard = ChildGuard::spawn(cmd);
    // Read from /proc rather than by connecting: a probe connection from 127.0.0.1 would count
    // against the server's per-address cap (`--max-per-address`) that the tests then measure.
    assert!(
        testbed_dev::testing::wait_until(PATIENCE, || is_listening(addr.port())),
        "chat-server did not listen on {addr}:\n{}",
        guard.output()
    );
    ChatServer { guard, addr }
}

/// True when a TCP socket listens on `port` (from /proc/net/tcp, without connecting).
pub fn is_listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|text| {
        text.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1).unwrap_or("");
            let state = fields.nth(1).unwrap_or("");
            format!("{local} ").ends_with(&hex) && state == "0A"
        })
    })
}

/// One line-protocol client.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    partial: Vec<u8>,
    /// Every line received, for failure messages.
    pub seen: Vec<String>,
}

impl Client {
    /// Connects and reads the HELLO greeting.
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to chat-server");
        Client::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_nodelay(true).unwrap();
        let mut client = Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            partial: Vec::new(),
            seen: Vec::new(),
        };
        let hello = client.line();
        assert!(hello.starts_with("HELLO "), "greeting: {hello:?}");
        client
    }

    /// Connects, sends `nick` and reads up to the USERS line that ends the join sequence.
    pub fn join(addr: SocketAddr, nick: &str) -> Client {
        let mut client = Client::connect(addr);
        client.send(nick);
        let ok = client.line();
        assert!(
            ok.starts_with(&format!("OK {nick} ")),
            "reply to nick: {ok:?}"
        );
        client.until("USERS ");
        client
    }

    pub fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send to chat-server");
    }

    /// The next line, or None at end of stream or when `timeout` passes.
    pub fn try_line(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return None,
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let mut bytes = std::mem::take(&mut self.partial);
                    bytes.pop();
                    let line = String::from_utf8(bytes).expect("server sent UTF-8");
                    self.seen.push(line.clone());
                    return Some(line);
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    /// The next line; panics if none comes.
    pub fn line(&mut self) -> String {
        match self.try_line(PATIENCE) {
            Some(line) => line,
            None => panic!("no line from the server; saw {:#?}", self.seen),
        }
    }

    /// Reads until a line starts with `prefix`, and returns it.
    pub fn until(&mut self, prefix: &str) -> String {
        self.until_match(|l| l.starts_with(prefix), prefix)
    }

    /// Reads until `pred` holds for a line, and returns it.
    pub fn until_match(&mut self, pred: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_line(left) {
                Some(line) if pred(&line) => return line,
                Some(_) => {}
                None => panic!("never got {what:?}; last lines: {:#?}", tail(&self.seen)),
            }
        }
    }

    /// The next line, parsed.
    pub fn parsed(&mut self) -> ServerLine {
        let line = self.line();
        ServerLine::parse(&line).unwrap_or_else(|e| panic!("{e}"))
    }

    /// True once the server closed the connection (reads return end of stream).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            let mut sink = Vec::new();
            match self.reader.read_until(b'\n', &mut sink) {
                Ok(0) => return true,
                Ok(_) => self.seen.push(String::from_utf8_lossy(&sink).into_owned()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }

    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }
}

fn tail(lines: &[String]) -> &[String] {
    &lines[lines.len().saturating_sub(10)..]
}

/// A MSG line's (nick, text), or None for other lines.
pub fn msg(line: &str) -> Option<(String, String)> {
    match ServerLine::parse(line).ok()? {
        ServerLine::Msg { nick, text, .. } => Some((nick, text)),
        _ => None,
    }
}
