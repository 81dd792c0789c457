//! The web page over HTTPS against the real forwarder, with a throwaway certificate from `certs`:
//! the API answers over TLS to a client trusting the CA (with HSTS, and an https:// link at
//! start), plain HTTP to the TLS port gets a hint and no rules, a client trusting another CA fails
//! the handshake, a rules reload leaves the page's TLS alone, a bad pair stops the start with one
//! line naming the file, and plain HTTP off loopback is warned about at start and on the page.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use testbed::testing::{free_port, wait_for_listen, ChildGuard};
use tokio_rustls::rustls;

const WAIT: Duration = Duration::from_secs(20);

/// A forwarder serving its page on `web_ip` and a free port, with one rule.
struct Forwarder {
    process: ChildGuard,
    web: SocketAddr,
    rules: PathBuf,
    _dir: tempfile::TempDir,
}

impl Forwarder {
    fn start(web_ip: &str, extra: &[&str]) -> Forwarder {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("entries.csv");
        std::fs::write(
            &rules,
            format!("web-secret-rule,{},127.0.0.1,9\n", free_port()),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forwarder"));
        cmd.arg("--rules")
            .arg(&rules)
            .arg("--web")
            .arg(format!("{web_ip}:{port}"))
            .args(["--workers", "1", "--max-connections", "1000"])
            .args(extra);
        let process = ChildGuard::spawn(cmd);
        let web = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            wait_for_listen(web, WAIT),
            "web page never listened:\n{}",
            process.output()
        );
        Forwarder {
            process,
            web,
            rules,
            _dir: dir,
        }
    }
}

/// A throwaway CA and server pair in `dir`.
fn throwaway(dir: &Path) -> certs::CertPaths {
    certs::write_throwaway(dir, &[]).unwrap()
}

