//! Echo correctness against the real server: exact bytes for payloads from 1 byte to 1 MiB over TLS
//! and plaintext, a clean close_notify after the client's, and 2,000 TLS clients at once.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZES: [usize; 10] = [
    1,
    2,
    1_000,
    16_383,
    16_384,
    16_385,
    65_536,
    100_003,
    300_000,
    1 << 20,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_echo_is_exact_from_1_byte_to_1_mib_and_ends_with_close_notify() {
    let server = common::start(&["--workers", "2"]);
    let mut total = 0;
    for (i, &len) in SIZES.iter().enumerate() {
        let data = common::payload(len, i as u64);
        let stream = server.connect_tls().await;
        // read_to_end inside echo_all fails unless the server answers our close_notify with its own.
        let got = common::echo_all(stream, &data)
            .await
            .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
        assert_eq!(got.len(), len, "{len} bytes: length");
        assert!(got == data, "{len} bytes: content differs");
        total += len as u64;
    }
    let stats = server.wait_stats("all connections closed", |s| {
        s["connections_now"] == 0 && s["connections_total"] == SIZES.len()
    });
    assert_eq!(stats["bytes_echoed"], total);
    assert_eq!(stats["handshakes_total"], SIZES.len());
    assert_eq!(stats["handshake_failures"], 0);
    assert_eq!(stats["connection_errors"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_echo_is_exact_from_1_byte_to_1_mib_and_ends_with_fin() {
    let server = common::start(&["--plain", "--workers", "2"]);
    for (i, &len) in SIZES.iter().enumerate() {
        let data = common::payload(len, 100 + i as u64);
        let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let got = common::echo_all(stream, &data).await.unwrap();
        assert_eq!(got.len(), len, "{len} bytes: length");
        assert!(got == data, "{len} bytes: content differs");
    }
    let stats = server.wait_stats("all connections closed", |s| {
        s["connections_now"] == 0 && s["connections_total"] == SIZES.len()
    });
    assert_eq!(stats["plain"], true);
    assert_eq!(stats["handshakes_total"], 0);
    assert_eq!(stats["bytes_echoed"], SIZES.iter().sum::<usize>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_messages_on_one_connection_come_back_in_order() {
    let server = common::start(&["--workers", "1"]);
    let mut stream = server.connect_tls().await;
    let mut expected = Vec::new();
    for i in 0..500u32 {
        let msg = format!("message {i}\n");
        stream.write_all(msg.as_bytes()).await.unwrap();
        expected.extend_from_slice(msg.as_bytes());
        let mut got = vec![0; msg.len()];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let stats = server.wait_stats("the connection closed", |s| {
        s["connections_total"] == 1 && s["connections_now"] == 0
    });
    assert_eq!(stats["messages_echoed"], 500);
    assert_eq!(stats["bytes_echoed"], expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_tls_clients_at_once_all_echo_correctly() {
    const CLIENTS: usize = 2_000;
    let limit = common::raise_fd_limit();
    assert!(
        limit > CLIENTS as u64 + 100,
        "open-file limit {limit} too low"
    );
    let server = Arc::new(common::start(&["--workers", "2"]));
    let echoed = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let connector = server.connector();
    let mut tasks = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let addr = server.addr;
        let connector = connector.clone();
        let echoed = Arc::clone(&echoed);
        let mut release = release_rx.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            let msg = format!("client {i} says {}", "x".repeat(i % 300));
            tls.write_all(msg.as_bytes()).await?;
            let mut got = vec![0; msg.len()];
            tls.read_exact(&mut got).await?;
            assert_eq!(got, msg.as_bytes(), "client {i}");
            echoed.fetch_add(1, Ordering::SeqCst);
            // Hold the connection until every client is connected at the same time.
            release.wait_for(|r| *r).await.unwrap();
            tls.shutdown().await?;
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).await?;
            assert!(rest.is_empty());
            Ok::<_, std::io::Error>(())
        }));
    }
    let ok = tokio::time::timeout(Duration::from_secs(120), async {
        while echoed.load(Ordering::SeqCst) < CLIENTS {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "only {} of {CLIENTS} echoed",
        echoed.load(Ordering::SeqCst)
    );
    let s = Arc::clone(&server);
    let stats = tokio::task::spawn_blocking(move || {
        // The file may predate the last handshakes, so wait for both counts.
        s.wait_stats("2,000 open connections and handshakes", |v| {
            v["connections_now"] == CLIENTS && v["handshakes_total"] == CLIENTS
        })
    })
    .await
    .unwrap();
    assert_eq!(stats["connections_total"], CLIENTS);
    assert_eq!(stats["handshake_failures"], 0);
    release_tx.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = Arc::clone(&server);
    tokio::task::spawn_blocking(move || {
        s.wait_stats("every connection closed", |v| v["connections_now"] == 0)
    })
    .await
    .unwrap();
}
