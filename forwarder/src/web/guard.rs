//! Time limits on each HTTP exchange of the page, which the HTTP server lacks: the request head
//! must arrive whole within `--web-head-timeout-ms` of its first byte (of the connection, for
//! the first request), the body within `--web-body-timeout-ms` of the head, and a connection idle
//! between requests is closed after `--web-idle-timeout-ms`. A slow head or body is answered 408
//! and closed, so one header line every few seconds no longer holds a slot. [`Exchange`] follows
//! the request bytes (sans-IO); [`Guarded`] sits between the HTTP server and the connection
//! (above TLS, so it sees the plain request) and enforces the clock.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::shield::{Reason, Shield};

/// Largest request head followed; a larger one is answered 431. A browser's is under 4 KiB.
pub const HEAD_LIMIT_BYTES: usize = 32 * 1024;

/// Headers parsed at most (hyper's own limit is 100).
const MAX_HEADERS: usize = 100;

/// How long the 408 or 431 answer may take to leave before the connection is dropped anyway.
const ANSWER_LIMIT: Duration = Duration::from_secs(1);

const ANSWER_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\
    Content-Type: text/plain; charset=utf-8\r\nContent-Length: 33\r\n\r\n\
    the request took too long to send";
const ANSWER_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\
    Content-Type: text/plain; charset=utf-8\r\nContent-Length: 29\r\n\r\n\
    the request head is too large";

/// Which limit applies now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Between requests: the idle limit.
    Idle,
    /// Part of a head has arrived (or none, on a fresh connection): the head limit.
    Head,
    /// The head announced a body that has not all arrived: the body limit.
    Body,
    /// The whole request is in; the server answers within its own deadlines.
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Head,
    /// `Some(n)`: `n` bytes of a `Content-Length` body still to come; `None`: a chunked body,
    /// followed until the server answers (every handler of the page reads the body first).
    Body(Option<u64>),
    Server,
    /// A head our parser refused: the HTTP server answers 400 and closes. Should it keep the
    /// connection anyway (a parser difference), the head's clock still ends it: a head this
    /// reader cannot follow never buys a connection time.
    Unreadable,
}

/// Follows one connection's requests through their phases from the bytes read and the fact
/// that the server wrote. Each phase change bumps [`Exchange::turn`], so the caller restarts
/// its clock for the new phase.
#[derive(Debug)]
pub struct Exchange {
    phase: Phase,
    head: Vec<u8>,
    turn: u64,
}

impl Default for Exchange {
    fn default() -> Exchange {
        Exchange::new()
    }
}

impl Exchange {
    /// A fresh connection waits for its first head.
    pub fn new() -> Exchange {
        Exchange {
            phase: Phase::Head,
            head: Vec::new(),
            turn: 0,
        }
    }

    pub fn wait(&self) -> Wait {
        match self.phase {
            Phase::Idle => Wait::Idle,
            Phase::Head | Phase::Unreadable => Wait::Head,
            Phase::Body(_) => Wait::Body,
            Phase::Server => Wait::Server,
        }
    }

    /// Counts phase changes: a new value means a new phase started now.
    pub fn turn(&self) -> u64 {
        self.turn
    }

    /// True when no byte of the current head has arrived yet.
    pub fn head_is_empty(&self) -> bool {
        self.head.is_empty()
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.turn += 1;
    }

