//! Who may change things through the web page. Reads are open to whoever can reach the port;
//! every mutating request must come from the page itself (same-origin check, so another site
//! open in the same browser cannot forge one) and, when a token is set, carry it. Off loopback a
//! token is mandatory. On loopback only loopback host names are served, so a DNS-rebinding page
//! cannot reach the API through the victim's browser either.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::api::ApiError;
use super::guard::Peer;
use super::AppState;

/// The header a script may use instead of `Authorization: Bearer`.
pub const TOKEN_HEADER: &str = "x-forwarder-token";

/// The web page's access policy.
#[derive(Debug)]
pub struct Auth {
    token: Option<String>,
    generated: bool,
    /// Bound to a loopback address: only loopback host names are served.
    loopback: bool,
}

impl Auth {
    /// The policy for a page bound to `addr`: off loopback, `token` or a freshly generated one.
    pub fn for_bind(addr: SocketAddr, token: Option<String>) -> anyhow::Result<Auth> {
        if let Some(t) = &token {
            anyhow::ensure!(!t.is_empty(), "--web-token must not be empty");
            anyhow::ensure!(
                t.bytes().all(|b| b.is_ascii_graphic()),
                "--web-token may hold only printable ASCII without spaces (it travels in an HTTP header)"
            );
        }
        let loopback = addr.ip().is_loopback();
        let (token, generated) = match token {
            Some(t) => (Some(t), false),
            None if loopback => (None, false),
            None => (Some(generate_token()?), true),
        };
        Ok(Auth {
            token,
            generated,
            loopback,
        })
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// True when nobody chose the token (it was printed at start).
    pub fn generated(&self) -> bool {
        self.generated
    }

    /// True when a token is set and the request carries it: the client is the operator.
    pub fn proves_token(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.token else {
            return false;
        };
        bearer(headers)
            .or_else(|| header_str(headers, TOKEN_HEADER))
            .is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes()))
    }

    /// Refuses a request that the policy does not allow.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = header_str(headers, header::HOST.as_str());
        if self.loopback {
            if let Some(host) = host {
                if !is_loopback_host(host) {
                    return Err(ApiError::forbidden(format!(
                        "Host \"{host}\" refused: a page bound to loopback answers only to loopback names (localhost, 127.0.0.1, [::1])"
                    )));
                }
            }
        }
        if matches!(*method, Method::GET | Method::HEAD) {
            return Ok(());
        }
        check_same_origin(headers, host)?;
        if let Some(expected) = &self.token {
            let given = bearer(headers).or_else(|| header_str(headers, TOKEN_HEADER));
            match given {
                Some(g) if constant_time_eq(g.as_bytes(), expected.as_bytes()) => {}
                Some(_) => return Err(ApiError::unauthorized("wrong web token")),
                None => {
                    return Err(ApiError::unauthorized(
                        "this change needs the web token (Authorization: Bearer TOKEN; it was printed when the forwarder started, or set with --web-token)",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// A mutating request must come from this page: browsers send `Origin` (and `Sec-Fetch-Site`)
/// with every non-GET request, and another site cannot fake either. Clients that send neither
/// (curl, scripts) are not browsers and cannot be tricked into a forged request.
fn check_same_origin(headers: &HeaderMap, host: Option<&str>) -> Result<(), ApiError> {
    if let Some(site) = header_str(headers, "sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return Err(ApiError::forbidden(format!(
                "cross-site request refused (Sec-Fetch-Site: {site}); changes must come from the page itself"
            )));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .map(|h| h.trim_end_matches('/'));
        let same = match (origin_host, host) {
            (Some(o), Some(h)) => o.eq_ignore_ascii_case(h),
            _ => false,
        };
        if !same {
            return Err(ApiError::forbidden(format!(
                "request from another origin ({origin}) refused; changes must come from the page itself"
            )));
        }
    }
    Ok(())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = header_str(headers, header::AUTHORIZATION.as_str())?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// `localhost`, `*.localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, _)) => ip,
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let name = name.to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Compares without stopping at the first difference, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 128 random bits from the kernel, as 32 hex digits.
fn generate_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| anyhow::anyhow!("cannot generate a web token from /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Applies the policy to every request and adds the headers that keep the page from being
/// framed, sniffed or made to load anything from elsewhere; over HTTPS, HSTS too, so a browser
/// that has seen the page over HTTPS never sends the token to its host in clear again.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.auth.proves_token(request.headers()) {
        // Its address may use the slots strangers cannot take (see `shield`).
        if let Some(ConnectInfo(Peer(peer))) = request.extensions().get::<ConnectInfo<Peer>>() {
            state.shield.trust(peer.ip());
        }
    }
    let mut response = match state.auth.check(request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if state.transport == super::Transport::Https {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(super::HSTS),
        );
    }
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn open() -> Auth {
        Auth::for_bind("127.0.0.1:3001".parse().unwrap(), None).unwrap()
    }

    fn status(r: Result<(), ApiError>) -> u16 {
        r.err().map(|e| e.status.as_u16()).unwrap_or(200)
    }

    #[test]
    fn loopback_needs_no_token_but_off_loopback_one_is_generated() {
        assert!(open().token().is_none());
        let a = Auth::for_bind("0.0.0.0:3001".parse().unwrap(), None).unwrap();
        assert!(a.generated());
        assert_eq!(a.token().unwrap().len(), 32);
        let b = Auth::for_bind("0.0.0.0:3001".parse().unwrap(), Some("s3cret".into())).unwrap();
        assert_eq!(b.token(), Some("s3cret"));
        assert!(!b.generated());
        assert!(Auth::for_bind("127.0.0.1:1".parse().unwrap(), Some(String::new())).is_err());
        assert!(Auth::for_bind("127.0.0.1:1".parse().unwrap(), Some("a b".into())).is_err());
    }

    #[test]
    fn same_origin_passes_and_foreign_origin_is_refused() {
        let a = open();
        let ok = headers(&[
            ("host", "127.0.0.1:3001"),
            ("origin", "http://127.0.0.1:3001"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(status(a.check(&Method::POST, &ok)), 200);
        let foreign = headers(&[
            ("host", "127.0.0.1:3001"),
            ("origin", "http://evil.example"),
        ]);
        assert_eq!(status(a.check(&Method::POST, &foreign)), 403);
        let cross = headers(&[("host", "127.0.0.1:3001"), ("sec-fetch-site", "cross-site")]);
        assert_eq!(status(a.check(&Method::DELETE, &cross)), 403);
        let null = headers(&[("host", "127.0.0.1:3001"), ("origin", "null")]);
        assert_eq!(status(a.check(&Method::PUT, &null)), 403);
        // Reads are not checked for origin.
        assert_eq!(status(a.check(&Method::GET, &foreign)), 200);
    }

    #[test]
    fn rebinding_host_is_refused_on_loopback() {
        let a = open();
        for host in [
            "localhost:3001",
            "127.0.0.5:80",
            "[::1]:3001",
            "app.localhost",
        ] {
            assert_eq!(
                status(a.check(&Method::GET, &headers(&[("host", host)]))),
                200,
                "{host}"
            );
        }
        for host in ["evil.example:3001", "10.0.0.1:3001", "[::2]:3001"] {
            assert_eq!(
                status(a.check(&Method::GET, &headers(&[("host", host)]))),
                403,
                "{host}"
            );
        }
    }

    #[test]
    fn token_is_required_when_set() {
        let a = Auth::for_bind("0.0.0.0:3001".parse().unwrap(), Some("t0ken".into())).unwrap();
        let host = ("host", "lab.example:3001");
        assert_eq!(status(a.check(&Method::GET, &headers(&[host]))), 200);
        assert_eq!(status(a.check(&Method::POST, &headers(&[host]))), 401);
        let wrong = headers(&[host, ("authorization", "Bearer nope")]);
        assert_eq!(status(a.check(&Method::POST, &wrong)), 401);
        let right = headers(&[host, ("authorization", "Bearer t0ken")]);
        assert_eq!(status(a.check(&Method::POST, &right)), 200);
        let alt = headers(&[host, (TOKEN_HEADER, "t0ken")]);
        assert_eq!(status(a.check(&Method::DELETE, &alt)), 200);
        let forged = headers(&[
            host,
            ("authorization", "Bearer t0ken"),
            ("origin", "http://evil.example"),
        ]);
        assert_eq!(status(a.check(&Method::POST, &forged)), 403);
    }
}
