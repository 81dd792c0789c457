//! Routing by TLS server name end to end: `openssl s_client -servername …` through one forwarder
//! port reaches different `ssl-echo-server`s (each with its own CA made by `certs --san`, so a
//! handshake verified against a CA proves which server answered), completes the handshake and
//! echoes. A one-label wildcard, no SNI and unknown names to the default row, a ClientHello sent
//! one byte at a time, a silent client, a pool without default, and HAProxy `send-proxy-v2` in
//! front of an `accept_proxy` pool.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{is_listening, local, Forwarder, WAIT};
use testbed_dev::testing::{bin_path, free_port, wait_until, ChildGuard};

/// A TLS echo server with a CA of its own whose certificate names `sans`.
struct TlsServer {
    port: u16,
    ca: PathBuf,
    _process: ChildGuard,
}

fn tls_server(dir: &Path, tag: &str, sans: &[&str]) -> TlsServer {
    let out = dir.join(tag);
    let mut certs = Command::new(bin_path("certs"));
    certs.arg("--out").arg(&out);
    for san in sans {
        certs.arg("--san").arg(san);
    }
    let status = certs
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "certs --san {sans:?} failed");
    let port = free_port();
    let mut cmd = Command::new(bin_path("ssl-echo-server"));
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--cert")
        .arg(out.join("server.crt"))
        .arg("--key")
        .arg(out.join("server.key"))
        .args(["--workers", "1", "--max-connections", "100"]);
    let process = ChildGuard::spawn(cmd);
    assert!(
        wait_until(WAIT, || is_listening(port)),
        "ssl-echo-server never listened:\n{}",
        process.output()
    );
    TlsServer {
        port,
        ca: out.join("ca.crt"),
        _process: process,
    }
}

/// `openssl s_client` to `port` asking for `name` (None: no SNI), verifying the server against
/// `ca` (and `name`); kept running so the test can look at the connection.
struct Client {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Client {
    fn start(port: u16, name: Option<&str>, ca: &Path) -> Client {
        Self::verifying(port, name, name.unwrap_or("localhost"), ca)
    }

    /// As [`Client::start`], checking the certificate names `verify` (every test certificate
    /// names localhost).
    fn verifying(port: u16, name: Option<&str>, verify: &str, ca: &Path) -> Client {
        let mut cmd = Command::new("openssl");
        cmd.arg("s_client")
            .arg("-connect")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-CAfile")
            .arg(ca)
            .args(["-verify_return_error", "-quiet"]);
        match name {
            Some(n) => cmd.args(["-servername", n]),
            None => cmd.arg("-noservername"),
        };
        cmd.args(["-verify_hostname", verify]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let mut stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut text = String::new();
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some((line, rest)) = text.split_once('\n') {
                    let _ = tx.send(line.to_string());
                    text = rest.to_string();
                }
            }
        });
        Client { child, lines }
    }

    /// Sends a line and waits for its echo: true once the handshake (verified) and the echo
    /// both went through.
    fn echoes(&mut self, line: &str) -> bool {
        let stdin = self.child.stdin.as_mut().unwrap();
        if writeln!(stdin, "{line}").is_err() {
            return false;
        }
        let deadline = std::time::Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(got) if got.trim_end() == line => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reaches(port: u16, name: Option<&str>, server: &TlsServer) -> bool {
    Client::start(port, name, &server.ca).echoes("hello through sni")
}

/// A forwarder with its web page on `rules`, `extra` flags; waits for `port`.
fn forwarder(rules: &str, extra: &[&str], ports: &[u16]) -> Forwarder {
    Forwarder::builder()
        .rules(rules)
        .web("127.0.0.1")
        .args(extra)
        .listening(ports)
        .start()
}

fn refused(f: &Forwarder, port: u16, reason: &str) -> Option<u64> {
    f.metric(&format!(
        "forwarder_pool_refused_total{{listen=\"0.0.0.0:{port}\",reason=\"{reason}\"}}"
    ))
}

#[test]
fn server_names_reach_their_servers_and_the_rest_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let a = tls_server(dir.path(), "a", &["a.test"]);
    let b = tls_server(dir.path(), "b", &["b.test", "x.wild.test"]);
    let d = tls_server(dir.path(), "d", &["default.test"]);
    let port = free_port();
    let strict = free_port();
    let log = dir.path().join("access.log");
    let rules = format!(
        "a,{port},127.0.0.1,{},sni=a.test\n\
         b,{port},127.0.0.1,{},\"sni=b.test,*.wild.test\"\n\
         d,{port},127.0.0.1,{}\n\
         only-a,{strict},127.0.0.1,{},sni=a.test\n",
        a.port, b.port, d.port, a.port
    );
    let f = forwarder(
        &rules,
        &[
            "--connect-timeout-ms",
            "1000",
            "--access-log",
            log.to_str().unwrap(),
        ],
        &[port, strict],
    );
    assert!(reaches(port, Some("a.test"), &a), "a.test → a");
    assert!(reaches(port, Some("B.Test"), &b), "names ignore case");
    assert!(reaches(port, Some("x.wild.test"), &b), "*.wild.test → b");
    assert!(
        !reaches(port, Some("x.wild.test"), &d),
        "and not the default"
    );
    assert!(reaches(port, None, &d), "no SNI → default");
    assert!(
        Client::verifying(port, Some("unknown.test"), "default.test", &d.ca).echoes("x"),
        "unknown name → default"
    );

    // While a connection is open, /api/connections names what it asked for.
    let mut open = Client::start(port, Some("a.test"), &a.ca);
    assert!(open.echoes("still here"));
    let conns = f.json("/api/connections");
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["sni"] == "a.test" && c["rule"] == "a"),
        "{conns}"
    );
    drop(open);

    // A pool without a default row closes names it does not serve, and counts them.
    assert!(reaches(strict, Some("a.test"), &a));
    assert!(!reaches(strict, Some("b.test"), &b));
    assert!(!reaches(strict, None, &a));
    assert!(wait_until(WAIT, || refused(&f, strict, "no_sni_route") == Some(2)));

    // A client that sends nothing is closed after the connect timeout, and counted.
    let mut silent = TcpStream::connect(local(port)).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 1];
    assert!(
        matches!(silent.read(&mut buf), Ok(0) | Err(_)),
        "a silent client is closed"
    );
    assert!(wait_until(WAIT, || refused(&f, port, "tls_hello") == Some(1)));
    // Garbage that starts like TLS is closed and counted too.
    let mut garbage = TcpStream::connect(local(port)).unwrap();
    garbage.set_read_timeout(Some(WAIT)).unwrap();
    garbage.write_all(&[22, 3, 1, 0, 4, 9, 9, 9, 9]).unwrap();
    assert!(matches!(garbage.read(&mut buf), Ok(0) | Err(_)));
    assert!(wait_until(WAIT, || refused(&f, port, "tls_hello") == Some(2)));

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(WAIT, || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(" a 127.0.0.1:") && l.ends_with("sni=a.test"))),
        "the access log names the server name:\n{text}"
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .any(|l| l.contains("no_sni_route sni=b.test")));
}