    /// Takes bytes the client sent; an error when the head outgrew [`HEAD_LIMIT_BYTES`].
    pub fn read(&mut self, mut data: &[u8]) -> Result<(), Reason> {
        while !data.is_empty() {
            match self.phase {
                Phase::Idle | Phase::Server => {
                    // The next request (pipelined, or after the answer).
                    self.head.clear();
                    self.enter(Phase::Head);
                }
                Phase::Head => {
                    let before = self.head.len();
                    let take = data.len().min(HEAD_LIMIT_BYTES - before);
                    self.head.extend_from_slice(&data[..take]);
                    match parse_head(&self.head) {
                        Head::Partial if self.head.len() >= HEAD_LIMIT_BYTES => {
                            return Err(Reason::HeadTooLarge)
                        }
                        Head::Partial => data = &data[take..],
                        Head::Complete { len, body } => {
                            // What followed the head in this read is body or the next request.
                            let used = len - before;
                            data = &data[used..];
                            self.head.clear();
                            self.enter(match body {
                                Some(0) => Phase::Server,
                                body => Phase::Body(body),
                            });
                        }
                        Head::Invalid => {
                            // Same clock (no new turn); the rest is not followed.
                            self.head.clear();
                            self.phase = Phase::Unreadable;
                            return Ok(());
                        }
                    }
                }
                Phase::Body(Some(remaining)) => {
                    let take = (data.len() as u64).min(remaining);
                    data = &data[take as usize..];
                    if take == remaining {
                        self.enter(Phase::Server);
                    } else {
                        self.phase = Phase::Body(Some(remaining - take));
                    }
                }
                Phase::Body(None) | Phase::Unreadable => data = &[],
            }
        }
        Ok(())
    }

    /// The server wrote: its answer to the request in hand (or to a body it will not read).
    pub fn wrote(&mut self) {
        match self.phase {
            Phase::Server | Phase::Body(None) => self.enter(Phase::Idle),
            // Still sending the answer: the idle time counts from its last byte.
            Phase::Idle => self.turn += 1,
            // `100 Continue` before a counted body, or an answer while the next head arrives:
            // the client still owes those bytes in their own time.
            Phase::Body(Some(_)) | Phase::Head | Phase::Unreadable => {}
        }
    }
}

enum Head {
    Partial,
    /// The head is `len` bytes; `body` is what it announces (`None`: chunked).
    Complete {
        len: usize,
        body: Option<u64>,
    },
    Invalid,
}

/// Reads a request head the way the HTTP server will (httparse is its parser).
fn parse_head(bytes: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(_) => Head::Invalid,
        Ok(httparse::Status::Complete(len)) => {
            let mut body = Some(0);
            for h in request.headers.iter() {
                if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    body = None;
                    break;
                }
                if h.name.eq_ignore_ascii_case("content-length") {
                    match std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<u64>().ok())
                    {
                        Some(n) => body = Some(n),
                        None => return Head::Invalid,
                    }
                }
            }
            Head::Complete { len, body }
        }
    }
}

/// The time limits, from [`super::shield::Limits`].
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub head: Duration,
    pub body: Duration,
    pub idle: Duration,
}

enum State {
    Open,
    /// Sending the 408/431 answer before closing; `written` bytes of it are out.
    Answering {
        answer: &'static [u8],
        written: usize,
        reason: Reason,
        give_up: Pin<Box<Sleep>>,
    },
    /// Closed by us; reads and writes fail.
    Closed,
}

/// One connection of the page with the time limits of [`Exchange`] applied.
pub struct Guarded<S> {
    inner: S,
    exchange: Exchange,
    clock: Clock,
    /// Runs out when the current phase's limit is reached (not polled while the server works).
    timer: Pin<Box<Sleep>>,
    /// The [`Exchange::turn`] the timer was set for.
    timer_turn: u64,
    state: State,
    shield: Arc<Shield>,
    peer: SocketAddr,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, clock: Clock, shield: Arc<Shield>, peer: SocketAddr) -> Guarded<S> {
        Guarded {
            inner,
            exchange: Exchange::new(),
            clock,
            timer: Box::pin(tokio::time::sleep(clock.head)),
            timer_turn: 0,
            state: State::Open,
            shield,
            peer,
        }
    }

    /// Restarts the timer when a new phase began. The timer is polled here too, so the task is
    /// woken when it runs out even if the HTTP server reads again only after that (a read it
    /// left pending before writing its answer watches only the socket).
    fn rearm(&mut self, cx: &mut Context<'_>) {
        if self.exchange.turn() == self.timer_turn {
            return;
        }
        self.timer_turn = self.exchange.turn();
        let limit = match self.exchange.wait() {
            Wait::Idle => self.clock.idle,
            Wait::Head => self.clock.head,
            Wait::Body => self.clock.body,
            Wait::Server => return,
        };
        self.timer.as_mut().reset(Instant::now() + limit);
        // Registers the waker; `poll_limit` acts on it when the read side is polled.
        let _ = self.timer.as_mut().poll(cx);
    }

    fn answer(&mut self, answer: &'static [u8], reason: Reason) {
        self.shield.record(self.peer.ip(), reason);
        self.state = State::Answering {
            answer,
            written: 0,
            reason,
            give_up: Box::pin(tokio::time::sleep(ANSWER_LIMIT)),
        };
    }
}

