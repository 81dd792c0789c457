//! The forwarder's life: live reloads that keep established connections, a bad reload that
//! keeps the old rules, a killed worker that comes back, `--check`, and draining on SIGTERM.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use testbed_dev::testing::{free_port, wait_until};

fn refused(port: u16) -> bool {
    TcpStream::connect_timeout(&local(port), Duration::from_millis(300)).is_err()
}

#[test]
fn reload_adds_removes_and_changes_rules_while_connections_live() {
    let a = Backend::echo(Some("AA"));
    let b = Backend::echo(Some("BB"));
    let (p1, p2) = (free_port(), free_port());
    let fwd = Forwarder::builder()
        .forward("one", p1, a.port)
        .workers(2)
        .start();

    let mut live = TcpStream::connect(local(p1)).unwrap();
    live.set_read_timeout(Some(WAIT)).unwrap();
    let mut tag = [0u8; 2];
    live.read_exact(&mut tag).unwrap();
    assert_eq!(&tag, b"AA");

    // Add a port.
    fwd.rewrite_rules(&format!(
        "one,{p1},127.0.0.1,{}\ntwo,{p2},127.0.0.1,{}\n",
        a.port, b.port
    ));
    assert!(wait_until(WAIT, || !refused(p2)), "new port listens");
    assert_eq!(read_tag(p2, 2), "BB");

    // Change p1's pool to the other backend: new connections go there, the live one stays.
    fwd.rewrite_rules(&format!(
        "one,{p1},127.0.0.1,{}\ntwo,{p2},127.0.0.1,{}\n",
        b.port, b.port
    ));
    assert!(wait_until(WAIT, || read_tag(p1, 2) == "BB"));
    assert_eq!(round_trip(&mut live, b"still here"), b"still here");

    // Remove p1 entirely: the port closes, the established connection keeps working.
    fwd.rewrite_rules(&format!("two,{p2},127.0.0.1,{}\n", b.port));
    assert!(
        wait_until(WAIT, || refused(p1)),
        "removed port stops listening"
    );
    assert_eq!(round_trip(&mut live, b"after removal"), b"after removal");
    assert_eq!(read_tag(p2, 2), "BB");
}

#[test]
fn bad_reload_keeps_the_old_rules_and_names_the_line() {
    let a = Backend::echo(Some("AA"));
    let p1 = free_port();
    let fwd = Forwarder::builder()
        .forward("one", p1, a.port)
        .workers(1)
        .start();
    fwd.rewrite_rules(&format!(
        "one,{p1},127.0.0.1,{}\n# comment\nbroken,99999,127.0.0.1,80\n",
        a.port
    ));
    assert!(
        fwd.process.wait_for_output(
            "entries.csv:3: listen_port: port 99999 is out of range",
            WAIT
        ),
        "{}",
        fwd.process.output()
    );
    assert!(fwd
        .process
        .output()
        .contains("previous rules stay in force"));
    assert_eq!(read_tag(p1, 2), "AA", "old rules still forward");
}

#[test]
fn sighup_reloads() {
    let a = Backend::echo(Some("AA"));
    let (p1, p2) = (free_port(), free_port());
    let fwd = Forwarder::builder()
        .forward("one", p1, a.port)
        .workers(1)
        .start();
    // Write without the watcher noticing first is racy; SIGHUP must work regardless.
    std::fs::write(&fwd.rules, format!("two,{p2},127.0.0.1,{}\n", a.port)).unwrap();
    fwd.process.signal(libc::SIGHUP);
    assert!(wait_until(WAIT, || !refused(p2)));
    assert!(wait_until(WAIT, || refused(p1)));
}

#[test]
fn killed_worker_is_restarted_and_the_port_keeps_serving() {
    let a = Backend::echo(Some("AA"));
    let p1 = free_port();
    let fwd = Forwarder::builder()
        .forward("one", p1, a.port)
        .workers(2)
        .start();
    assert!(wait_until(WAIT, || fwd.worker_pids().len() == 2));
    let before = fwd.worker_pids();
    // SAFETY: kill(2) on a worker we just listed.
    unsafe {
        libc::kill(before[0] as i32, libc::SIGKILL);
    }
    // Once it is dead, the other worker serves the port. (Connections the kernel queued on the
    // dying worker's own listener in the instant before it died are reset: SO_REUSEPORT gives
    // every worker its own accept queue.)
    assert!(wait_until(WAIT, || !fwd.worker_pids().contains(&before[0])));
    for _ in 0..5 {
        assert_eq!(read_tag(p1, 2), "AA");
    }
    assert!(
        wait_until(Duration::from_secs(5), || {
            let now = fwd.worker_pids();
            now.len() == 2 && !now.contains(&before[0])
        }),
        "worker restarted: {:?} -> {:?}\n{}",
        before,
        fwd.worker_pids(),
        fwd.process.output()
    );
    assert!(fwd.process.output().contains("restarting"));
    for _ in 0..5 {
        assert_eq!(read_tag(p1, 2), "AA");
    }
}

