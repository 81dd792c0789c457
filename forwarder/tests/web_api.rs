//! The web page's API against the real forwarder: rules added, edited and deleted over HTTP
//! reach the file and the listening ports, stale writes get 412, bad input gets 400 naming the
//! field, changes need the token off loopback and the page's own origin, and hostile names
//! come back as plain JSON text.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::http::{request, Response};
use common::{local, Forwarder, WAIT};
use serde_json::Value;
use testbed_dev::testing::{free_port, wait_for_listen, wait_until};

/// A forwarder with its web page on loopback and one worker.
fn loopback(rules: &str) -> Forwarder {
    Forwarder::builder()
        .rules(rules)
        .web("127.0.0.1")
        .args(["--max-connections", "1000"])
        .start()
}

/// What these tests ask of the page besides a GET.
impl Forwarder {
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        http(self.web(), method, path, &all, body)
    }

    fn etag(&self) -> String {
        self.get("/api/rules").header("etag").unwrap().to_string()
    }
}

/// One request on a fresh connection; panics when the exchange fails.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Response {
    request(addr, None, method, path, headers, body.unwrap_or(""))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// An echo server on a free loopback port, for as long as the test runs.
fn echo_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// Connects to `port` and checks that `text` comes back exactly.
fn echo_through(port: u16, text: &str) -> TcpStream {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert_echo(&mut s, text);
    s
}

