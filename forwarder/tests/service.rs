//! The forwarder as a gateway service, with the real binary: what systemd hears on
//! `$NOTIFY_SOCKET`, `--user` on ports below 1024, the exit codes, and SIGUSR1.

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use testbed_dev::testing::{free_port, wait_until, ChildGuard};

/// The notifications a forwarder sent, in order, read from a datagram socket.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next notification and when it arrived; panics after [`WAIT`].
    fn next(&self, process: &ChildGuard) -> (String, Instant) {
        self.socket.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => (
                String::from_utf8_lossy(&buf[..n]).into_owned(),
                Instant::now(),
            ),
            Err(e) => panic!("no notification: {e}\n{}", process.output()),
        }
    }

    /// The next notification other than a watchdog ping.
    fn next_state(&self, process: &ChildGuard) -> String {
        loop {
            let (message, _) = self.next(process);
            if message != "WATCHDOG=1" {
                return message;
            }
        }
    }
}

fn accepts_and_forwards(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&local(port), Duration::from_secs(2)) else {
        return false;
    };
    s.set_read_timeout(Some(WAIT)).unwrap();
    round_trip(&mut s, b"ping") == b"ping"
}

#[test]
fn systemd_hears_ready_reloading_stopping_and_the_watchdog() {
    let backend = Backend::echo(None);
    let (p1, p2) = (free_port(), free_port());
    let notify = NotifySocket::bind();
    let builder = Forwarder::builder()
        .rules(&format!("one,{p1},127.0.0.1,{}\n", backend.port))
        .workers(2)
        .env("NOTIFY_SOCKET", &notify.path)
        // Ping every 300 ms.
        .env("WATCHDOG_USEC", "600000");
    let spawned = Instant::now();
    let mut forwarder = builder.spawn();
    let rules = forwarder.rules.clone();
    let fwd = &mut forwarder.process;

    // The first word systemd hears is READY, and by then the port already forwards.
    let (first, _) = notify.next(fwd);
    assert!(first.starts_with("READY=1\n"), "{first}");
    assert!(is_listening(p1), "READY=1 before the port listens");
    assert!(accepts_and_forwards(p1));

    // The watchdog, at half the interval: pings keep coming, and not as a flood. Arrival
    // times jitter under load, but the 4th ping cannot arrive before 3 intervals have passed
    // since the process started.
    let mut last = spawned;
    for _ in 0..4 {
        let (message, at) = notify.next(fwd);
        assert_eq!(message, "WATCHDOG=1");
        last = at;
    }
    assert!(
        last - spawned >= Duration::from_millis(900),
        "4 pings within {:?}",
        last - spawned
    );

    // A reload: RELOADING=1 (with the monotonic time systemd wants), then READY=1 once the
    // new port listens.
    std::fs::write(
        &rules,
        format!(
            "one,{p1},127.0.0.1,{port}\ntwo,{p2},127.0.0.1,{port}\n",
            port = backend.port
        ),
    )
    .unwrap();
    fwd.signal(libc::SIGHUP);
    let reloading = notify.next_state(fwd);
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading}");
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reloading}"
    );
    let ready = notify.next_state(fwd);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        accepts_and_forwards(p2),
        "READY=1 before the new port forwards"
    );

    // SIGTERM: STOPPING=1, then exit 0 once drained.
    fwd.signal(libc::SIGTERM);
    let stopping = notify.next_state(fwd);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    let status = fwd.wait_exit(WAIT).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
}

/// A port below 1024 that nothing uses now (the test runs as root, so it may bind it).
fn free_low_port() -> u16 {
    (700..1000)
        .rev()
        .find(|&p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok() && !is_listening(p))
        .expect("a free port below 1024")
}

