//! Many clients and a client that stops reading, against the real chat-server binary.

mod common;

use std::net::TcpStream;

use common::{msg, start, Client};

#[test]
fn a_thousand_clients_all_receive_a_broadcast() {
    const CLIENTS: usize = 1_000;
    // The test holds a thousand sockets too.
    testbed::fdlimit::raise_nofile().unwrap();
    // A thousand clients from one address: the per-address cap is for strangers.
    let server = start(&["--log-level", "warn", "--max-per-address", "0"]);
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|i| {
            let mut c = Client::connect(server.addr);
            c.send(&format!("user{i}"));
            c
        })
        .collect();
    // Everyone is in once each has seen its own JOIN.
    for (i, c) in clients.iter_mut().enumerate() {
        let me = format!(" user{i}");
        c.until_match(|l| l.starts_with("JOIN ") && l.ends_with(&me), "own JOIN");
    }
    clients[0].send("/who");
    let users = clients[0].until("USERS ");
    assert!(
        users.starts_with(&format!("USERS {CLIENTS} ")),
        "{}",
        &users[..40]
    );

    clients[CLIENTS - 1].send("hello, thousand");
    let mut got = 0;
    for c in clients.iter_mut() {
        let line = c.until("MSG ");
        assert_eq!(
            msg(&line),
            Some((format!("user{}", CLIENTS - 1), "hello, thousand".into()))
        );
        got += 1;
    }
    assert_eq!(got, CLIENTS);
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_others_keep_chatting() {
    const MAX_MESSAGES: usize = 20_000;
    let server = start(&["--max-queue-bytes", "65536", "--max-line-bytes", "4096"]);
    // The sloth's receive buffer is kept small so the test does not have to fill megabytes.
    let sloth_socket = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&server.addr.into()).unwrap();
        TcpStream::from(s)
    };
    let mut sloth = Client::from_stream(sloth_socket);
    sloth.send("sloth");
    sloth.until("USERS ");

    let mut alice = Client::join(server.addr, "alice");
    let mut bob = Client::join(server.addr, "bob");
    let text = "x".repeat(3000);
    let mut dropped_after = None;
    for seq in 0..MAX_MESSAGES {
        let line = format!("{seq} {text}");
        alice.send(&line);
        // Each message reaches both readers before the next is sent; a stall would show here as
        // the read deadline passing.
        for c in [&mut alice, &mut bob] {
            let got = c.until_match(
                |l| l.starts_with("MSG ") || l.contains(" sloth dropped"),
                "MSG",
            );
            if got.contains(" sloth dropped") {
                dropped_after.get_or_insert(seq);
                assert_eq!(msg(&c.until("MSG ")), Some(("alice".into(), line.clone())));
            } else {
                assert_eq!(msg(&got), Some(("alice".into(), line.clone())));
            }
        }
        if dropped_after.is_some() {
            break;
        }
    }
    let seq = dropped_after.expect("the client that never reads was never dropped");
    // It was dropped once the kernel buffers and its 64 KiB queue were full, not at the first
    // message: at least 64 KiB of messages went its way.
    assert!(seq * 3000 > 65536, "dropped after only {seq} messages");
    assert!(server
        .guard
        .wait_for_output("dropping a client that stopped reading", common::PATIENCE));

    // The room carries on: bob talks, alice hears, and the sloth's name is free again.
    bob.send("still here");
    assert_eq!(
        msg(&alice.until("MSG ")),
        Some(("bob".into(), "still here".into()))
    );
    alice.send("/who");
    assert_eq!(alice.until("USERS "), "USERS 2 alice bob");
    // The sloth finds its connection closed once it reads what the kernel had buffered.
    assert!(sloth.closed_within(common::PATIENCE));
}
