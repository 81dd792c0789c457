//! The one HTTP/1.1 client of the forwarder's tests: a request per connection (`Connection:
//! close`), plain or over TLS, chunked bodies undone, and figures read from Prometheus text.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use serde_json::Value;
use tokio_rustls::rustls;

use super::WAIT;

/// One answer: the status, the head as sent (status line and headers) and the body, de-chunked.
pub struct Response {
    pub status: u16,
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// `(field, message)` of each error of a 400 answer.
    pub fn field_errors(&self) -> Vec<(String, String)> {
        self.json()["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors array: {}", self.body))
            .iter()
            .map(|e| {
                (
                    e["field"].as_str().unwrap().to_string(),
                    e["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

/// One request with `Connection: close` and a `Content-Length`, over TLS when `tls` is given.
/// A `Host: ADDR` header is added unless `headers` has one.
pub fn request(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Response> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(WAIT))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let mut raw = Vec::new();
    match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let conn =
                rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            stream.write_all(req.as_bytes())?;
            stream.read_to_end(&mut raw)?;
        }
        None => {
            let mut tcp = tcp;
            tcp.write_all(req.as_bytes())?;
            tcp.read_to_end(&mut raw)?;
        }
    }
    let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
        return Err(std::io::Error::other(format!("no HTTP head in {text:?}")));
    };
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    Ok(Response {
        status,
        head: head.to_string(),
        headers,
        body: if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        },
    })
}

/// A plain GET; panics when the exchange fails (not on a status: the caller checks it).
pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, None, "GET", path, &[], "")
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// The body of a plain GET that must answer 200 (the API, `/metrics`).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let answer = get(addr, path);
    assert_eq!(answer.status, 200, "{path}: {}", answer.head);
    answer.body
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// The value of one series in Prometheus text, by the start of its line (name and labels).
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