fn assert_echo(s: &mut TcpStream, text: &str) {
    s.write_all(text.as_bytes()).unwrap();
    let mut back = vec![0u8; text.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(String::from_utf8(back).unwrap(), text);
}

fn refused(port: u16) -> bool {
    matches!(
        TcpStream::connect_timeout(&local(port), Duration::from_millis(500)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn rule_json(name: &str, listen: u16, dest: u16) -> String {
    serde_json::json!({
        "name": name,
        "listen_port": listen,
        "dest_ip": "127.0.0.1",
        "dest_port": dest.to_string(),
    })
    .to_string()
}

#[test]
fn add_edit_and_delete_reach_the_file_and_the_ports() {
    let backend = echo_backend();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let original = format!("r1,{p1},127.0.0.1,{backend}\n");
    let fwd = loopback(&original);
    assert!(wait_for_listen(local(p1), WAIT));

    let listed = fwd.get("/api/rules");
    assert_eq!(listed.status, 200);
    let doc = listed.json();
    assert_eq!(doc["text"], original.as_str());
    assert_eq!(doc["in_force"], true);
    assert_eq!(doc["entries"].as_array().unwrap().len(), 1);
    assert_eq!(doc["entries"][0]["listen"], format!("0.0.0.0:{p1}"));
    let etag = listed.header("etag").unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", doc["version"].as_str().unwrap()));

    // Add: written to the file (old one kept as .bak), listening at once.
    let added = fwd.send(
        "POST",
        "/api/rules",
        &[("If-Match", &etag)],
        Some(&rule_json("new", p2, backend)),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    let id = added.json()["id"].as_str().unwrap().to_string();
    assert!(fwd.rules_text().ends_with(&format!(
        "r1,{p1},127.0.0.1,{backend}\nnew,{p2},127.0.0.1,{backend}\n"
    )));
    assert_eq!(
        std::fs::read_to_string(fwd.rules.with_extension("csv.bak")).unwrap(),
        original
    );
    let mut held = echo_through(p2, "through the new rule");
    assert_eq!(fwd.get(&format!("/api/rules/{id}")).json()["name"], "new");

    // Edit: the rule moves to another port; the old port closes, its connection stays.
    let edited = fwd.send(
        "PUT",
        &format!("/api/rules/{id}"),
        &[("If-Match", added.header("etag").unwrap())],
        Some(&rule_json("renamed", p3, backend)),
    );
    assert_eq!(edited.status, 200, "{}", edited.body);
    let new_id = edited.json()["id"].as_str().unwrap().to_string();
    assert_ne!(new_id, id, "an id follows the rule's content");
    echo_through(p3, "through the edited rule");
    assert!(
        wait_until(WAIT, || refused(p2)),
        "the old port still listens"
    );
    assert_echo(&mut held, "established connection survives the edit");
    assert!(fwd
        .rules_text()
        .contains(&format!("renamed,{p3},127.0.0.1,{backend}\n")));
    assert!(!fwd.rules_text().contains("new,"));

    // Delete: the port closes, the other rule keeps forwarding.
    let deleted = fwd.send("DELETE", &format!("/api/rules/{new_id}"), &[], None);
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["entries"].as_array().unwrap().len(), 1);
    assert!(
        wait_until(WAIT, || refused(p3)),
        "the deleted port still listens"
    );
    assert!(!fwd.rules_text().contains("renamed"));
    echo_through(p1, "the first rule is untouched");
    assert_echo(&mut held, "still here after the delete");

    // An id that is gone is a 404, and nothing changes.
    let before = fwd.rules_text();
    let gone = fwd.send("DELETE", &format!("/api/rules/{new_id}"), &[], None);
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.json()["error"],
        format!("no rule with id \"{new_id}\" (the rules changed? reload them)")
    );
    assert_eq!(fwd.rules_text(), before);
}

#[test]
fn several_rules_are_deleted_in_one_write() {
    let backend = echo_backend();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let fwd = loopback(&format!(
        "a,{p1},127.0.0.1,{backend}\nb,{p2},127.0.0.1,{backend}\nc,{p3},127.0.0.1,{backend}\n"
    ));
    let doc = fwd.get("/api/rules").json();
    let ids: Vec<&str> = doc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let r = fwd.send(
        "DELETE",
        &format!("/api/rules/{},{}", ids[0], ids[2]),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let names: Vec<String> = r.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["b"]);
    assert!(wait_until(WAIT, || refused(p1) && refused(p3)));
    echo_through(p2, "b stays");
}

#[test]
fn a_stale_write_is_refused_with_412() {
    let backend = echo_backend();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let fwd = loopback(&format!("r1,{p1},127.0.0.1,{backend}\n"));
    let v1 = fwd.etag();

    // Browser A saves first; browser B still holds v1.
    let a = fwd.send(
        "POST",
        "/api/rules",
        &[("If-Match", &v1)],
        Some(&rule_json("from-a", p2, backend)),
    );
    assert_eq!(a.status, 201);
    let v2 = a.header("etag").unwrap().to_string();
    let after_a = fwd.rules_text();
    let b = fwd.send(
        "POST",
        "/api/rules",
        &[("If-Match", &v1)],
        Some(&rule_json("from-b", p3, backend)),
    );
    assert_eq!(b.status, 412, "{}", b.body);
    assert_eq!(
        b.json()["error"],
        "the rules changed since you loaded them (another browser or a hand edit); reload and try again"
    );
    assert_eq!(
        b.header("etag"),
        Some(v2.as_str()),
        "a 412 tells the current version"
    );
    assert_eq!(
        fwd.rules_text(),
        after_a,
        "the stale write changed the file"
    );
    assert!(refused(p3));

    // A hand edit also makes the page's version stale, for edits and deletes alike.
    let id = a.json()["id"].as_str().unwrap().to_string();
    std::fs::write(&fwd.rules, format!("{after_a}# edited by hand\n")).unwrap();
    let put = fwd.send(
        "PUT",
        &format!("/api/rules/{id}"),
        &[("If-Match", &v2)],
        Some(&rule_json("x", p3, backend)),
    );
    assert_eq!(put.status, 412);
    let del = fwd.send(
        "DELETE",
        &format!("/api/rules/{id}"),
        &[("If-Match", &v2)],
        None,
    );
    assert_eq!(del.status, 412);
    assert!(fwd.rules_text().ends_with("# edited by hand\n"));

    // The page shows the hand-edited file; with its version the write goes through.
    let fresh = fwd.get("/api/rules");
    assert!(fresh.json()["text"]
        .as_str()
        .unwrap()
        .ends_with("# edited by hand\n"));
    let v3 = fresh.header("etag").unwrap().to_string();
    assert_ne!(v3, v2);
    let not_modified = http(
        fwd.web(),
        "GET",
        "/api/rules",
        &[("If-None-Match", &v3)],
        None,
    );
    assert_eq!(not_modified.status, 304);
    let del = fwd.send(
        "DELETE",
        &format!("/api/rules/{id}"),
        &[("If-Match", &v3)],
        None,
    );
    assert_eq!(del.status, 200, "{}", del.body);
}

#[test]
fn bad_input_is_refused_with_the_field_and_nothing_is_written() {
    let backend = echo_backend();
    let p1 = free_port();
    let fwd = loopback(&format!("r1,{p1},127.0.0.1,{backend}\n"));
    let file = fwd.rules_text();
    let post = |body: &str| fwd.send("POST", "/api/rules", &[], Some(body));
    let one = |body: serde_json::Value| {
        let r = post(&body.to_string());
        assert_eq!(r.status, 400, "{}", r.body);
        r.field_errors()
    };

    assert_eq!(
        one(
            serde_json::json!({"name": "x", "listen_port": "99999", "dest_ip": "127.0.0.1", "dest_port": "80"})
        ),
        vec![(
            "listen_port".into(),
            "port 99999 is out of range 1-65535".into()
        )]
    );
    assert_eq!(
        one(
            serde_json::json!({"name": "x", "listen_port": "8", "dest_ip": "127.0.0.1", "dest_port": "abc"})
        ),
        vec![("dest_port".into(), "\"abc\" is not a port number".into())]
    );
    assert_eq!(
        one(
            serde_json::json!({"name": "", "listen_port": "8", "dest_ip": "127.0.0.1", "dest_port": "80"})
        ),
        vec![("name".into(), "name is empty".into())]
    );
    assert_eq!(
        one(serde_json::json!({"name": "x", "listen_port": "8", "dest_port": 80})),
        vec![("dest_ip".into(), "missing".into())]
    );
    assert_eq!(
        one(
            serde_json::json!({"name": "x", "listen_port": "8", "dest_ip": "not a host!", "dest_port": 80})
        ),
        vec![(
            "dest_ip".into(),
            "\"not a host!\" is not an IP address or host name".into()
        )]
    );
    let dup = one(
        serde_json::json!({"name": "again", "listen_port": p1, "dest_ip": "127.0.0.1", "dest_port": backend}),
    );
    assert_eq!(dup[0].0, "dest_ip");
    assert!(dup[0].1.starts_with(&format!(
        "duplicate destination 127.0.0.1:{backend} for listen port {p1}"
    )));

    // A port another program holds is refused, naming the field.
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let busy = one(
        serde_json::json!({"name": "busy", "listen_port": taken_port, "dest_ip": "127.0.0.1", "dest_port": backend}),
    );
    assert_eq!(busy.len(), 1);
    assert_eq!(busy[0].0, "listen_port");
    assert!(
        busy[0]
            .1
            .starts_with(&format!("cannot listen on 0.0.0.0:{taken_port}")),
        "{}",
        busy[0].1
    );

    let not_json = post("{\"name\": ");
    assert_eq!(not_json.status, 400);
    assert!(not_json.json()["error"]
        .as_str()
        .unwrap()
        .starts_with("the body is not valid JSON"));
    let form = http(
        fwd.web(),
        "POST",
        "/api/rules",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some("name=x"),
    );
    assert_eq!(form.status, 415);
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(64 * 1024));
    assert_eq!(post(&huge).status, 413, "the body size is limited");

    assert_eq!(
        fwd.rules_text(),
        file,
        "a refused change touched the rules file"
    );
    assert!(!fwd.rules.with_extension("csv.bak").exists());
}

#[test]
fn changes_off_loopback_need_the_token() {
    let backend = echo_backend();
    let p1 = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!("r1,{p1},127.0.0.1,{backend}\n"))
        .web("0.0.0.0")
        .args(["--max-connections", "1000"])
        .args(["--web-token", "s3cret-t0ken"])
        .start();
    assert_eq!(fwd.get("/api/rules").status, 200, "reads stay open");
    let body = rule_json("t", free_port(), backend);
    let none = fwd.send("POST", "/api/rules", &[], Some(&body));
    assert_eq!(none.status, 401);
    assert!(none.json()["error"]
        .as_str()
        .unwrap()
        .starts_with("this change needs the web token"));
    assert_eq!(
        none.header("www-authenticate"),
        Some("Bearer realm=\"forwarder\"")
    );
    let wrong = fwd.send(
        "POST",
        "/api/rules",
        &[("Authorization", "Bearer nope")],
        Some(&body),
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"], "wrong web token");
    let ok = fwd.send(
        "POST",
        "/api/rules",
        &[("Authorization", "Bearer s3cret-t0ken")],
        Some(&body),
    );
    assert_eq!(ok.status, 201, "{}", ok.body);
    let id = ok.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        fwd.send("DELETE", &format!("/api/rules/{id}"), &[], None)
            .status,
        401
    );
    assert_eq!(
        fwd.send(
            "DELETE",
            &format!("/api/rules/{id}"),
            &[("X-Forwarder-Token", "s3cret-t0ken")],
            None
        )
        .status,
        200
    );
    assert_eq!(
        fwd.send("DELETE", "/api/connections/1", &[], None).status,
        401
    );
}

#[test]
fn a_token_is_generated_and_printed_when_none_is_given_off_loopback() {
    let backend = echo_backend();
    let fwd = Forwarder::builder()
        .rules(&format!("r1,{},127.0.0.1,{backend}\n", free_port()))
        .web("0.0.0.0")
        .args(["--max-connections", "1000"])
        .start();
    assert!(fwd.process.wait_for_output("#token=", WAIT));
    let out = fwd.process.output();
    let token: String = out
        .split("(token ")
        .nth(1)
        .expect("token printed")
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    assert_eq!(token.len(), 32, "{out}");
    let body = rule_json("t", free_port(), backend);
    assert_eq!(fwd.send("POST", "/api/rules", &[], Some(&body)).status, 401);
    let auth = format!("Bearer {token}");
    assert_eq!(
        fwd.send(
            "POST",
            "/api/rules",
            &[("Authorization", &auth)],
            Some(&body)
        )
        .status,
        201
    );
}

#[test]
fn cross_site_requests_are_refused() {
    let backend = echo_backend();
    let fwd = loopback(&format!("r1,{},127.0.0.1,{backend}\n", free_port()));
    let file = fwd.rules_text();
    let body = rule_json("csrf", free_port(), backend);
    let foreign = fwd.send(
        "POST",
        "/api/rules",
        &[("Origin", "http://evil.example")],
        Some(&body),
    );
    assert_eq!(foreign.status, 403);
    assert_eq!(
        foreign.json()["error"],
        "request from another origin (http://evil.example) refused; changes must come from the page itself"
    );
    let cross = fwd.send(
        "POST",
        "/api/rules",
        &[("Sec-Fetch-Site", "cross-site")],
        Some(&body),
    );
    assert_eq!(cross.status, 403);
    let null = fwd.send("DELETE", "/api/connections/1", &[("Origin", "null")], None);
    assert_eq!(null.status, 403);
    assert_eq!(fwd.rules_text(), file);

    // A DNS-rebinding page reaches the port under a foreign host name: refused.
    let rebound = http(
        fwd.web(),
        "GET",
        "/api/rules",
        &[("Host", "evil.example")],
        None,
    );
    assert_eq!(rebound.status, 403);

    // The page's own origin is accepted.
    let origin = format!("http://{}", fwd.web());
    let same = fwd.send(
        "POST",
        "/api/rules",
        &[("Origin", &origin), ("Sec-Fetch-Site", "same-origin")],
        Some(&body),
    );
    assert_eq!(same.status, 201, "{}", same.body);
}

#[test]
fn a_hostile_rule_name_comes_back_as_json_text() {
    let backend = echo_backend();
    let port = free_port();
    let fwd = loopback("");
    let name = "<script>alert(\"x\")</script>";
    let body = serde_json::json!({"name": name, "listen_port": port, "dest_ip": "127.0.0.1", "dest_port": backend}).to_string();
    let r = fwd.send("POST", "/api/rules", &[], Some(&body));
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(
        fwd.rules_text()
            .contains("\"<script>alert(\"\"x\"\")</script>\""),
        "CSV quoting: {}",
        fwd.rules_text()
    );

    let listed = fwd.get("/api/rules");
    assert_eq!(listed.header("content-type"), Some("application/json"));
    assert_eq!(listed.header("x-content-type-options"), Some("nosniff"));
    assert!(listed
        .header("content-security-policy")
        .unwrap()
        .contains("script-src 'self'"));
    assert_eq!(listed.json()["entries"][0]["name"], name);
    echo_through(port, "hostile names forward too");

    let stats = fwd.get("/api/stats");
    assert_eq!(stats.json()["pools"][0]["backends"][0]["name"], name);
    let metrics = fwd.get("/metrics").body;
    assert!(
        metrics.contains("name=\"<script>alert(\\\"x\\\")</script>\""),
        "{metrics}"
    );
    let page = fwd.get("/");
    assert_eq!(page.status, 200);
    assert!(
        !page.body.contains("alert"),
        "the page is static; data only arrives as JSON"
    );
}

#[test]
fn a_fresh_listing_includes_the_connection_opened_last() {
    let backend = echo_backend();
    let p1 = free_port();
    let fwd = loopback(&format!("r1,{p1},127.0.0.1,{backend}\n"));
    assert!(wait_for_listen(local(p1), WAIT));
    let _a = echo_through(p1, "first");
    assert!(wait_until(WAIT, || fwd
        .get("/api/connections")
        .json()
        .as_array()
        .unwrap()
        .len()
        == 1));
    // Within the second the listing above is reused for; fresh=true asks the workers again.
    let b = echo_through(p1, "last");
    let fresh = fwd.get("/api/connections?fresh=true");
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    let list = fresh.json().as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "{list:?}");
    let last = b.local_addr().unwrap().to_string();
    assert!(
        list.iter().any(|c| c["client"] == last.as_str()),
        "{list:?}"
    );
    assert_eq!(fwd.get("/api/connections?fresh=maybe").status, 400);
}