fn cut(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("web page connection {}", reason.label()),
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    /// Sends what is left of the answer, then closes; `Ready` once the connection is done.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let State::Answering {
            answer,
            written,
            reason,
            give_up,
        } = &mut self.state
        else {
            return Poll::Ready(cut(Reason::Stalled));
        };
        let reason = *reason;
        if give_up.as_mut().poll(cx).is_ready() {
            self.state = State::Closed;
            return Poll::Ready(cut(reason));
        }
        while *written < answer.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    self.state = State::Closed;
                    return Poll::Ready(cut(reason));
                }
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        // The answer is out: flush it (TLS) and send FIN (and close_notify).
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => {
                self.state = State::Closed;
                Poll::Ready(cut(reason))
            }
        }
    }

    /// The read side found nothing: is the phase's time up?
    fn poll_limit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.exchange.wait() == Wait::Server || self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        match self.exchange.wait() {
            Wait::Idle => {
                self.shield.record(self.peer.ip(), Reason::Idle);
                self.state = State::Closed;
                // End of stream: the HTTP server closes quietly.
                Poll::Ready(Ok(()))
            }
            Wait::Head if self.exchange.head_is_empty() => {
                // Nothing was asked, so nothing to answer; counted as idle, not logged: browsers
                // open spare connections they may never use.
                self.shield.record(self.peer.ip(), Reason::Idle);
                self.state = State::Closed;
                Poll::Ready(Ok(()))
            }
            Wait::Head => {
                self.answer(ANSWER_408, Reason::HeadTimeout);
                self.poll_answer(cx).map(Err)
            }
            Wait::Body => {
                self.answer(ANSWER_408, Reason::BodyTimeout);
                self.poll_answer(cx).map(Err)
            }
            Wait::Server => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match me.state {
            State::Closed => return Poll::Ready(Ok(())),
            State::Answering { .. } => return me.poll_answer(cx).map(Err),
            State::Open => {}
        }
        let before = buf.filled().len();
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Err(reason) = me.exchange.read(&buf.filled()[before..]) {
                    // Nothing of it may reach the HTTP server.
                    buf.set_filled(before);
                    me.answer(ANSWER_431, reason);
                    return me.poll_answer(cx).map(Err);
                }
                me.rearm(cx);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => me.poll_limit(cx),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        match me.state {
            State::Open => {}
            // The read side is sending the answer and will end the connection.
            State::Answering { .. } => return Poll::Pending,
            State::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
        let written = Pin::new(&mut me.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            me.exchange.wrote();
            me.rearm(cx);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match me.state {
            State::Open => Pin::new(&mut me.inner).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        match me.state {
            State::Open => Pin::new(&mut me.inner).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The peer of a page connection, for handlers (`ConnectInfo<Peer>`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Wraps every connection of `inner` in [`Guarded`].
pub struct GuardedListener<L> {
    inner: L,
    clock: Clock,
    shield: Arc<Shield>,
}

impl<L> GuardedListener<L> {
    pub fn new(inner: L, shield: Arc<Shield>) -> GuardedListener<L> {
        let limits = shield.limits();
        let clock = Clock {
            head: limits.head(),
            body: limits.body(),
            idle: limits.idle(),
        };
        GuardedListener {
            inner,
            clock,
            shield,
        }
    }
}

impl<L> axum::serve::Listener for GuardedListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = Guarded<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        let (io, peer) = self.inner.accept().await;
        (
            Guarded::new(io, self.clock, Arc::clone(&self.shield), peer),
            peer,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl<L> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GuardedListener<L>>>
    for Peer
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, GuardedListener<L>>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_dribbled_byte_by_byte_stays_in_the_head_phase_until_its_blank_line() {
        let mut x = Exchange::new();
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-a: 1\r\n";
        for b in head {
            x.read(&[*b]).unwrap();
            assert_eq!(x.wait(), Wait::Head);
        }
        // No new phase while the same head dribbles: its clock keeps running.
        assert_eq!(x.turn(), 0);
        x.read(b"\r\n").unwrap();
        assert_eq!(x.wait(), Wait::Server);
        x.wrote();
        assert_eq!(x.wait(), Wait::Idle);
    }

    #[test]
    fn a_body_is_counted_and_pipelined_requests_start_new_heads() {
        let mut x = Exchange::new();
        x.read(b"POST /api/rules HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
            .unwrap();
        assert_eq!(x.wait(), Wait::Body);
        let turn = x.turn();
        x.read(b"cd").unwrap();
        assert_eq!((x.wait(), x.turn()), (Wait::Body, turn));
        x.read(b"eGET / HTTP/1.1\r\n").unwrap();
        assert_eq!(x.wait(), Wait::Head);
        x.read(b"\r\n").unwrap();
        assert_eq!(x.wait(), Wait::Server);
    }

    #[test]
    fn newlines_alone_never_end_a_head() {
        let mut x = Exchange::new();
        for _ in 0..100 {
            x.read(b"\r\n").unwrap();
        }
        assert_eq!((x.wait(), x.turn()), (Wait::Head, 0));
    }

    #[test]
    fn an_endless_head_is_refused_at_the_limit() {
        let mut x = Exchange::new();
        x.read(b"GET / HTTP/1.1\r\nX-filler: ").unwrap();
        let chunk = [b'a'; 1000];
        let mut result = Ok(());
        for _ in 0..(HEAD_LIMIT_BYTES / chunk.len() + 1) {
            result = x.read(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Reason::HeadTooLarge));
        // Too many header lines: the server refuses them (431); the head's clock still runs.
        let mut y = Exchange::new();
        y.read(b"GET / HTTP/1.1\r\n").unwrap();
        for i in 0..200 {
            y.read(format!("X-{i}: a\r\n").as_bytes()).unwrap();
        }
        assert_eq!((y.wait(), y.turn()), (Wait::Head, 0));
    }

    #[test]
    fn a_chunked_body_lasts_until_the_answer_and_garbage_is_left_to_the_server() {
        let mut x = Exchange::new();
        x.read(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello")
            .unwrap();
        assert_eq!(x.wait(), Wait::Body);
        x.wrote();
        assert_eq!(x.wait(), Wait::Idle);
        // What the parser refuses keeps the head's clock running (the server closes first).
        let mut y = Exchange::new();
        y.read(b"\x00\x01 garbage\r\n\r\n").unwrap();
        assert_eq!(
            (y.wait(), y.turn(), y.head_is_empty()),
            (Wait::Head, 0, true)
        );
        y.read(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        y.wrote();
        assert_eq!((y.wait(), y.turn()), (Wait::Head, 0));
        let mut z = Exchange::new();
        z.read(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            .unwrap();
        assert_eq!(z.wait(), Wait::Head);
    }

    #[test]
    fn the_answers_are_well_formed() {
        for answer in [ANSWER_408, ANSWER_431] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut r = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(len) = r.parse(answer).unwrap() else {
                panic!("partial answer");
            };
            let declared: usize = r
                .headers
                .iter()
                .find(|h| h.name == "Content-Length")
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .unwrap();
            assert_eq!(answer.len() - len, declared);
        }
    }
}
