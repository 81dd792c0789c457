//! Garbage at the TLS echo server: random bytes, TLS records cut short or oversized, broken
//! ClientHellos and HTTP, on hundreds of connections ended by FIN, reset or half-close, plus
//! connections that say a few bytes and then hang. Meanwhile a well-behaved TLS client keeps
//! echoing: every one of its exchanges must be exact, the server must stay up, and its memory
//! must come back near where it was.

mod common;

use std::time::Duration;

use testbed_dev::garbage;
use testbed_dev::testing::wait_until;

/// Garbage connections per run (each up to 64 KiB, about 3 s at most).
const GARBAGE: usize = 400;
/// Memory the workers may keep after the garbage has gone: allocator slack, not per-connection
/// buffers (400 connections × 64 KiB would be 25 MiB).
const RSS_SLACK_KIB: u64 = 16 * 1024;

#[test]
fn garbage_does_not_stop_a_good_client_and_memory_stays_bounded() {
    let server = common::start(&["--workers", "2"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut n = 0u64;
    let mut good = || -> Result<(), String> {
        n += 1;
        let data = common::payload(5_000 + (n as usize % 7) * 1_000, n);
        rt.block_on(async {
            let tls = tokio::time::timeout(Duration::from_secs(10), server.connect_tls())
                .await
                .map_err(|_| "TLS connect timed out".to_string())?;
            let back = tokio::time::timeout(Duration::from_secs(10), common::echo_all(tls, &data))
                .await
                .map_err(|_| "echo timed out".to_string())?
                .map_err(|e| format!("echo: {e}"))?;
            if back != data {
                return Err(format!(
                    "echo of {} bytes came back as {} different bytes",
                    data.len(),
                    back.len()
                ));
            }
            Ok(())
        })
    };
    // Warm: the workers' buffers and TLS state exist before the baseline.
    for _ in 0..20 {
        good().unwrap();
    }
    let before = server.workers_rss_kib();
    let workers = server.worker_pids();
    assert_eq!(workers.len(), 2);
    let idle = garbage::hold_idle(server.addr, 50, 1);
    let run = garbage::spray_alongside(server.addr, GARBAGE, 4, 42, 20, &mut good);
    drop(idle);
    assert!(
        run.good_failures.is_empty(),
        "the good client failed {} times during the garbage: {:?}",
        run.good_failures.len(),
        &run.good_failures[..run.good_failures.len().min(5)]
    );
    assert_eq!(run.garbage.connections, GARBAGE);
    assert_eq!(
        run.garbage.refused, 0,
        "garbage connections refused: the server stopped accepting"
    );
    // No worker died of it (the supervisor would have restarted it under a new pid).
    assert_eq!(
        server.worker_pids(),
        workers,
        "workers changed:\n{}",
        server.guard.output()
    );
    // Memory back to where it was once the garbage connections are gone (they close within
    // the handshake deadline at the latest; most at once).
    let mut after = 0;
    let settled = wait_until(Duration::from_secs(40), || {
        after = server.workers_rss_kib();
        after <= before + RSS_SLACK_KIB
    });
    eprintln!(
        "garbage: {} connections, {} bytes; the good client made {} exact exchanges alongside; \
         workers' RSS {before} -> {after} KiB",
        run.garbage.connections, run.garbage.bytes_sent, run.good_ok
    );
    assert!(
        settled,
        "workers' RSS {before} KiB before the garbage, {after} KiB after it ended"
    );
    good().unwrap();
    assert!(
        !server.guard.output().contains("panicked"),
        "{}",
        server.guard.output()
    );
}