/// The four ids of a `Uid:` or `Gid:` line of /proc/PID/status (real, effective, saved, fs).
fn ids(pid: u32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn user_nobody_serves_low_ports_and_reloads_a_new_one() {
    if !is_root() {
        eprintln!("skipped: dropping to nobody needs root");
        return;
    }
    let nobody = forwarder::service::privilege::lookup("nobody").unwrap();
    let backend = Backend::echo(None);
    let low1 = free_low_port();
    let web = free_port();
    // Readable by nobody (a reload reads the file as nobody), but the folder is root's.
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let rules = dir.path().join("entries.csv");
    std::fs::write(&rules, format!("one,{low1},127.0.0.1,{}\n", backend.port)).unwrap();
    set_mode(&rules, 0o644);
    let forwarder = Forwarder::builder()
        .rules_at(&rules)
        .workers(2)
        .web_on(&local(web).to_string())
        .args(["--user", "nobody"])
        .spawn();
    let fwd = &forwarder.process;
    assert!(wait_until(WAIT, || is_listening(low1)), "{}", fwd.output());
    assert!(wait_until(WAIT, || workers_of(fwd.pid()).len() == 2));

    let mut pids = workers_of(fwd.pid());
    pids.push(fwd.pid());
    for &pid in &pids {
        assert_eq!(ids(pid, "Uid:"), vec![nobody.uid; 4], "pid {pid}");
        assert_eq!(ids(pid, "Gid:"), vec![nobody.gid; 4], "pid {pid}");
    }
    assert!(accepts_and_forwards(low1));

    // The log and the web page say the rules cannot be saved from the page.
    let warning = "user nobody cannot write the folder";
    assert!(fwd.wait_for_output(warning, WAIT), "{}", fwd.output());
    assert!(wait_until(WAIT, || is_listening(web)));
    let page = http::get(local(web), "/api/rules");
    assert!(page.body.contains(warning), "{}", page.body);

    // A reload that adds another port below 1024 works as nobody.
    let low2 = (700..low1)
        .rev()
        .find(|&p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok() && !is_listening(p))
        .expect("a second free port below 1024");
    std::fs::write(
        &rules,
        format!(
            "one,{low1},127.0.0.1,{port}\ntwo,{low2},127.0.0.1,{port}\n",
            port = backend.port
        ),
    )
    .unwrap();
    fwd.signal(libc::SIGHUP);
    assert!(wait_until(WAIT, || is_listening(low2)), "{}", fwd.output());
    assert!(accepts_and_forwards(low2));
    assert!(accepts_and_forwards(low1));
    assert!(
        !fwd.output().contains("Permission denied"),
        "{}",
        fwd.output()
    );

    // Once nobody owns the folder, the page has nothing to warn about.
    std::os::unix::fs::chown(dir.path(), Some(nobody.uid), Some(nobody.gid)).unwrap();
    let page = http::get(local(web), "/api/rules");
    assert!(
        page.status == 200 && !page.body.contains(warning),
        "{} {}",
        page.head,
        page.body
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs the forwarder to completion with `args`; its exit code and stderr.
fn run(args: &[&str], rules: Option<&str>) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command();
    if let Some(text) = rules {
        let path = dir.path().join("entries.csv");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--rules").arg(path);
    }
    let out = cmd.args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exit_codes_tell_config_errors_from_ports_in_use() {
    let (code, err) = run(&["--check"], Some("ok,8080,127.0.0.1,80\n"));
    assert_eq!(code, Some(0), "{err}");

    let (code, err) = run(&["--check"], Some("bad,99999,127.0.0.1,80\n"));
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("1 error(s); nothing started"), "{err}");

    let (code, err) = run(&["--no-such-flag"], None);
    assert_eq!(code, Some(2), "{err}");

    let (code, err) = run(
        &["--no-web", "--user", "no-such-user-here"],
        Some("# no rules\n"),
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("--user no-such-user-here: no such user"),
        "{err}"
    );

    let taken = std::net::TcpListener::bind(("0.0.0.0", free_port())).unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, err) = run(&["--check"], Some(&format!("x,{port},127.0.0.1,80\n")));
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("1 port(s) cannot be listened on"), "{err}");

    let web = std::net::TcpListener::bind(local(0)).unwrap();
    let web_addr = web.local_addr().unwrap().to_string();
    let (code, err) = run(&["--web", &web_addr], Some("# no rules\n"));
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains(&format!("cannot serve the web page on {web_addr}")),
        "{err}"
    );

    if is_root() {
        let (code, err) = run(&["--no-web", "--refuse-root"], Some("# no rules\n"));
        assert_eq!(code, Some(3), "{err}");
        assert!(err.contains("refusing to run as root"), "{err}");
    }
}

#[test]
fn sigusr1_logs_status_and_hup_to_the_group_spares_the_workers() {
    let backend = Backend::echo(None);
    let p1 = free_port();
    let fwd = Forwarder::builder()
        .forward("web1", p1, backend.port)
        .workers(2)
        .start();
    assert!(wait_until(WAIT, || fwd.worker_pids().len() == 2));
    let workers = fwd.worker_pids();
    let mut held = TcpStream::connect(local(p1)).unwrap();
    held.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(round_trip(&mut held, b"hi"), b"hi");

    // As `systemctl kill -s USR1` does: the whole group gets it.
    let group = -(fwd.process.pid() as i32);
    // SAFETY: kill(2) on the process group the test's ChildGuard created.
    unsafe { libc::kill(group, libc::SIGUSR1) };
    let line = format!(
        "status: 0.0.0.0:{p1} accepted 1: web1 127.0.0.1:{} up (1 active)",
        backend.port
    );
    assert!(
        fwd.process.wait_for_output(&line, WAIT),
        "{}",
        fwd.process.output()
    );
    assert!(fwd
        .process
        .output()
        .contains("status: 2 workers, 1 active connections"));

    // SAFETY: as above.
    unsafe { libc::kill(group, libc::SIGHUP) };
    assert!(fwd.process.wait_for_output("SIGHUP: reloading", WAIT));
    assert_eq!(fwd.worker_pids(), workers, "workers survive USR1 and HUP");
    assert_eq!(round_trip(&mut held, b"still"), b"still");
}

#[test]
fn the_unit_file_gives_each_worker_room_for_20000_connections() {
    let unit = include_str!("../../packaging/forwarder.service");
    let limit: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("LimitNOFILE= in the unit")
        .parse()
        .unwrap();
    let plan = forwarder::capacity::plan(20_000, 0, limit, 256, 2);
    assert!(plan.per_worker >= 20_000, "{plan:?}");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "ReadWritePaths=/etc/forwarder",
        "User=forwarder",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
}