#[test]
fn connections_are_listed_and_closed_and_figures_count_them() {
    let backend = echo_backend();
    let p1 = free_port();
    let fwd = loopback(&format!("r1,{p1},127.0.0.1,{backend}\n"));
    assert!(wait_for_listen(local(p1), WAIT));
    // The history counts from its first sample of a pool: wait for it (a loaded machine can
    // start the sampler late), so the connections below land after it.
    assert!(wait_until(WAIT, || {
        fwd.get("/api/history").json()["pools"][0]["points"]
            .as_array()
            .is_some_and(|pts| !pts.is_empty())
    }));
    let mut a = echo_through(p1, "first client");
    let _b = echo_through(p1, "second");

    let mut list = Vec::new();
    assert!(wait_until(WAIT, || {
        let r = fwd.get("/api/connections");
        list = r.json().as_array().unwrap().clone();
        list.len() == 2 && r.header("x-total-count") == Some("2")
    }));
    assert!(list
        .iter()
        .all(|c| c["rule"] == "r1" && c["backend"] == format!("127.0.0.1:{backend}")));
    let mine = list
        .iter()
        .find(|c| c["client"] == a.local_addr().unwrap().to_string())
        .expect("the first client is listed");
    assert_eq!(mine["bytes_up"], 12);
    let id = mine["id"].as_str().unwrap();

    let closed = fwd.send("DELETE", &format!("/api/connections/{id}"), &[], None);
    assert_eq!(closed.status, 200, "{}", closed.body);
    let mut buf = [0u8; 1];
    assert!(
        matches!(a.read(&mut buf), Ok(0) | Err(_)),
        "the client sees its connection end"
    );
    assert!(wait_until(WAIT, || fwd
        .get("/api/connections")
        .json()
        .as_array()
        .unwrap()
        .len()
        == 1));
    assert_eq!(
        fwd.send("DELETE", &format!("/api/connections/{id}"), &[], None)
            .status,
        404
    );
    assert_eq!(
        fwd.send("DELETE", "/api/connections/abc", &[], None).status,
        400
    );

    let stats = fwd.get("/api/stats").json();
    let b = &stats["pools"][0]["backends"][0];
    // Three: the two clients and wait_for_listen's probe.
    assert_eq!(b["total"], 3);
    assert_eq!(b["active"], 1);
    assert_eq!(b["bytes_up"], 18);
    assert_eq!(stats["workers"], 1);
    let metrics = fwd.get("/metrics");
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(metrics.body.contains(&format!(
        "forwarder_backend_connections_total{{listen=\"0.0.0.0:{p1}\",name=\"r1\",backend=\"127.0.0.1:{backend}\"}} 3\n"
    )));
    assert!(metrics.body.contains("forwarder_active_connections 1\n"));

    // The history counts the three connections as new, in the seconds they arrived.
    assert!(wait_until(WAIT, || {
        let h = fwd.get("/api/history").json();
        h["pools"][0]["points"]
            .as_array()
            .is_some_and(|pts| pts.iter().map(|p| p[2].as_u64().unwrap()).sum::<u64>() == 3)
    }));
}