fn client_trusting(ca: &Path) -> Arc<rustls::ClientConfig> {
    Arc::new(testbed::tls::client_config(ca).unwrap())
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`, over TLS when `tls` is given.
fn request(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Response> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(WAIT))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
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
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok(Response {
        status,
        head: head.to_string(),
        body: if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        },
    })
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

#[test]
fn the_api_answers_over_https_to_the_ca_and_a_reload_leaves_tls_alone() {
    let certs_dir = tempfile::tempdir().unwrap();
    let pair = throwaway(certs_dir.path());
    let (cert, key) = (
        pair.server_cert.to_str().unwrap(),
        pair.server_key.to_str().unwrap(),
    );
    let fwd = Forwarder::start("127.0.0.1", &["--web-cert", cert, "--web-key", key]);
    let trusted = client_trusting(&pair.ca_cert);
    assert!(
        fwd.process
            .wait_for_output(&format!("web page on https://{}/\n", fwd.web), WAIT),
        "{}",
        fwd.process.output()
    );

    let rules = request(fwd.web, Some(trusted.clone()), "GET", "/api/rules", &[], "").unwrap();
    assert_eq!(rules.status, 200, "{}", rules.body);
    assert_eq!(rules.json()["entries"][0]["name"], "web-secret-rule");
    assert_eq!(
        rules.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let stats = request(fwd.web, Some(trusted.clone()), "GET", "/api/stats", &[], "").unwrap();
    let web = &stats.json()["web"];
    assert_eq!(
        serde_json::json!({"https": web["https"], "warning": web["warning"]}),
        serde_json::json!({"https": true, "warning": null})
    );
    let metrics = request(fwd.web, Some(trusted.clone()), "GET", "/metrics", &[], "").unwrap();
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("web-secret-rule"), "{}", metrics.body);

    // The certificate is read once: gone from disk and the rules reloaded, the page still
    // answers over TLS with it.
    std::fs::write(&pair.server_cert, "not a certificate").unwrap();
    std::fs::remove_file(&pair.server_key).unwrap();
    let before = fwd.process.output().matches("reloading").count();
    let tmp = fwd.rules.with_extension("tmp");
    std::fs::write(&tmp, format!("reloaded-rule,{},127.0.0.1,9\n", free_port())).unwrap();
    std::fs::rename(&tmp, &fwd.rules).unwrap();
    assert!(
        testbed::testing::wait_until(WAIT, || fwd.process.output().matches("reloading").count()
            > before),
        "no reload noticed:\n{}",
        fwd.process.output()
    );
    let after = request(fwd.web, Some(trusted), "GET", "/api/rules", &[], "").unwrap();
    assert_eq!(after.status, 200);
    assert_eq!(after.json()["entries"][0]["name"], "reloaded-rule");
}

#[test]
fn plain_http_to_the_tls_port_gets_no_rules_and_a_wrong_ca_fails_the_handshake() {
    let certs_dir = tempfile::tempdir().unwrap();
    let pair = throwaway(&certs_dir.path().join("right"));
    let other = throwaway(&certs_dir.path().join("other"));
    let fwd = Forwarder::start(
        "127.0.0.1",
        &[
            "--web-cert",
            pair.server_cert.to_str().unwrap(),
            "--web-key",
            pair.server_key.to_str().unwrap(),
        ],
    );

    let plain = request(fwd.web, None, "GET", "/api/rules", &[], "").unwrap();
    assert_eq!(plain.status, 400);
    assert_eq!(
        plain.body,
        "This page is served over HTTPS: open it with https:// instead of http://.\n"
    );
    assert!(!plain.head.contains("web-secret-rule"));

    let e = request(
        fwd.web,
        Some(client_trusting(&other.ca_cert)),
        "GET",
        "/api/rules",
        &[],
        "",
    )
    .err()
    .expect("a client trusting another CA got an answer");
    assert!(
        // Both throwaway CAs carry the same name: the other CA's signature does not verify.
        e.to_string() == "invalid peer certificate: BadSignature",
        "{e}"
    );
    // The page is still there for the right client.
    let ok = request(
        fwd.web,
        Some(client_trusting(&pair.ca_cert)),
        "GET",
        "/api/rules",
        &[],
        "",
    )
    .unwrap();
    assert_eq!(ok.status, 200);
}

#[test]
fn off_loopback_the_token_link_is_https_and_changes_work_with_the_token() {
    let certs_dir = tempfile::tempdir().unwrap();
    let pair = throwaway(certs_dir.path());
    let fwd = Forwarder::start(
        "0.0.0.0",
        &[
            "--web-cert",
            pair.server_cert.to_str().unwrap(),
            "--web-key",
            pair.server_key.to_str().unwrap(),
        ],
    );
    let port = fwd.web.port();
    assert!(fwd.process.wait_for_output("#token=", WAIT));
    let out = fwd.process.output();
    let link = format!("open https://<this host>:{port}/#token=");
    let token: String = out
        .split(&link)
        .nth(1)
        .unwrap_or_else(|| panic!("no https link in:\n{out}"))
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    assert_eq!(token.len(), 32, "{out}");

    let trusted = client_trusting(&pair.ca_cert);
    let body = serde_json::json!({
        "name": "added-over-tls",
        "listen_port": free_port(),
        "dest_ip": "127.0.0.1",
        "dest_port": "9",
    })
    .to_string();
    let json = ("Content-Type", "application/json");
    let refused = request(
        fwd.web,
        Some(trusted.clone()),
        "POST",
        "/api/rules",
        &[json],
        &body,
    )
    .unwrap();
    assert_eq!(refused.status, 401);
    let auth = format!("Bearer {token}");
    let added = request(
        fwd.web,
        Some(trusted),
        "POST",
        "/api/rules",
        &[json, ("Authorization", &auth)],
        &body,
    )
    .unwrap();
    assert_eq!(added.status, 201, "{}", added.body);
    assert!(std::fs::read_to_string(&fwd.rules)
        .unwrap()
        .contains("added-over-tls,"));
    // Printed at start if at all, long before the answers above.
    assert!(!fwd.process.output().contains("plain HTTP"), "{out}");
}

#[test]
fn plain_http_off_loopback_is_warned_about_at_start_and_on_the_page() {
    let fwd = Forwarder::start("0.0.0.0", &["--web-token", "t0ken"]);
    let warning = "the web token and the rules travel unencrypted on the network; serve the page \
         over HTTPS with --web-cert certs/server.crt --web-key certs/server.key (make the pair \
         with `certs --san <this host's name or address>`)";
    assert!(
        fwd.process.wait_for_output(
            &format!(
                "web page on http://<this host>:{}/ is plain HTTP: {warning}\n",
                fwd.web.port()
            ),
            WAIT
        ),
        "{}",
        fwd.process.output()
    );
    let stats = request(fwd.web, None, "GET", "/api/stats", &[], "").unwrap();
    let web = &stats.json()["web"];
    assert_eq!(
        serde_json::json!({"https": web["https"], "warning": web["warning"]}),
        serde_json::json!({"https": false, "warning": warning})
    );
    assert_eq!(stats.header("strict-transport-security"), None);

    // On loopback nothing crosses a network: no warning.
    let local = Forwarder::start("127.0.0.1", &[]);
    let stats = request(local.web, None, "GET", "/api/stats", &[], "").unwrap();
    let web = &stats.json()["web"];
    assert_eq!(
        serde_json::json!({"https": web["https"], "warning": web["warning"]}),
        serde_json::json!({"https": false, "warning": null})
    );
    assert!(!local.process.output().contains("plain HTTP"));
}

