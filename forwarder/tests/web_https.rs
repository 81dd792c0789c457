//! The web page over HTTPS against the real forwarder, with a throwaway certificate from `certs`:
//! the API answers over TLS to a client trusting the CA (with HSTS, and an https:// link at
//! start), plain HTTP to the TLS port gets a hint and no rules, a client trusting another CA fails
//! the handshake, a rules reload leaves the page's TLS alone, a bad pair stops the start with one
//! line naming the file, and plain HTTP off loopback is warned about at start and on the page.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use common::http::request;
use common::{Forwarder, WAIT};
use testbed_dev::testing::free_port;
use tokio_rustls::rustls;

/// A forwarder serving its page on `web_ip` and a free port, with one rule.
fn start(web_ip: &str, extra: &[&str]) -> Forwarder {
    Forwarder::builder()
        .rules(&format!("web-secret-rule,{},127.0.0.1,9\n", free_port()))
        .web(web_ip)
        .args(["--max-connections", "1000"])
        .args(extra)
        .start()
}

/// A throwaway CA and server pair in `dir`.
fn throwaway(dir: &Path) -> certs::CertPaths {
    certs::write_throwaway(dir, &[]).unwrap()
}

fn client_trusting(ca: &Path) -> Arc<rustls::ClientConfig> {
    Arc::new(testbed::tls::client_config(ca).unwrap())
}

#[test]
fn the_api_answers_over_https_to_the_ca_and_a_reload_leaves_tls_alone() {
    let certs_dir = tempfile::tempdir().unwrap();
    let pair = throwaway(certs_dir.path());
    let (cert, key) = (
        pair.server_cert.to_str().unwrap(),
        pair.server_key.to_str().unwrap(),
    );
    let fwd = start("127.0.0.1", &["--web-cert", cert, "--web-key", key]);
    let trusted = client_trusting(&pair.ca_cert);
    assert!(
        fwd.process
            .wait_for_output(&format!("web page on https://{}/\n", fwd.web()), WAIT),
        "{}",
        fwd.process.output()
    );

    let rules = request(
        fwd.web(),
        Some(trusted.clone()),
        "GET",
        "/api/rules",
        &[],
        "",
    )
    .unwrap();
    assert_eq!(rules.status, 200, "{}", rules.body);
    assert_eq!(rules.json()["entries"][0]["name"], "web-secret-rule");
    assert_eq!(
        rules.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let stats = request(
        fwd.web(),
        Some(trusted.clone()),
        "GET",
        "/api/stats",
        &[],
        "",
    )
    .unwrap();
    assert_eq!(
        stats.json()["web"],
        serde_json::json!({"https": true, "warning": null})
    );
    let metrics = request(fwd.web(), Some(trusted.clone()), "GET", "/metrics", &[], "").unwrap();
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
        testbed_dev::testing::wait_until(WAIT, || fwd
            .process
            .output()
            .matches("reloading")
            .count()
            > before),
        "no reload noticed:\n{}",
        fwd.process.output()
    );
    let after = request(fwd.web(), Some(trusted), "GET", "/api/rules", &[], "").unwrap();
    assert_eq!(after.status, 200);
    assert_eq!(after.json()["entries"][0]["name"], "reloaded-rule");
}

#[test]
fn plain_http_to_the_tls_port_gets_no_rules_and_a_wrong_ca_fails_the_handshake() {
    let certs_dir = tempfile::tempdir().unwrap();
    let pair = throwaway(&certs_dir.path().join("right"));
    let other = throwaway(&certs_dir.path().join("other"));
    let fwd = start(
        "127.0.0.1",
        &[
            "--web-cert",
            pair.server_cert.to_str().unwrap(),
            "--web-key",
            pair.server_key.to_str().unwrap(),
        ],
    );

    let plain = request(fwd.web(), None, "GET", "/api/rules", &[], "").unwrap();
    assert_eq!(plain.status, 400);
    assert_eq!(
        plain.body,
        "This page is served over HTTPS: open it with https:// instead of http://.\n"
    );
    assert!(!plain.head.contains("web-secret-rule"));

    let e = request(
        fwd.web(),
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
        fwd.web(),
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
    let fwd = start(
        "0.0.0.0",
        &[
            "--web-cert",
            pair.server_cert.to_str().unwrap(),
            "--web-key",
            pair.server_key.to_str().unwrap(),
        ],
    );
    let port = fwd.web().port();
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
        fwd.web(),
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
        fwd.web(),
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
    let fwd = start("0.0.0.0", &["--web-token", "t0ken"]);
    let warning = "the web token and the rules travel unencrypted on the network; serve the page \
         over HTTPS with --web-cert certs/server.crt --web-key certs/server.key (make the pair \
         with `certs --san <this host's name or address>`)";
    assert!(
        fwd.process.wait_for_output(
            &format!(
                "web page on http://<this host>:{}/ is plain HTTP: {warning}\n",
                fwd.web().port()
            ),
            WAIT
        ),
        "{}",
        fwd.process.output()
    );
    let stats = request(fwd.web(), None, "GET", "/api/stats", &[], "").unwrap();
    assert_eq!(
        stats.json()["web"],
        serde_json::json!({"https": false, "warning": warning})
    );
    assert_eq!(stats.header("strict-transport-security"), None);

    // On loopback nothing crosses a network: no warning.
    let local = start("127.0.0.1", &[]);
    let stats = request(local.web(), None, "GET", "/api/stats", &[], "").unwrap();
    assert_eq!(
        stats.json()["web"],
        serde_json::json!({"https": false, "warning": null})
    );
    assert!(!local.process.output().contains("plain HTTP"));
}

/// Runs the forwarder with `cert` and `key`; it must exit non-zero before starting anything,
/// and the last line it prints is returned.
fn failed_start(cert: &Path, key: &Path) -> String {
    let port = free_port();
    let mut fwd = Forwarder::builder()
        .rules(&format!("r,{port},127.0.0.1,9\n"))
        .web("127.0.0.1")
        .args([OsStr::new("--web-cert"), cert.as_os_str()])
        .args([OsStr::new("--web-key"), key.as_os_str()])
        .spawn();
    let process = &mut fwd.process;
    let status = process
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("still running:\n{}", process.output()));
    assert!(!status.success());
    // Give the output readers a moment to see the pipes close.
    assert!(testbed_dev::testing::wait_until(WAIT, || process
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
