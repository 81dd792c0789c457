//! The figures a run is judged by, against servers whose speed the test sets: msg/s over the send
//! window (the drain apart), corrected figures everywhere under `--rate` with the failed tail
//! counted, the hiccup meter when the client is starved, and `--slo` exit statuses.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use testbed_dev::testing::ChildGuard;

/// Columns of the Connections sheet: the corrected ones follow the named ones (TLS and churn last).
const CORRECTED_AVG: usize = ssl_echo_client::report::CONNECTION_COLUMNS.len() + 1;
const CORRECTED_MAX: usize = CORRECTED_AVG + 1;
const SENDS_FAILED: usize = CORRECTED_AVG + 2;

const LIMIT: Duration = Duration::from_secs(120);

/// What the test server does with the `n`th message (0-based) of its `c`th connection.
#[derive(Clone, Copy)]
enum Act {
    /// Echo after this long.
    EchoAfter(Duration),
    /// Close the connection without echoing.
    Close,
}

/// A plaintext echo server on a free loopback port whose every answer the test decides: one
/// thread per connection (the tests use a few dozen), each message read and answered whole
/// (the client sends one at a time and waits).
struct PacedServer {
    port: u16,
    /// Messages answered.
    answered: Arc<AtomicU64>,
    /// When each message arrived, in arrival order.
    arrivals: Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl PacedServer {
    fn start(act: impl Fn(usize, u64) -> Act + Send + Sync + 'static, message_len: usize) -> Self {
        PacedServer::start_idle(act, message_len, None)
    }

    /// The same, closing a connection that sends nothing for `idle` (a gateway's idle timeout).
    fn start_idle(
        act: impl Fn(usize, u64) -> Act + Send + Sync + 'static,
        message_len: usize,
        idle: Option<Duration>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let answered = Arc::new(AtomicU64::new(0));
        let act = Arc::new(act);
        let count = Arc::clone(&answered);
        let accepted = Arc::new(AtomicUsize::new(0));
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&arrivals);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let c = accepted.fetch_add(1, Ordering::SeqCst);
                let (act, count, log) = (Arc::clone(&act), Arc::clone(&count), Arc::clone(&log));
                let _ = stream.set_read_timeout(idle);
                std::thread::spawn(move || serve(stream, c, &*act, &count, &log, message_len));
            }
        });
        PacedServer {
            port,
            answered,
            arrivals,
        }
    }
}

