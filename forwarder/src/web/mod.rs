//! The web page and its JSON API, served from the supervisor process on a small tokio runtime of
//! its own thread. Forwarding happens in the worker processes, so a slow, hung or panicking web
//! side never stops traffic; every call into the supervisor runs on a blocking thread with a
//! deadline, so the page never holds the supervisor's lock across an await. With a certificate
//! (`--web-cert`, `--web-key`) it is served over HTTPS ([`tls`]); without one off loopback it
//! still starts, but says at start and on the page that the token and the rules travel in clear.

mod api;
mod assets;
mod auth;
mod entries;
mod history;
mod limit;
mod metrics;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, put};
use axum::Router;
use tokio_rustls::rustls::ServerConfig;

use crate::control::ConnectionInfo;
use crate::supervisor::Supervisor;

pub use auth::Auth;

/// Largest request body accepted: a rule is well under 1 KiB.
const BODY_LIMIT_BYTES: usize = 16 * 1024;

/// Longest a request waits for the supervisor (it may be busy applying rules to the workers).
const SUPERVISOR_DEADLINE: Duration = Duration::from_secs(10);

/// Blocking threads for supervisor calls: enough for a few browsers, bounded so a stuck
/// supervisor cannot make the web side pile up threads.
const MAX_BLOCKING_THREADS: usize = 8;

/// What an operator is told, at start and on the page, when the page is plain HTTP off loopback.
pub const PLAIN_HTTP_WARNING: &str = "the web token and the rules travel unencrypted on the \
     network; serve the page over HTTPS with --web-cert certs/server.crt --web-key \
     certs/server.key (make the pair with `certs --san <this host's name or address>`)";

/// How long browsers keep to HTTPS for the page's host once they have seen it over HTTPS.
/// Browsers ignore it for IP addresses and localhost, so it only binds names.
const HSTS: &str = "max-age=31536000";

/// How the page reaches its browsers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Https,
    /// Plain HTTP bound to loopback: nothing crosses a network.
    LoopbackHttp,
    /// Plain HTTP reachable from the network: the token and the rules travel in clear.
    ExposedHttp,
}

impl Transport {
    fn for_bind(addr: SocketAddr, tls: bool) -> Transport {
        match (tls, addr.ip().is_loopback()) {
            (true, _) => Transport::Https,
            (false, true) => Transport::LoopbackHttp,
            (false, false) => Transport::ExposedHttp,
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            Transport::Https => "https",
            _ => "http",
        }
    }

    /// The warning the page shows as a banner, when there is one.
    fn warning(self) -> Option<&'static str> {
        (self == Transport::ExposedHttp).then_some(PLAIN_HTTP_WARNING)
    }
}

/// What every request handler shares.
#[derive(Clone)]
struct AppState {
    sup: Supervisor,
    auth: Arc<Auth>,
    /// HTTPS or not, for the HSTS header and the page's banner.
    transport: Transport,
    history: Arc<Mutex<history::History>>,
    /// The last connection list, shared by every browser for [`CONNECTIONS_FRESH`]: listing
    /// asks every worker to describe all its connections, which is not free at 20,000.
    connections: Arc<Mutex<Option<ConnectionList>>>,
}

/// A connection list and when it was taken.
type ConnectionList = (Instant, Arc<Vec<ConnectionInfo>>);

/// How long one connection list is reused.
const CONNECTIONS_FRESH: Duration = Duration::from_millis(900);

/// Starts the web page for `supervisor` on `addr` and returns once it listens, so a port in use
/// is reported at start. Binding outside loopback requires a token: `token`, or one generated
/// here and printed on stderr. With `tls` (see [`tls::load`]) the page is served over HTTPS.
pub fn start(
    supervisor: Supervisor,
    addr: SocketAddr,
    token: Option<String>,
    tls: Option<Arc<ServerConfig>>,
) -> anyhow::Result<()> {
    let auth = Auth::for_bind(addr, token)?;
    let transport = Transport::for_bind(addr, tls.is_some());
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("cannot serve the web page on {addr} (choose another with --web ADDR:PORT, or --no-web)")
    })?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name("web-blocking")
        .build()
        .context("starting the web page's runtime")?;
    let state = AppState {
        sup: supervisor,
        auth: Arc::new(auth),
        transport,
        history: Arc::new(Mutex::new(history::History::new(history::KEEP_SECONDS))),
        connections: Arc::new(Mutex::new(None)),
    };
    announce(local, &state.auth, transport);
    std::thread::Builder::new()
        .name("web".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("web page stopped: {e}");
                        return;
                    }
                };
                tokio::spawn(history::sample_forever(
                    state.sup.clone(),
                    Arc::clone(&state.history),
                ));
                let listener =
                    limit::CappedListener::new(listener, limit::MAX_CONNECTIONS, limit::IDLE);
                let served = match tls {
                    Some(config) => match tls::TlsListener::new(listener, config) {
                        Ok(listener) => axum::serve(listener, router(state)).await,
                        Err(e) => Err(e),
                    },
                    None => axum::serve(listener, router(state)).await,
                };
                if let Err(e) = served {
                    tracing::error!("web page stopped: {e}");
                }
            })
        })
        .context("starting the web page's thread")?;
    Ok(())
}

