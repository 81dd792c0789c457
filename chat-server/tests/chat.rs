//! The chat protocol end to end against the real chat-server binary: joining, broadcasting,
//! history, nicknames, commands, refusals, shutdown.

mod common;

use std::time::Duration;

use chat_server::protocol::{ErrorCode, LeaveReason, ServerLine};
use common::{msg, start, Client, PATIENCE};

fn join_of(line: &ServerLine) -> Option<&str> {
    match line {
        ServerLine::Join { nick, .. } => Some(nick),
        _ => None,
    }
}

#[test]
fn messages_reach_everyone_with_sender_and_time() {
    let server = start(&[]);
    let mut alice = Client::join(server.addr, "alice");
    let mut bob = Client::join(server.addr, "bob");
    let mut carol = Client::join(server.addr, "carol");
    bob.send("hello, world  with  spaces ");
    for c in [&mut alice, &mut bob, &mut carol] {
        let line = c.until("MSG ");
        let parsed = ServerLine::parse(&line).unwrap();
        let ServerLine::Msg { at, nick, text } = parsed else {
            panic!("{line}")
        };
        assert_eq!(
            (nick.as_str(), text.as_str()),
            ("bob", "hello, world  with  spaces ")
        );
        let age = chrono::Utc::now() - at;
        assert!(age.num_seconds().abs() < 60, "timestamp {at} is not now");
        // Exact shape: "MSG 2026-11-25T06:40:01.123Z bob ..."
        assert_eq!(
            line.len(),
            "MSG 2026-11-25T06:40:01.123Z bob ".len() + text.len()
        );
    }
}

#[test]
fn join_leave_and_history() {
    let server = start(&["--history", "2"]);
    let mut alice = Client::join(server.addr, "alice");
    assert_eq!(join_of(&alice.parsed()), Some("alice"));
    for text in ["one", "two", "three"] {
        alice.send(text);
        assert_eq!(msg(&alice.line()), Some(("alice".into(), text.into())));
    }

    let mut bob = Client::connect(server.addr);
    bob.send("bob");
    assert_eq!(
        bob.line(),
        "OK bob welcome, bob: 2 online, 2 earlier messages follow; /help lists the commands"
    );
    for text in ["two", "three"] {
        match bob.parsed() {
            ServerLine::Hist { nick, text: t, .. } => {
                assert_eq!((nick.as_str(), t.as_str()), ("alice", text))
            }
            other => panic!("expected history, got {other}"),
        }
    }
    assert_eq!(bob.line(), "USERS 2 alice bob");
    assert_eq!(join_of(&bob.parsed()), Some("bob"));
    assert_eq!(join_of(&alice.parsed()), Some("bob"));

    // /quit: a goodbye, then the connection closes and the others hear why.
    bob.send("/quit");
    assert_eq!(bob.line(), "BYE goodbye");
    assert!(bob.closed_within(PATIENCE));
    match alice.parsed() {
        ServerLine::Leave { nick, reason, .. } => {
            assert_eq!((nick.as_str(), reason), ("bob", LeaveReason::Quit))
        }
        other => panic!("expected LEAVE, got {other}"),
    }

    // Closing the socket without a word is a leave too.
    let carol = Client::join(server.addr, "carol");
    alice.until("JOIN ");
    drop(carol);
    match alice.parsed() {
        ServerLine::Leave { nick, reason, .. } => {
            assert_eq!((nick.as_str(), reason), ("carol", LeaveReason::Closed))
        }
        other => panic!("expected LEAVE, got {other}"),
    }
}

#[test]
fn taken_nickname_gets_a_second_chance() {
    let server = start(&[]);
    let mut alice = Client::join(server.addr, "alice");
    let mut other = Client::connect(server.addr);
    other.send("Alice");
    assert_eq!(
        other.line(),
        "ERR nick-taken nickname \"Alice\" is taken; send another one"
    );
    other.send("bad nick!");
    assert_eq!(
        other.line(),
        "ERR nick-invalid nickname may not contain ' '; 1-24 characters: letters a-z A-Z, digits, '-', '_' or '.', starting with a letter or digit; send another one"
    );
    other.send(&"x".repeat(25));
    assert_eq!(
        other.line(),
        "ERR nick-invalid nickname is 25 characters long, the most is 24; send another one"
    );
    other.send("alice2");
    assert!(other.line().starts_with("OK alice2 "));
    assert_eq!(other.line(), "USERS 2 alice alice2");
    assert_eq!(join_of(&alice.parsed()), Some("alice"));
    assert_eq!(join_of(&alice.parsed()), Some("alice2"));
    // Not yet named clients see no chat.
    let mut lurker = Client::connect(server.addr);
    alice.send("psst");
    alice.until("MSG ");
    assert_eq!(lurker.try_line(Duration::from_millis(300)), None);
}

#[test]
fn who_nick_help_and_unknown_commands() {
    let server = start(&[]);
    let mut alice = Client::join(server.addr, "alice");
    let mut bob = Client::join(server.addr, "Bob");
    alice.until("JOIN 2"); // her own join
    alice.until("JOIN "); // Bob's
    alice.send("/who");
    assert_eq!(alice.line(), "USERS 2 alice Bob");
    alice.send("/nick bob");
    assert_eq!(alice.line(), "ERR nick-taken nickname \"bob\" is taken");
    alice.send("/nick ally");
    for c in [&mut alice, &mut bob] {
        match ServerLine::parse(&c.until("NICK ")).unwrap() {
            ServerLine::Nick { old, new, .. } => {
                assert_eq!((old.as_str(), new.as_str()), ("alice", "ally"))
            }
            other => panic!("{other}"),
        }
    }
    // The old name is free, the new one is taken.
    let mut new_alice = Client::connect(server.addr);
    new_alice.send("ally");
    assert!(new_alice.line().starts_with("ERR nick-taken "));
    new_alice.send("alice");
    assert!(new_alice.line().starts_with("OK alice "));
    alice.send("/help");
    assert_eq!(
        alice.until("INFO "),
        "INFO Type a line and press Enter to say it to everyone."
    );
    alice.send("/dance");
    assert_eq!(
        alice.until("ERR "),
        "ERR unknown-command unknown command \"/dance\"; /help lists the commands"
    );
    alice.send("//slash");
    assert_eq!(
        msg(&alice.until("MSG ")),
        Some(("ally".into(), "/slash".into()))
    );
}

