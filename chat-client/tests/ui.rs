//! The client's window driven by egui_kittest (no GPU, no display) against the real chat-server
//! binary: fill the dialog, connect, chat, lose the server, reconnect.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use chat_client::app::{ChatApp, Options, Screen};
use chat_client::state::Phase;
use egui::accesskit::Role;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use testbed_dev::testing::{bin_path, free_port, wait_for_listen, ChildGuard};

const PATIENCE: Duration = Duration::from_secs(20);
/// SIGTERM on Linux (libc is not a dependency of this crate).
const SIGTERM: i32 = 15;

fn start_server(port: u16) -> ChildGuard {
    let mut cmd = Command::new(bin_path("chat-server"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--history", "5"]);
    let guard = ChildGuard::spawn(cmd);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_for_listen(addr, PATIENCE),
        "chat-server did not start:\n{}",
        guard.output()
    );
    guard
}

fn harness(options: Options) -> Harness<'static, ChatApp> {
    Harness::builder()
        .with_size([860.0, 560.0])
        .build_ui_state(|ui, app: &mut ChatApp| app.ui(ui), ChatApp::new(options))
}

/// Runs frames until `cond` holds (network replies arrive on other threads).
fn step_until(
    h: &mut Harness<'static, ChatApp>,
    what: &str,
    cond: impl Fn(&Harness<'static, ChatApp>) -> bool,
) {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        h.step();
        if cond(h) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = &h.state().state;
    panic!(
        "never {what}; phase {:?}, error {:?}, entries {:#?}",
        s.phase, s.error, s.entries
    );
}

fn shows(h: &Harness<'static, ChatApp>, text: &str) -> bool {
    h.query_by_label_contains(text).is_some()
}

/// Replaces a dialog field's text the way a user does: focus, select all, type.
fn fill(h: &mut Harness<'static, ChatApp>, field: &str, text: &str) {
    h.get_by_label(field).focus();
    h.run();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.run();
    h.get_by_label(field).type_text(text);
    h.run();
    assert_eq!(
        h.get_by_label(field).value().as_deref(),
        Some(text),
        "field {field}"
    );
}

/// A plain-socket user in the same room.
struct Peer {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Peer {
    fn join(port: u16, nick: &str) -> Peer {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut peer = Peer {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        peer.say(nick);
        peer.until(&format!("OK {nick} "));
        peer
    }

    fn say(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    fn until(&mut self, needle: &str) -> String {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .expect("line from chat-server");
            assert!(n > 0, "server closed while waiting for {needle:?}");
            if line.contains(needle) {
                return line;
            }
        }
    }
}

fn settings_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("testbed-chat").join("last.json")
}

#[test]
fn dialog_connects_and_a_sent_message_comes_back() {
    let port = free_port();
    let _server = start_server(port);
    let mut bob = Peer::join(port, "bob");
    bob.say("hello before you came");
    bob.until("MSG ");

    let dir = tempfile::tempdir().unwrap();
    let mut h = harness(Options {
        settings_path: Some(settings_in(&dir)),
        ..Options::default()
    });
    h.run();
    assert_eq!(h.state().screen, Screen::Dialog);
    fill(&mut h, "Host", "127.0.0.1");
    fill(&mut h, "Port", &port.to_string());
    fill(&mut h, "Nickname", "kitty");
    h.get_by_label("Connect").click();
    step_until(&mut h, "joined", |h| {
        h.state().state.phase == Phase::Chatting && shows(h, "You joined 127.0.0.1")
    });
    assert_eq!(h.state().screen, Screen::Chat);
    // History, the user list (with "(you)") and the status bar.
    assert!(shows(&h, "hello before you came"));
    assert!(h.query_by_label("(you)").is_some());
    assert!(shows(
        &h,
        &format!("Connected to 127.0.0.1:{port} as kitty")
    ));
    h.run(); // settles, and checks every widget has an accessible name

    let input = h.get_by_role(Role::TextInput);
    input.focus();
    input.type_text("hi from the window");
    h.run();
    h.key_press(egui::Key::Enter);
    step_until(&mut h, "saw its own message", |h| {
        shows(h, "hi from the window")
    });
    let echoed = &h.state().state.entries.back().unwrap().kind;
    assert_eq!(
        *echoed,
        chat_client::state::EntryKind::Message {
            nick: "kitty".into(),
            text: "hi from the window".into(),
            earlier: false
        }
    );
    assert_eq!(h.state().input, "", "input cleared after sending");
    assert!(
        h.get_by_role(Role::TextInput).is_focused(),
        "focus stays in the input"
    );
    assert!(bob.until("MSG ").ends_with(" kitty hi from the window\n"));

    // Someone else's message shows up too.
    bob.say("welcome, kitty");
    step_until(&mut h, "saw bob's message", |h| shows(h, "welcome, kitty"));

    // Leaving says /quit (the others see why), and the dialog comes back.
    h.get_by_label("Change server").click();
    h.run();
    assert_eq!(h.state().screen, Screen::Dialog);
    assert!(bob.until("LEAVE ").ends_with(" kitty quit\n"));

    // The dialog's values were remembered, and a new start offers them.
    let saved = std::fs::read_to_string(settings_in(&dir)).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(
        saved,
        serde_json::json!({"host": "127.0.0.1", "port": port, "nick": "kitty"})
    );
    let again = ChatApp::new(Options {
        settings_path: Some(settings_in(&dir)),
        ..Options::default()
    });
    assert_eq!(
        (
            again.form.host.as_str(),
            again.form.port.as_str(),
            again.form.nick.as_str()
        ),
        ("127.0.0.1", port.to_string().as_str(), "kitty")
    );
}

#[test]
fn server_down_shows_the_error_and_reconnect_works() {
    let port = free_port();
    let mut h = harness(Options {
        host: Some("127.0.0.1".into()),
        port: Some(port),
        nick: Some("kitty".into()),
        connect: true,
        settings_path: None,
    });
    step_until(&mut h, "showed the refusal", |h| {
        shows(
            h,
            &format!("Cannot connect to 127.0.0.1:{port}: Connection refused"),
        )
    });
    assert_eq!(h.state().state.phase, Phase::Disconnected);
    assert!(shows(&h, "Disconnected"));

    let mut server = start_server(port);
    h.get_by_label("Reconnect").click();
    step_until(&mut h, "joined after reconnecting", |h| {
        h.state().state.phase == Phase::Chatting
    });
    assert!(h.query_by_label("Reconnect").is_none());
    h.run();
    assert!(
        h.get_by_role(Role::TextInput).is_focused(),
        "ready to type after joining"
    );

    // The server going away while chatting is shown, with its goodbye.
    server.signal(SIGTERM);
    step_until(&mut h, "showed the shutdown", |h| {
        shows(h, "The server closed the connection (server shutting down)")
    });
    assert!(h.query_by_label("Reconnect").is_some());
    server.wait_exit(PATIENCE);
}

#[test]
fn dialog_shows_connection_errors_and_bad_fields() {
    let port = free_port();
    let mut h = harness(Options {
        host: Some("127.0.0.1".into()),
        port: Some(port),
        nick: Some("kitty".into()),
        ..Options::default()
    });
    h.run();
    assert!(
        h.get_by_label("Nickname").is_focused(),
        "the dialog starts in the nickname field"
    );
    fill(&mut h, "Port", "70000");
    h.get_by_label("Connect").click();
    h.run();
    assert!(shows(&h, "Port \"70000\" is not a number from 1 to 65535"));
    fill(&mut h, "Port", &port.to_string());
    fill(&mut h, "Nickname", "no spaces");
    h.get_by_label("Connect").click();
    h.run();
    assert!(shows(&h, "Nickname may not contain ' '"));
    fill(&mut h, "Nickname", "kitty");
    h.get_by_label("Connect").click();
    step_until(&mut h, "showed the refusal in the dialog", |h| {
        shows(h, "Connection refused")
    });
    assert_eq!(h.state().screen, Screen::Dialog);
}

#[test]
fn taken_nickname_is_asked_again_in_the_dialog() {
    let port = free_port();
    let _server = start_server(port);
    let _first = Peer::join(port, "kitty");
    let mut h = harness(Options {
        host: Some("127.0.0.1".into()),
        port: Some(port),
        nick: Some("Kitty".into()),
        connect: true,
        settings_path: None,
    });
    step_until(&mut h, "showed the taken nickname", |h| {
        shows(h, "Nickname \"Kitty\" is taken; send another one")
    });
    assert_eq!(h.state().screen, Screen::Dialog);
    h.run();
    assert!(h.get_by_label("Nickname").is_focused());
    fill(&mut h, "Nickname", "kitty2");
    h.get_by_label("Connect").click();
    step_until(&mut h, "joined with the second name", |h| {
        h.state().state.phase == Phase::Chatting
    });
    assert_eq!(h.state().state.nick, "kitty2");
    assert_eq!(h.state().state.users, vec!["kitty", "kitty2"]);
}