/// Tells the operator where the page is, when one is needed the token, and when the page is
/// reachable over plain HTTP from the network, that it should not be.
fn announce(addr: SocketAddr, auth: &Auth, transport: Transport) {
    let scheme = transport.scheme();
    let shown = if addr.ip().is_unspecified() {
        format!("{scheme}://<this host>:{}/", addr.port())
    } else {
        format!("{scheme}://{addr}/")
    };
    match auth.token() {
        Some(token) if auth.generated() => eprintln!(
            "web page on {shown} (token {token}; open {shown}#token={token} or pass --web-token to choose one)"
        ),
        Some(_) => eprintln!("web page on {shown} (changes need the --web-token)"),
        None => eprintln!("web page on {shown}"),
    }
    if let Some(warning) = transport.warning() {
        tracing::warn!("web page on {shown} is plain HTTP: {warning}");
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/style.css", get(assets::style))
        .route("/favicon.svg", get(assets::icon))
        .route("/api/rules", get(api::get_rules).post(api::add_rule))
        .route(
            "/api/rules/{id}",
            get(api::get_rule)
                .put(api::edit_rule)
                .delete(api::delete_rules),
        )
        .route("/api/rules/{id}/state", put(api::set_admin))
        .route("/api/stats", get(api::get_stats))
        .route("/api/history", get(api::get_history))
        .route("/api/connections", get(api::get_connections))
        .route("/api/connections/{id}", delete(api::close_connection))
        .route("/metrics", get(metrics::get_metrics))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(state)
}

/// Runs a supervisor call on a blocking thread with a deadline.
async fn call<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, api::ApiError> {
    match tokio::time::timeout(SUPERVISOR_DEADLINE, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(api::ApiError::internal(format!(
            "supervisor call failed: {e}"
        ))),
        Err(_) => Err(api::ApiError::unavailable(format!(
            "the supervisor did not answer within {} s",
            SUPERVISOR_DEADLINE.as_secs()
        ))),
    }
}

impl AppState {
    /// Every live connection, from the cache when it is fresh. Concurrent callers wait for one
    /// listing instead of each asking the workers.
    async fn connections(&self) -> Result<Arc<Vec<ConnectionInfo>>, api::ApiError> {
        let sup = self.sup.clone();
        let cache = Arc::clone(&self.connections);
        call(move || {
            let mut cached = cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, list)) = cached.as_ref() {
                if at.elapsed() < CONNECTIONS_FRESH {
                    return Arc::clone(list);
                }
            }
            let list = Arc::new(sup.connections());
            *cached = Some((Instant::now(), Arc::clone(&list)));
            list
        })
        .await
    }

    /// Forgets the cached connection list (after a connection was closed).
    fn forget_connections(&self) {
        *self.connections.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(addr: &str, tls: bool) -> Transport {
        Transport::for_bind(addr.parse().unwrap(), tls)
    }

    #[test]
    fn only_plain_http_off_loopback_is_warned_about() {
        assert_eq!(transport("0.0.0.0:3001", false), Transport::ExposedHttp);
        assert_eq!(transport("10.77.0.1:3001", false), Transport::ExposedHttp);
        assert_eq!(transport("127.0.0.2:3001", false), Transport::LoopbackHttp);
        assert_eq!(transport("[::1]:3001", false), Transport::LoopbackHttp);
        assert_eq!(transport("0.0.0.0:3001", true), Transport::Https);
        assert_eq!(
            transport("0.0.0.0:3001", false).warning(),
            Some(PLAIN_HTTP_WARNING)
        );
        assert_eq!(transport("127.0.0.1:3001", false).warning(), None);
        assert_eq!(transport("0.0.0.0:3001", true).warning(), None);
        assert_eq!(transport("0.0.0.0:3001", true).scheme(), "https");
        assert_eq!(transport("0.0.0.0:3001", false).scheme(), "http");
    }
}