#[test]
fn overlong_lines_and_bad_utf8_are_refused_and_the_client_carries_on() {
    let server = start(&["--max-line-bytes", "100"]);
    let mut alice = Client::join(server.addr, "alice");
    let mut bob = Client::join(server.addr, "bob");

    // Exactly at the limit is fine; one byte more is refused.
    alice.send(&"a".repeat(100));
    assert_eq!(
        msg(&alice.until("MSG ")),
        Some(("alice".into(), "a".repeat(100)))
    );
    alice.send(&"b".repeat(101));
    assert_eq!(
        alice.until("ERR "),
        "ERR line-too-long line is too long; it was not sent"
    );
    // A huge line without a newline is refused as soon as it passes the limit...
    alice.send_bytes(&vec![b'c'; 1_000_000]);
    assert_eq!(
        alice.until("ERR "),
        "ERR line-too-long line is too long; it was not sent"
    );
    // ... and its tail up to the newline is skipped.
    alice.send_bytes(b"ccc\nafter\n");
    assert_eq!(
        msg(&alice.until("MSG ")),
        Some(("alice".into(), "after".into()))
    );

    alice.send_bytes(b"caf\xc3\xa9 \xff\xfe\n");
    assert_eq!(
        alice.until("ERR "),
        "ERR bad-utf8 line is not valid UTF-8; it was not sent"
    );
    alice.send("\u{1b}[2J");
    assert_eq!(
        alice.until("ERR "),
        "ERR control-chars line contains control characters; it was not sent"
    );
    alice.send("café ✓");
    assert_eq!(
        msg(&alice.until("MSG ")),
        Some(("alice".into(), "café ✓".into()))
    );

    // Bob saw only the accepted messages.
    let got: Vec<String> = (0..3).map(|_| msg(&bob.until("MSG ")).unwrap().1).collect();
    assert_eq!(got, vec!["a".repeat(100), "after".into(), "café ✓".into()]);

    // Also while choosing a nickname.
    let mut carol = Client::connect(server.addr);
    carol.send_bytes(b"car\xffol\n");
    assert_eq!(
        carol.line(),
        "ERR bad-utf8 line is not valid UTF-8; it was not sent"
    );
    carol.send(&"c".repeat(200));
    assert_eq!(
        carol.line(),
        "ERR line-too-long line is too long; it was not sent"
    );
    carol.send("carol");
    assert!(carol.line().starts_with("OK carol "));
}

#[test]
fn full_server_says_so() {
    let server = start(&["--max-clients", "2"]);
    let _a = Client::join(server.addr, "a");
    let _b = Client::connect(server.addr);
    let stream = std::net::TcpStream::connect(server.addr).unwrap();
    let mut third = std::io::BufReader::new(stream);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut third, &mut line).unwrap();
    assert_eq!(
        line,
        "ERR server-full server is full (2 clients); try again later\n"
    );
    assert_eq!(
        ServerLine::parse(line.trim_end()).unwrap(),
        ServerLine::Err {
            code: ErrorCode::ServerFull,
            text: "server is full (2 clients); try again later".into()
        }
    );
}

#[test]
fn sigterm_says_goodbye_and_exits_zero() {
    let mut server = start(&[]);
    let mut alice = Client::join(server.addr, "alice");
    let mut naming = Client::connect(server.addr);
    server.guard.signal(libc::SIGTERM);
    assert_eq!(alice.until("BYE "), "BYE server shutting down");
    assert_eq!(naming.line(), "BYE server shutting down");
    assert!(alice.closed_within(PATIENCE));
    let status = server.guard.wait_exit(PATIENCE).expect("chat-server exits");
    assert_eq!(status.code(), Some(0), "{}", server.guard.output());
    assert!(server
        .guard
        .wait_for_output("shutting down: told 2 connected clients", PATIENCE));
}

#[test]
fn bad_flags_and_busy_port_are_clear_errors() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"))
        .args(["--listen", "127.0.0.1:0", "--max-queue-bytes", "100"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "chat-server: --max-queue-bytes 100 cannot hold one line: it must be at least --max-line-bytes + 64 = 4160\n"
    );

    let server = start(&[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"))
        .args(["--listen", &server.addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "chat-server: starting chat-server: cannot listen on {}: Address already in use",
            server.addr
        )),
        "{stderr}"
    );
}

#[test]
fn a_client_that_half_closes_still_gets_its_answers() {
    use std::io::{Read, Write};
    let server = start(&[]);
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    // Like `printf 'solo\n/who\nbye' | nc -N`: the last line has no newline.
    stream.write_all(b"solo\n/who\nbye").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut all = String::new();
    stream.read_to_string(&mut all).unwrap();
    let kinds: Vec<&str> = all.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        kinds,
        vec!["HELLO", "OK", "USERS", "JOIN", "USERS", "MSG"],
        "{all}"
    );
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!((lines[2], lines[4]), ("USERS 1 solo", "USERS 1 solo"));
    assert_eq!(
        msg(all.lines().last().unwrap()),
        Some(("solo".into(), "bye".into()))
    );
}