/// Runs the forwarder with `cert` and `key`; it must exit non-zero before starting anything,
/// and the last line it prints is returned.
fn failed_start(cert: &Path, key: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("entries.csv");
    let port = free_port();
    std::fs::write(&rules, format!("r,{port},127.0.0.1,9\n")).unwrap();
    let web = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forwarder"));
    cmd.arg("--rules")
        .arg(&rules)
        .arg("--web")
        .arg(format!("127.0.0.1:{web}"))
        .arg("--web-cert")
        .arg(cert)
        .arg("--web-key")
        .arg(key);
    let mut process = ChildGuard::spawn(cmd);
    let status = process
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("still running:\n{}", process.output()));
    assert!(!status.success());
    // Give the output readers a moment to see the pipes close.
    assert!(testbed::testing::wait_until(WAIT, || process
        .output()
        .contains("forwarder: ")));
    let out = process.output();
    assert!(!out.contains("capacity"), "workers were planned:\n{out}");
    assert!(!out.contains("web page on"), "{out}");
    out.lines().last().unwrap().to_string()
}

#[test]
fn a_missing_unreadable_or_mismatched_pair_fails_at_start_naming_the_file() {
    let certs_dir = tempfile::tempdir().unwrap();
    let pair = throwaway(&certs_dir.path().join("one"));
    let other = throwaway(&certs_dir.path().join("two"));
    let missing = certs_dir.path().join("missing.crt");
    assert_eq!(
        failed_start(&missing, &pair.server_key),
        format!(
            "forwarder: {}: cannot read certificate: I/O error: No such file or directory (os error 2)",
            missing.display()
        )
    );
    // A directory stands for an unreadable file (the tests run as root, so modes do not stop it).
    assert_eq!(
        failed_start(&pair.server_cert, &pair.dir),
        format!(
            "forwarder: {}: cannot read private key: I/O error: Is a directory (os error 21)",
            pair.dir.display()
        )
    );
    assert_eq!(
        failed_start(&pair.server_cert, &other.server_key),
        format!(
            "forwarder: {}: this private key does not belong to the certificate {}",
            other.server_key.display(),
            pair.server_cert.display()
        )
    );
    assert_eq!(
        failed_start(&pair.server_key, &pair.server_key),
        format!(
            "forwarder: {}: contains no certificate",
            pair.server_key.display()
        )
    );
}