#[test]
fn a_client_hello_one_byte_at_a_time_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let a = tls_server(dir.path(), "a", &["a.test"]);
    let d = tls_server(dir.path(), "d", &["default.test"]);
    let port = free_port();
    let rules = format!(
        "a,{port},127.0.0.1,{},sni=a.test\nd,{port},127.0.0.1,{}\n",
        a.port, d.port
    );
    let _f = forwarder(&rules, &[], &[port]);
    // A relay in front: the client's bytes go on one per segment (NODELAY, a pause between),
    // the answers come back as they are.
    let front = TcpListener::bind(local(0)).unwrap();
    let front_port = front.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut client, _)) = front.accept() else {
            return;
        };
        let mut fwd = TcpStream::connect(local(port)).unwrap();
        fwd.set_nodelay(true).unwrap();
        let mut back_client = client.try_clone().unwrap();
        let mut back_fwd = fwd.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_fwd, &mut back_client);
        });
        let mut byte = [0u8; 1];
        let mut sent = 0usize;
        while let Ok(1) = client.read(&mut byte) {
            if fwd.write_all(&byte).is_err() {
                break;
            }
            sent += 1;
            // Pacing, not synchronisation: each byte of the first 600 leaves in its own segment.
            if sent < 600 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    assert!(
        reaches(front_port, Some("a.test"), &a),
        "a ClientHello split into single bytes still routes by name"
    );
}

#[test]
fn haproxy_send_proxy_v2_in_front_of_an_accept_proxy_sni_pool() {
    let status = Command::new("bash")
        .arg("-c")
        .arg("source scripts/lib/apt.sh && ensure_apt_packages haproxy")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .unwrap();
    assert!(status.success(), "haproxy could not be installed");
    let dir = tempfile::tempdir().unwrap();
    let a = tls_server(dir.path(), "a", &["a.test"]);
    let b = tls_server(dir.path(), "b", &["b.test"]);
    let port = free_port();
    let rules = format!(
        "a,{port},127.0.0.1,{},\"sni=a.test accept_proxy\"\nb,{port},127.0.0.1,{},\"sni=b.test accept_proxy\"\n",
        a.port, b.port
    );
    let f = forwarder(&rules, &[], &[port]);
    let front = free_port();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind 127.0.0.1:{front}\n  default_backend fw\n\
             backend fw\n  server fw 127.0.0.1:{port} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let haproxy = ChildGuard::spawn(cmd);
    assert!(
        wait_until(WAIT, || is_listening(front)),
        "haproxy:\n{}",
        haproxy.output()
    );
    assert!(reaches(front, Some("b.test"), &b));
    assert!(reaches(front, Some("a.test"), &a));
    assert_eq!(refused(&f, port, "proxy_header"), Some(0));
}
