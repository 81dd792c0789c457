//! Opening a connection on a starved client: a step that finishes after `--timeout-ms` is a
//! timeout, even though tokio's timeout lets the step win when both are ready at once.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use ssl_echo_client::config::{RunConfig, Workload};
use ssl_echo_client::connector::Connector;
use ssl_echo_client::failure::Cause;

/// A one-connection TCP relay to `target` that holds back the server's first bytes by `delay`,
/// so that the handshake finishes while the client's runtime is blocked.
fn delaying_relay(target: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(target).unwrap();
        let pump = |mut from: TcpStream, mut to: TcpStream, delay: Duration| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                let mut first = true;
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if first {
                        std::thread::sleep(delay);
                        first = false;
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(Shutdown::Write);
            })
        };
        pump(
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            Duration::ZERO,
        );
        pump(server, client, delay);
    });
    addr
}

#[tokio::test]
async fn a_handshake_that_finishes_after_the_limit_is_a_timeout() {
    let work = tempfile::tempdir().unwrap();
    let certs = certs();
    let server = Server::start(Some(&certs), work.path());
    let relay = delaying_relay(server.addr, Duration::from_millis(100));
    let limit = Duration::from_millis(300);
    let config = RunConfig {
        host: "127.0.0.1".into(),
        addr: relay,
        server_name: "localhost".into(),
        ca: Some(certs.paths.ca_cert.clone()),
        message: "x".into(),
        workload: Workload::Count(1),
        connections: 1,
        connect_rate: 0.0,
        rate: None,
        timeout_ms: limit.as_millis() as u64,
        source_ips: Vec::new(),
        tls_options: Default::default(),
        churn: None,
        max_connecting: 500,
        keepalive_ms: 0,
        payload: None,
    };
    let connector = Connector::new(&config).unwrap();
    let opening = tokio::spawn(async move { connector.open(relay, None, limit).await });
    // Let the task connect and send its ClientHello, then starve this single-threaded runtime
    // past the limit while the server's answer arrives.
    tokio::time::sleep(Duration::from_millis(30)).await;
    std::thread::sleep(limit * 3);
    match opening.await.unwrap() {
        Ok(est) => panic!(
            "opened although the limit had passed (connect {:?}, handshake {:?})",
            est.connect, est.handshake
        ),
        Err(not) => assert_eq!(not.failure.cause, Cause::Timeout, "{:?}", not.failure),
    }
}