#[test]
fn the_page_and_its_assets_are_embedded() {
    let fwd = loopback("");
    let page = fwd.get("/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page
        .body
        .contains("<script src=\"/app.js\" defer></script>"));
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no external assets"
    );
    let js = fwd.get("/app.js");
    assert_eq!(js.status, 200);
    assert!(
        !js.body.contains("innerHTML"),
        "data must never be parsed as HTML"
    );
    assert_eq!(fwd.get("/style.css").status, 200);
    let missing = fwd.get("/nope");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "nothing at /nope");
}

#[test]
fn a_web_port_in_use_is_reported_at_start() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut fwd = Forwarder::builder()
        .web_on(&format!("127.0.0.1:{port}"))
        .spawn();
    let process = &mut fwd.process;
    let status = process.wait_exit(WAIT).expect("the forwarder exits");
    assert!(!status.success());
    assert!(process.wait_for_output("Address already in use", WAIT));
    assert!(
        process.output().contains(&format!(
            "forwarder: cannot serve the web page on 127.0.0.1:{port} (choose another with --web ADDR:PORT, or --no-web)"
        )),
        "{}",
        process.output()
    );
}

#[test]
fn a_broken_hand_edit_is_shown_and_can_be_fixed_from_the_page() {
    let backend = echo_backend();
    let (p1, p2) = (free_port(), free_port());
    let fwd = loopback(&format!("good,{p1},127.0.0.1,{backend}\n"));
    assert!(wait_for_listen(local(p1), WAIT));
    std::fs::write(
        &fwd.rules,
        format!("good,{p1},127.0.0.1,{backend}\nbad,{p2},127.0.0.1,70000\n"),
    )
    .unwrap();
    assert!(fwd.process.wait_for_output("rules not reloaded", WAIT));

    let doc = fwd.get("/api/rules").json();
    assert_eq!(doc["in_force"], false);
    assert_eq!(doc["entries"].as_array().unwrap().len(), 2);
    let bad_id = doc["entries"][1]["id"].as_str().unwrap();
    assert_eq!(
        doc["errors"],
        serde_json::json!([{
            "line": 2,
            "field": "dest_port",
            "message": "port 70000 is out of range 1-65535",
            "id": bad_id,
        }])
    );
    assert!(refused(p2), "the broken row must not be in force");

    // Fixing the row from the page writes a valid file and applies it.
    let fixed = fwd.send(
        "PUT",
        &format!("/api/rules/{bad_id}"),
        &[],
        Some(&rule_json("bad", p2, backend)),
    );
    assert_eq!(fixed.status, 200, "{}", fixed.body);
    assert_eq!(fixed.json()["in_force"], true);
    assert_eq!(fixed.json()["errors"], serde_json::json!([]));
    echo_through(p2, "fixed from the page");
}

