//! The connecting phase of a relay: picking the first backend (after the per-address limit),
//! the non-blocking connect with its deadline, the fall-over to the pool's next backend on
//! refusal or timeout, and what happens once the backend answers.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use mio::net::TcpStream;
use mio::Interest;

use crate::balance::{self, next_backend, pick_backend, Refusal};
use crate::stats::now_ms;
use crate::stats::per_ip::Admit;
use crate::tcp::proxy;
use crate::tcp::relay::{Context, Ending, Next, Phase, Relay, Sides};
use crate::tokens;

impl Relay {
    /// Counts the client against `max_conns_per_ip`, picks the first backend and connects.
    pub(super) fn route(&mut self, ctx: &mut Context) -> Next {
        if self.pool.sni.is_some() {
            return self.start_hello(ctx);
        }
        let client = self.client_addr.ip();
        let per_ip = self.pool.spec.options.max_conns_per_ip;
        if per_ip > 0 {
            match ctx
                .shared
                .admit_ip(ctx.worker, self.pool.spec.slot, client, per_ip)
            {
                Admit::Counted => self.per_ip_counted = true,
                Admit::Uncounted => {}
                Admit::Refused => return Next::Close(Ending::PerIpFull),
            }
        }
        match pick_backend(&self.pool, ctx.shared, ctx.worker, now_ms(), client) {
            Ok(index) => self.connect(index, Vec::new(), ctx),
            Err(Refusal::Full) => Next::Close(Ending::Full),
            Err(Refusal::NoBackend) => Next::Close(Ending::NoBackend),
        }
    }

    /// Starts a non-blocking connect to backend `index`, whose place the balancer reserved;
    /// `tried` are the ones already tried.
    pub(super) fn connect(
        &mut self,
        index: usize,
        mut tried: Vec<usize>,
        ctx: &mut Context,
    ) -> Next {
        self.backend_index = index;
        self.reserved = true;
        let spec = &self.pool.spec.backends[index];
        let addr = spec.addr;
        let opened = if crate::outbound::is_plain(&spec.options) {
            TcpStream::connect(addr)
        } else {
            crate::outbound::connect_tcp(addr, &spec.options, self.client_addr.ip())
        };
        let mut backend = match opened {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot open a socket to {addr}: {e}");
                return Next::Close(Ending::NoSocket(e));
            }
        };
        let token = tokens::backend(self.key);
        if let Err(e) =
            ctx.registry
                .register(&mut backend, token, Interest::READABLE | Interest::WRITABLE)
        {
            return Next::Close(Ending::NoSocket(e));
        }
        tracing::debug!(id = self.id, client = %self.client_addr, backend = %addr, "connecting");
        tried.push(index);
        let deadline = ctx.now + ctx.connect_timeout;
        // The previous attempt's socket (if any) is dropped here, which deregisters it.
        self.phase = Phase::Connecting {
            backend,
            deadline,
            tried,
        };
        Next::Timer(deadline)
    }

    /// The backend answered: count the connection and move both directions once, since bytes
    /// may already wait on either side.
    pub(super) fn connected(&mut self, ctx: &mut Context) -> Next {
        let Phase::Connecting { backend, .. } = std::mem::replace(&mut self.phase, Phase::Accepted)
        else {
            return Next::Wait;
        };
        let _ = backend.set_nodelay(true);
        let _ = socket2::SockRef::from(&backend).set_keepalive(true);
        let header = self.pool.spec.backends[self.backend_index]
            .options
            .send_proxy
            .map(|version| {
                // The pool's port is the one the client reached, also when nftables steered
                // the connection to another listening port (a range's first).
                let header_destination = self
                    .header_destination
                    .or_else(|| {
                        let local = self.client.local_addr().ok()?;
                        Some(SocketAddr::new(local.ip(), self.pool.spec.listen.port()))
                    })
                    .unwrap_or(self.pool.spec.listen);
                proxy::encode(version, self.client_addr, header_destination)
            });
        let slot = ctx.shared.backend(self.backend_slot());
        slot.total.fetch_add(1, Relaxed);
        if slot.record_success(now_ms()) {
            tracing::info!(backend = %self.backend_addr(), "backend up");
        }
        let mut header = header;
        let backend = match self.hand_to_kernel(backend, &mut header, ctx) {
            Ok(next) => return next,
            Err(backend) => backend,
        };
        self.phase = Phase::Relaying { backend };
        if let Some(header) = header {
            self.header_sent_bytes = header.len() as u64;
            self.header_sent_uncounted = self.header_sent_bytes;
            // Goes out before any client byte: the up direction flushes what it holds first.
            self.up.preload(&header, ctx.res);
        }
        self.pump(Sides::BOTH, ctx)
    }

    /// The backend being connected failed: mark it, then try the next backend of the pool, or
    /// give up when every backend was tried.
    pub(super) fn fail_over(&mut self, code: u64, why: &str, ctx: &mut Context) -> Next {
        let Phase::Connecting { tried, .. } = &mut self.phase else {
            return Next::Wait;
        };
        let tried = std::mem::take(tried);
        let failed = &self.pool.spec.backends[self.backend_index];
        if code == crate::stats::ERR_TIMEOUT {
            crate::outbound::note_timeout(failed, ctx.shared);
        }
        if ctx
            .shared
            .backend(failed.slot)
            .record_failure(code, now_ms())
        {
            tracing::warn!(backend = %failed.addr, name = %failed.name, "backend down: {why}");
        }
        balance::release(&self.pool, ctx.shared, ctx.worker, self.backend_index);
        self.reserved = false;
        let client = self.client_addr.ip();
        match next_backend(&self.pool, ctx.shared, ctx.worker, now_ms(), client, &tried) {
            Ok(index) => self.connect(index, tried, ctx),
            Err(Refusal::Full) => Next::Close(Ending::Full),
            Err(Refusal::NoBackend) => {
                tracing::debug!(
                    id = self.id,
                    "no backend of {} reachable",
                    self.pool.spec.listen
                );
                Next::Close(Ending::NoBackend)
            }
        }
    }
}

/// The outcome of a non-blocking connect after an event on the socket: None while it is still in
/// progress. An edge-triggered writable event without a pending error means connected; anything
/// else is checked with getpeername.
pub(super) fn connect_result(stream: &TcpStream, writable: bool) -> Option<io::Result<()>> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => return Some(Err(e)),
        Ok(None) if writable => return Some(Ok(())),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => Some(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
        Err(e) => Some(Err(e)),
    }
}