#[test]
fn a_reload_a_worker_cannot_take_fails_whole_and_a_later_one_works() {
    let a = Backend::echo(Some("AA"));
    let (p1, p2) = (free_port(), free_port());
    let fwd = Forwarder::builder()
        .forward("one", p1, a.port)
        .workers(2)
        .start();
    assert!(wait_until(WAIT, || fwd.worker_pids().len() == 2));
    let stopped = fwd.worker_pids()[0] as i32;
    // SAFETY: kill(2) on a worker we just listed. A stopped worker cannot answer the reload.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    let two = format!(
        "one,{p1},127.0.0.1,{}\ntwo,{p2},127.0.0.1,{}\n",
        a.port, a.port
    );
    fwd.rewrite_rules(&two);
    let failed = wait_until(WAIT, || {
        fwd.process
            .output()
            .contains("could not apply the rules (reading worker reply")
    });
    // SAFETY: as above.
    unsafe { libc::kill(stopped, libc::SIGCONT) };
    assert!(failed, "no failure reported:\n{}", fwd.process.output());
    assert!(fwd
        .process
        .output()
        .contains("rules not reloaded, the previous rules stay in force"));
    // The worker that took the new rules was put back: the new port is not served.
    assert!(wait_until(WAIT, || refused(p2)));
    // The woken worker's late replies are recognised as late: the next reload works everywhere.
    fwd.process.signal(libc::SIGHUP);
    assert!(
        wait_until(WAIT, || !refused(p2)),
        "{}",
        fwd.process.output()
    );
    for _ in 0..6 {
        assert_eq!(read_tag(p2, 2), "AA");
        assert_eq!(read_tag(p1, 2), "AA");
    }
}

#[test]
fn check_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.csv");
    std::fs::write(
        &path,
        "ok,8080,127.0.0.1,80\n\nx,8081,127.0.0.1,0\ny,abc,127.0.0.1,80\n",
    )
    .unwrap();
    let (passed, stderr) = check(&path);
    assert!(!passed);
    let shown = path.display();
    assert!(
        stderr.contains(&format!("{shown}:3: dest_port: port 0 is not allowed")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{shown}:4: listen_port: \"abc\" is not a port number"
        )),
        "{stderr}"
    );

    std::fs::write(&path, "\"web1\",\"18080\",\"127.0.0.1\",\"9001\"\n").unwrap();
    let (passed, stderr) = check(&path);
    assert!(passed, "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:18080") && stderr.contains("web1 127.0.0.1:9001"),
        "{stderr}"
    );
}

#[test]
fn port_taken_by_another_program_is_named() {
    let port = free_port();
    let _squatter = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.csv");
    std::fs::write(&path, format!("x,{port},127.0.0.1,80\n")).unwrap();
    let (passed, stderr) = check(&path);
    assert!(!passed);
    assert!(
        stderr.contains(&format!(
            "r.csv:1: listen_port: cannot listen on 0.0.0.0:{port}"
        )),
        "{stderr}"
    );
}

#[test]
fn missing_default_rules_file_is_created_with_an_example() {
    let dir = tempfile::tempdir().unwrap();
    let out = command()
        .arg("--check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.path().join("entries.csv")).unwrap();
    assert!(text.contains("# web1,8080,127.0.0.1,9001"));
}

#[test]
fn sigterm_drains_established_connections_then_exits_zero() {
    let a = Backend::echo(None);
    let p1 = free_port();
    let mut fwd = Forwarder::builder()
        .forward("one", p1, a.port)
        .workers(1)
        .args(["--drain-timeout-s", "10"])
        .start();
    let mut live = TcpStream::connect(local(p1)).unwrap();
    live.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(round_trip(&mut live, b"before"), b"before");
    fwd.process.signal(libc::SIGTERM);
    assert!(fwd.process.wait_for_output("draining", WAIT));
    assert!(
        wait_until(WAIT, || refused(p1)),
        "no new connections while draining"
    );
    assert_eq!(round_trip(&mut live, b"during drain"), b"during drain");
    live.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).unwrap();
    let status = fwd.process.wait_exit(WAIT).expect("exits once drained");
    assert!(status.success(), "{status}");
    let _ = live.write_all(b"x");
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let a = Backend::echo(None);
    let p1 = free_port();
    let _fwd = Forwarder::builder()
        .forward("one", p1, a.port)
        .workers(1)
        .args(["--idle-timeout-s", "1"])
        .start();
    let mut busy = TcpStream::connect(local(p1)).unwrap();
    let mut idle = TcpStream::connect(local(p1)).unwrap();
    idle.set_read_timeout(Some(WAIT)).unwrap();
    busy.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(round_trip(&mut idle, b"hi"), b"hi");
    // Keep one connection busy for 3 s while the other sits idle.
    for _ in 0..12 {
        assert_eq!(round_trip(&mut busy, b"tick"), b"tick");
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut buf = [0u8; 1];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the idle connection was closed");
    assert_eq!(round_trip(&mut busy, b"still"), b"still");
}

#[test]
fn sigterm_to_the_whole_process_group_stops_without_restarts() {
    let a = Backend::echo(None);
    let p1 = free_port();
    let mut fwd = Forwarder::builder()
        .forward("one", p1, a.port)
        .workers(2)
        .start();
    assert!(wait_until(WAIT, || fwd.worker_pids().len() == 2));
    // As `kill -TERM -PGID` or Ctrl-C in a terminal: every process gets the signal at once.
    // SAFETY: kill(2) on the process group the test's ChildGuard created.
    unsafe {
        libc::kill(-(fwd.process.pid() as i32), libc::SIGTERM);
    }
    let status = fwd.process.wait_exit(WAIT).expect("exits");
    assert!(status.success(), "{status}");
    assert!(
        !fwd.process.output().contains("restarting"),
        "{}",
        fwd.process.output()
    );
}

/// Runs `forwarder --check --rules PATH`: whether it passed, and what it printed on stderr.
fn check(path: &std::path::Path) -> (bool, String) {
    let out = command()
        .args(["--check", "--rules"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