#[test]
fn a_valid_file_that_cannot_be_applied_says_why_on_the_page() {
    let backend = echo_backend();
    let p1 = free_port();
    let fwd = loopback(&format!("good,{p1},127.0.0.1,{backend}\n"));
    assert!(wait_for_listen(local(p1), WAIT));
    let doc = fwd.get("/api/rules").json();
    assert_eq!(doc["in_force"], true);
    assert_eq!(doc["apply_error"], Value::Null);
    // Valid rows, but another program holds the new port: the reload is refused as a whole.
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    std::fs::write(
        &fwd.rules,
        format!("good,{p1},127.0.0.1,{backend}\nbusy,{busy},127.0.0.1,{backend}\n"),
    )
    .unwrap();
    assert!(fwd.process.wait_for_output("rules not reloaded", WAIT));
    let doc = fwd.get("/api/rules").json();
    assert_eq!(doc["in_force"], false);
    assert_eq!(doc["errors"], serde_json::json!([]));
    let why = doc["apply_error"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains(&format!("listen_port: cannot listen on 0.0.0.0:{busy}")),
        "{why}"
    );
    // Once the port is free, the next reload applies and the reason goes away.
    drop(taken);
    fwd.process.signal(libc::SIGHUP);
    assert!(wait_until(WAIT, || fwd.get("/api/rules").json()
        ["in_force"]
        == true));
    assert_eq!(fwd.get("/api/rules").json()["apply_error"], Value::Null);
}

#[test]
fn a_flood_of_idle_page_connections_does_not_stop_forwarding_or_reloads() {
    let backend = echo_backend();
    let (p1, p2) = (free_port(), free_port());
    let fwd = loopback(&format!("r1,{p1},127.0.0.1,{backend}\n"));
    assert!(wait_for_listen(local(p1), WAIT));
    // More idle connections than the page serves at once: the page stalls, nothing else does.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(fwd.web()).unwrap())
        .collect();
    echo_through(p1, "forwarding goes on");
    std::fs::write(
        &fwd.rules,
        format!("r1,{p1},127.0.0.1,{backend}\nr2,{p2},127.0.0.1,{backend}\n"),
    )
    .unwrap();
    assert!(
        wait_until(WAIT, || TcpStream::connect(local(p2)).is_ok()),
        "a hand edit was not applied while the page was flooded"
    );
    echo_through(p2, "and reloads too");
    drop(idle);
    assert_eq!(
        fwd.get("/api/rules").json()["entries"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