fn serve(
    mut s: TcpStream,
    c: usize,
    act: &dyn Fn(usize, u64) -> Act,
    answered: &AtomicU64,
    arrivals: &std::sync::Mutex<Vec<Instant>>,
    len: usize,
) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; len];
    for n in 0.. {
        if s.read_exact(&mut buf).is_err() {
            return;
        }
        arrivals.lock().unwrap().push(Instant::now());
        match act(c, n) {
            Act::EchoAfter(d) => {
                std::thread::sleep(d);
                if s.write_all(&buf).is_err() {
                    return;
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Act::Close => return,
        }
    }
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

#[test]
fn duration_msg_per_sec_is_the_messages_over_the_send_window_whatever_the_drain() {
    // Nine connections answered after 50 ms (20 msg/s each), one after 1.5 s: the slow one's
    // last echo comes well after the 4 s of sending, which the old figure divided by.
    let message = "ping-0123";
    let server = PacedServer::start(
        |c, _| Act::EchoAfter(Duration::from_millis(if c == 0 { 1500 } else { 50 })),
        message.len(),
    );
    let setup = Setup::plain_to(server.port, "window.xlsx");
    let lines = setup.work.path().join("seconds.jsonl");
    let run = setup.run(
        &[
            "--connections",
            "10",
            "--duration",
            "4",
            "--message",
            message,
            "--json-lines",
            lines.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    let messages = j["messages"].as_u64().unwrap();
    assert_eq!(messages, server.answered.load(Ordering::Relaxed));
    // The server's own count: messages that reached it in the 4 s from the first one (the
    // go), over 4 s. About 9 × 20/s + 1/1.5 s, less the turn-around on a busy machine.
    let known = {
        let a = server.arrivals.lock().unwrap();
        let first = a[0];
        a.iter()
            .filter(|&&t| t < first + Duration::from_secs(4))
            .count() as f64
            / 4.0
    };
    assert!(known > 150.0, "{known}");
    let reported = f(&j["messages_per_sec"]);
    assert!(
        (reported - known).abs() <= known * 0.02,
        "reported {reported:.1} msg/s, the server's rate is {known:.1}\n{}",
        run.stderr
    );
    assert!(
        (f(&j["send_window_s"]) - 4.0).abs() < 0.05,
        "{}",
        j["send_window_s"]
    );
    // The slow connection's last echo came up to 1.5 s after the end of sending.
    assert!(f(&j["drain_s"]) > 0.5, "{}", j["drain_s"]);
    assert!(j["messages_drained"].as_u64().unwrap() >= 1);
    assert!(f(&j["duration_s"]) > 4.5);
    // What the old figure (messages over the whole of phase 2) said: far off.
    let old = messages as f64 / f(&j["duration_s"]);
    assert!(old < known * 0.9, "old figure {old:.1} vs {known:.1}");
    // The table says the same.
    assert!(
        run.stderr.contains(&format!(
            "{messages} in the {:.2} s send window = {:.0} msg/s",
            f(&j["send_window_s"]),
            reported
        )),
        "{}",
        run.stderr
    );
    // The per-second records add up to the same messages (the drain's seconds included).
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&lines)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.len() >= 5, "{records:?}");
    let sum: u64 = records
        .iter()
        .map(|r| r["messages"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, messages);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["second"], i as u64 + 1);
        assert!(r["cpu_pct"].as_array().unwrap().len() == 1);
    }
    // Fairness: the slow connection stands out; Little's law is stated for the closed loop.
    let fair = &j["fairness"];
    assert_eq!(fair["connections"], 10);
    assert!(fair["min"].as_u64().unwrap() <= 3, "{fair}");
    assert!(fair["median"].as_u64().unwrap() >= 75, "{fair}");
    assert!(f(&fair["jain"]) < 0.95, "{fair}");
    assert!(j["littles_law"]["predicted_avg_ms"].as_f64().is_some());
    assert!(run.stderr.contains("Little's law"), "{}", run.stderr);
    // The CSV next to the report has one row per connection.
    let csv = std::fs::read_to_string(setup.report.with_extension("csv")).unwrap();
    assert_eq!(csv.lines().count(), 11);
    assert!(csv.starts_with("id,process,local port,"), "{csv}");
}

#[test]
fn a_stalled_server_under_rate_raises_every_corrected_figure_and_counts_the_cut_tail() {
    // Every connection is answered at once, except that the whole server stalls for 1 s once it
    // has answered 200 messages, and connection 0 is closed at its 10th message.
    let message = "stall-test";
    let started = Instant::now();
    let stall_at = Arc::new(std::sync::OnceLock::<Instant>::new());
    let answered = Arc::new(AtomicU64::new(0));
    let (stall, count) = (Arc::clone(&stall_at), Arc::clone(&answered));
    let server = PacedServer::start(
        move |c, n| {
            if c == 0 && n == 10 {
                return Act::Close;
            }
            let k = count.fetch_add(1, Ordering::SeqCst);
            if k == 200 {
                let _ = stall.set(Instant::now());
            }
            match stall.get() {
                Some(&at) if at.elapsed() < Duration::from_secs(1) => {
                    Act::EchoAfter(Duration::from_secs(1) - at.elapsed())
                }
                _ => Act::EchoAfter(Duration::ZERO),
            }
        },
        message.len(),
    );
    let setup = Setup::plain_to(server.port, "stall.xlsx");
    let hlog = setup.work.path().join("run.hlog");
    let run = setup.run(
        &[
            "--connections",
            "10",
            "--duration",
            "3",
            "--rate",
            "20",
            "--message",
            message,
            "--max-errors",
            "1",
            "--hdr-log",
            hlog.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    assert!(stall_at.get().is_some(), "the server never stalled");
    let _ = started;
    let j = run.json();
    let (m, c) = (&j["response_ms"], &j["corrected_response_ms"]);
    // Every statistic from the intended send is at least the measured one, and the stall shows
    // in the corrected percentiles (a third of each connection's schedule was late).
    for k in ["avg", "p50", "p90", "p99", "max"] {
        assert!(f(&c[k]) >= f(&m[k]), "{k}: corrected {c} measured {m}");
    }
    assert!(f(&c["p90"]) > 300.0, "{c}");
    assert!(
        f(&m["p90"]) < f(&c["p90"]) / 2.0,
        "measured {m} corrected {c}"
    );
    // The cut tail: connection 0's remaining schedule is counted, not dropped.
    let sends_failed = j["sends_failed"].as_u64().unwrap();
    assert!(sends_failed >= 40, "{sends_failed}");
    assert_eq!(j["connections_lost"], 1);
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(text(&rows, 0, SENDS_FAILED), "sends failed");
    let mut late_rows = 0;
    for row in 1..=10 {
        let (messages, failed) = (num(&rows, row, 5), num(&rows, row, SENDS_FAILED));
        // 3 s at 20/s: 60 sends due (59 when the offset puts the 60th past the end).
        assert!(
            (59.0..=60.0).contains(&(messages + failed)),
            "row {row}: {messages} answered + {failed} failed"
        );
        // Per connection: the corrected average is above the measured one.
        assert!(
            num(&rows, row, CORRECTED_AVG) >= num(&rows, row, 9),
            "row {row}"
        );
        late_rows += usize::from(num(&rows, row, CORRECTED_MAX) > 500.0);
    }
    let cut: Vec<usize> = (1..=10).filter(|&r| num(&rows, r, 11) == 1.0).collect();
    assert_eq!(cut.len(), 1, "one connection was closed");
    assert_eq!(num(&rows, cut[0], SENDS_FAILED), sends_failed as f64);
    assert_eq!(num(&rows, cut[0], 5), 10.0, "answered before the close");
    assert!(
        late_rows >= 9,
        "the stall shows in every connection's corrected max"
    );
    // The distribution chart is drawn from the corrected figures: its last band is past 500 ms.
    let summary = sheet(&setup.report, "Summary");
    let mut last_band = String::new();
    for row in 3..summary.height() {
        if let Some(calamine::Data::String(label)) = summary.get((row, 4)) {
            if label.starts_with('≤') {
                last_band = label.clone();
            }
        }
    }
    let upper: f64 = last_band.trim_start_matches('≤').parse().unwrap();
    assert!(upper >= 500.0, "last band {last_band}");
    // The timeline has the corrected columns; some second's corrected average is far above its
    // measured one.
    let timeline = sheet(&setup.report, "Timeline");
    assert_eq!(text(&timeline, 0, 5), "corrected avg ms");
    let worst = (1..timeline.height())
        .filter(|&r| matches!(timeline.get((r, 5)), Some(calamine::Data::Float(_))))
        .map(|r| num(&timeline, r, 5) - num(&timeline, r, 3))
        .fold(0.0, f64::max);
    assert!(worst > 200.0, "{worst}");
    // The HdrHistogram log: untagged (corrected) and uncorrected intervals, every answered
    // message and failed send in the corrected ones.
    let log = std::fs::read(&hlog).unwrap();
    let (mut corrected, mut uncorrected) = (0u64, 0u64);
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;
    for e in IntervalLogIterator::new(&log) {
        if let LogEntry::Interval(i) = e.unwrap() {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(i.encoded_histogram())
                .unwrap();
            let h: hdrhistogram::Histogram<u64> = Deserializer::new()
                .deserialize(&mut bytes.as_slice())
                .unwrap();
            match i.tag().map(|t| t.as_str().to_string()) {
                None => corrected += h.len(),
                Some(t) if t == "uncorrected" => uncorrected += h.len(),
                Some(t) => panic!("tag {t}"),
            }
        }
    }
    let messages = j["messages"].as_u64().unwrap();
    assert_eq!(uncorrected, messages);
    assert_eq!(corrected, messages + sends_failed);
    // Offered vs achieved.
    assert!((f(&j["offered_messages_per_sec"]) - 200.0).abs() < 1e-9);
    assert!(run.stderr.contains("offered vs achieved"), "{}", run.stderr);
}

/// CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[test]
fn the_hiccup_meter_rises_when_the_client_is_starved() {
    let setup = Setup::plain("hiccup.xlsx");
    let cpu = *allowed_cpus().last().expect("a CPU");
    let cpu = cpu.to_string();
    let run_pinned = |name: &str| {
        let report = setup.work.path().join(name);
        let port = setup.port.to_string();
        let args = [
            "-c",
            &cpu,
            CLIENT,
            "--processes",
            "1",
            "--plain",
            "--port",
            &port,
            "--json",
            "--report",
            report.to_str().unwrap(),
            "--connections",
            "20",
            "--duration",
            "3",
            "--rate",
            "50",
        ];
        let mut cmd = std::process::Command::new("taskset");
        cmd.args(args);
        ClientProcess::spawn(cmd).finish(LIMIT)
    };
    let calm = run_pinned("calm.xlsx");
    assert!(calm.status.success(), "{}", calm.stderr);
    // A spinner on the same CPU at a higher priority (bounded: `timeout` ends it after 60 s,
    // the guard kills it at once when the test ends).
    let mut spin = std::process::Command::new("taskset");
    spin.args([
        "-c",
        &cpu,
        "nice",
        "-n",
        "-15",
        "timeout",
        "60",
        "sh",
        "-c",
        "while :; do :; done",
    ]);
    let spinner = ChildGuard::spawn(spin);
    let starved = run_pinned("starved.xlsx");
    drop(spinner);
    assert!(starved.status.success(), "{}", starved.stderr);
    let (c, s) = (calm.json(), starved.json());
    let (calm_p99, starved_p99) = (f(&c["hiccup_ms"]["p99"]), f(&s["hiccup_ms"]["p99"]));
    assert!(
        starved_p99 > 3.0 * calm_p99 && starved_p99 > calm_p99 + 2.0,
        "hiccup p99: calm {calm_p99} ms, starved {starved_p99} ms"
    );
    assert!(f(&s["hiccup_ms"]["max"]) > f(&c["hiccup_ms"]["max"]));
    // The CPU meter says how much the client got.
    let cpu_of = |j: &serde_json::Value| f(&j["client_cpu"][0]["avg_pct"]);
    assert!(cpu_of(&c) > 0.0, "{}", c["client_cpu"]);
    assert!(starved.stderr.contains("hiccup p50"), "{}", starved.stderr);
}

#[test]
fn objectives_pass_with_exit_0_and_fail_with_exit_4() {
    let setup = Setup::tls("slo.xlsx");
    let base = ["--connections", "5", "--count", "20"];
    let with = |slos: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        for s in slos {
            args.extend(["--slo", s]);
        }
        setup.run(&args, LIMIT)
    };
    let ok = with(&["p99<10s", "errors<0.1%", "handshake.p99<60s"]);
    assert_eq!(ok.status.code(), Some(0), "{}", ok.stderr);
    let j = ok.json();
    let verdicts = j["slo"].as_array().unwrap();
    assert_eq!(verdicts.len(), 3);
    assert!(verdicts.iter().all(|v| v["passed"] == true), "{verdicts:?}");
    assert_eq!(verdicts[1]["measured"], 0.0);
    assert!(
        f(&verdicts[2]["measured"]) > 0.0,
        "a handshake takes some time"
    );
    assert!(
        ok.stderr.contains("pass  p99<10s (measured "),
        "{}",
        ok.stderr
    );

    let bad = with(&["p99<10s", "p50<1us"]);
    assert_eq!(bad.status.code(), Some(4), "{}", bad.stderr);
    assert!(
        bad.stderr
            .contains("ssl-echo-client: objective not met: p50<1us"),
        "{}",
        bad.stderr
    );
    let j = bad.json();
    assert_eq!(j["slo"][1]["passed"], false);
    assert_eq!(summary_text(&setup.report, "p50<1us"), "FAIL");
    assert_eq!(summary_text(&setup.report, "p99<10s"), "pass");

    // Too many errors win over a missed objective: 3.
    let dead = Setup::plain_to(testbed_dev::testing::free_port(), "dead-slo.xlsx");
    let run = dead.run(
        &["--connections", "3", "--count", "1", "--slo", "errors<1%"],
        LIMIT,
    );
    assert_eq!(
        run.status.code(),
        Some(EXIT_TOO_MANY_ERRORS),
        "{}",
        run.stderr
    );
    assert_eq!(run.json()["slo"][0]["passed"], false);
}

/// The Summary sheet's text in column B next to `label`.
fn summary_text(path: &std::path::Path, label: &str) -> String {
    let s = sheet(path, "Summary");
    (0..s.height())
        .find(|&r| text(&s, r, 0) == label)
        .map(|r| text(&s, r, 1))
        .unwrap_or_else(|| panic!("no {label:?} row"))
}

#[test]
fn keepalives_at_the_barrier_hold_connections_a_gateway_would_cut_for_idling() {
    // 6 connections opened at 3/s: the first waits about 2 s at the barrier; the server cuts a
    // connection silent for 1 s.
    let message = "keep";
    let run_with = |keepalive: &str| {
        let server = PacedServer::start_idle(
            |_, _| Act::EchoAfter(Duration::ZERO),
            message.len(),
            Some(Duration::from_secs(1)),
        );
        let setup = Setup::plain_to(server.port, "keepalive.xlsx");
        let run = setup.run(
            &[
                "--connections",
                "6",
                "--connect-rate",
                "3",
                "--count",
                "5",
                "--message",
                message,
                "--keepalive-s",
                keepalive,
                "--max-errors",
                "6",
            ],
            LIMIT,
        );
        assert!(run.status.success(), "{}", run.stderr);
        (run.json(), server.answered.load(Ordering::Relaxed))
    };
    let (without, _) = run_with("0");
    assert!(
        without["connections_lost"].as_u64().unwrap() >= 1,
        "the first connections idle past the server's limit: {without}"
    );
    assert_eq!(without["keepalives"], 0);
    let (with, answered) = run_with("0.3");
    assert_eq!(with["connections_lost"], 0, "{with}");
    assert_eq!(with["messages"], 30, "keep-alives are not in the figures");
    assert_eq!(with["bytes_sent"], 30 * 4);
    let keepalives = with["keepalives"].as_u64().unwrap();
    assert!(keepalives >= 3, "{keepalives}");
    assert_eq!(answered, 30 + keepalives, "the server echoed both");
}

#[test]
fn per_agent_figures_under_rate_are_the_corrected_ones_with_the_measured_beside() {
    // The whole server stalls for 1 s once it has answered 100 messages.
    let message = "agent-stall";
    let stall_at = Arc::new(std::sync::OnceLock::<Instant>::new());
    let count = Arc::new(AtomicU64::new(0));
    let (stall, n) = (Arc::clone(&stall_at), Arc::clone(&count));
    let server = PacedServer::start(
        move |_, _| {
            if n.fetch_add(1, Ordering::SeqCst) == 100 {
                let _ = stall.set(Instant::now());
            }
            match stall.get() {
                Some(&at) if at.elapsed() < Duration::from_secs(1) => {
                    Act::EchoAfter(Duration::from_secs(1) - at.elapsed())
                }
                _ => Act::EchoAfter(Duration::ZERO),
            }
        },
        message.len(),
    );
    let setup = Setup::plain_to(server.port, "agent-rate.xlsx");
    let agent = Agent::start(&[]);
    let run = setup.run(
        &[
            "--agents",
            &agent.addr,
            "--connections",
            "8",
            "--duration",
            "3",
            "--rate",
            "20",
            "--message",
            message,
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    let a = &j["agents"][0];
    let (c, m) = (&a["corrected_response_ms"], &a["response_ms"]);
    assert!(
        f(&c["p90"]) > 300.0 && f(&c["p90"]) > 2.0 * f(&m["p90"]),
        "{a}"
    );
    // The agent's corrected figures are the run's (one agent).
    assert_eq!(c, &j["corrected_response_ms"]);
    assert!(f(&a["fairness"]["jain"]) > 0.9, "{a}");
    // The Agents sheet: the percentile columns are the corrected ones, the measured p99 beside.
    let rows = sheet(&setup.report, "Agents");
    assert_eq!(text(&rows, 0, 9), "p90 ms");
    assert!((num(&rows, 1, 9) - f(&c["p90"])).abs() < 1e-6);
    assert_eq!(text(&rows, 0, 14), "uncorrected p99 ms");
    assert!((num(&rows, 1, 14) - f(&m["p99"])).abs() < 1e-6);
    assert_eq!(text(&rows, 0, 18), "Jain's index");
}
