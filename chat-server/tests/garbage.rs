//! Garbage at the chat server: random bytes, random lines (long, NULs, invalid UTF-8, some of
//! them valid nicknames that then chat nonsense), TLS and HTTP on the wrong port, ended by FIN,
//! reset or half-close, plus connections that hang after a few bytes. Meanwhile well-behaved
//! users keep joining and chatting: each must see its own message come back, the server must
//! stay up, and its memory must come back near where it was.

mod common;

use std::time::Duration;

use common::{msg, Client};
use testbed_dev::garbage;
use testbed_dev::testing::wait_until;

const GARBAGE: usize = 400;
/// Memory the server may keep after the garbage has gone: allocator slack, not buffers.
const RSS_SLACK_KIB: u64 = 16 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn garbage_does_not_stop_good_users_and_memory_stays_bounded() {
    // No history replay: a newcomer's join is then the same few lines whatever the garbage said.
    let server = common::start(&["--history", "0"]);
    let addr = server.addr;
    let mut n = 0u32;
    let mut good = || -> Result<(), String> {
        n += 1;
        let nick = format!("good{n}");
        let text = format!("message {n} from a well-behaved user");
        let mut c = Client::join(addr, &nick);
        c.send(&text);
        // Garbage users may chat too; ours must come back exactly.
        c.until_match(|l| msg(l) == Some((nick.clone(), text.clone())), &text);
        c.send("/quit");
        Ok(())
    };
    for _ in 0..10 {
        good().unwrap();
    }
    let pid = server.guard.pid();
    let before = rss_kib(pid);
    let idle = garbage::hold_idle(addr, 50, 3);
    let run = garbage::spray_alongside(addr, GARBAGE, 4, 7, 20, &mut good);
    drop(idle);
    assert!(run.good_failures.is_empty(), "{:?}", run.good_failures);
    assert_eq!(run.garbage.connections, GARBAGE);
    assert_eq!(
        run.garbage.refused, 0,
        "garbage connections refused: the server stopped accepting"
    );
    let mut after = 0;
    let settled = wait_until(Duration::from_secs(20), || {
        after = rss_kib(pid);
        after <= before + RSS_SLACK_KIB
    });
    eprintln!(
        "garbage: {} connections, {} bytes; {} good users chatted alongside; RSS {before} -> {after} KiB",
        run.garbage.connections, run.garbage.bytes_sent, run.good_ok
    );
    assert!(
        settled,
        "RSS {before} KiB before the garbage, {after} KiB after it ended"
    );
    good().unwrap();
    let out = server.guard.output();
    assert!(!out.contains("panicked"), "{out}");
}
