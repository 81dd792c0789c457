//! A worker killed with connections open: its connections stop counting as active on the API,
//! `/metrics` and the page's data, are counted as lost instead, and the log says how many it
//! held — again after the restarted worker is killed too.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{children_of, http_get, local, metric, round_trip, Backend, Forwarder, WAIT};
use serde_json::Value;
use testbed_dev::testing::{free_port, wait_for_listen, wait_until};

/// Connections opened in each round.
const CONNECTIONS: usize = 120;

fn stats(web: SocketAddr) -> Value {
    serde_json::from_str(&http_get(web, "/api/stats")).unwrap()
}

/// The pid of worker `index` (its command line names its index).
fn worker_pid(supervisor: u32, index: usize) -> Option<u32> {
    children_of(supervisor).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"--worker-index" && w[1] == index.to_string().as_bytes())
        })
    })
}

/// Opens `n` connections through `port`, each proven relaying by one round trip.
fn open(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(local(port)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let msg = format!("hello {i}");
            assert_eq!(round_trip(&mut s, msg.as_bytes()), msg.as_bytes());
            s
        })
        .collect()
}

/// Whether a connection still forwards: one more round trip.
fn still_forwards(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

#[test]
fn a_killed_workers_connections_are_lost_not_active() {
    let backend = Backend::echo(None);
    let port = free_port();
    let forwarder = Forwarder::builder()
        .rules(&format!("a,{port},127.0.0.1,{}\n", backend.port))
        .workers(2)
        .web("127.0.0.1")
        .start();
    let (fwd, web) = (&forwarder.process, forwarder.web());
    assert!(wait_for_listen(local(port), WAIT), "{}", fwd.output());

    let mut lost_so_far = 0;
    for round in 1..=2 {
        let mut conns = open(port, CONNECTIONS);
        assert!(
            wait_until(WAIT, || stats(web)["active"] == CONNECTIONS as u64),
            "round {round}: {}",
            stats(web)
        );
        // The page's list is shared for up to a second: wait for one that shows these clients.
        let ours: Vec<String> = conns
            .iter()
            .map(|s| s.local_addr().unwrap().to_string())
            .collect();
        let mut listed = Vec::new();
        let fresh = wait_until(WAIT, || {
            let all: Value = serde_json::from_str(&http_get(web, "/api/connections")).unwrap();
            listed = all.as_array().unwrap().clone();
            ours.iter()
                .all(|c| listed.iter().any(|l| l["client"] == c.as_str()))
        });
        assert!(
            fresh,
            "round {round}: the connection list never showed our clients"
        );
        let held = listed.iter().filter(|c| c["worker"] == 0).count();
        assert!(
            held > 0 && held < CONNECTIONS,
            "round {round}: the kernel spread the connections over both workers ({held} on worker 0)"
        );
        let victim = worker_pid(fwd.pid(), 0).expect("worker 0 runs");
        // SAFETY: kill(2) on the worker we just found.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let survivors = conns
            .iter_mut()
            .map(still_forwards)
            .filter(|&ok| ok)
            .count();
        assert_eq!(
            CONNECTIONS - survivors,
            held,
            "round {round}: exactly the killed worker's connections broke"
        );
        lost_so_far += held as u64;
        drop(conns);
        let settled = wait_until(Duration::from_secs(5), || {
            let s = stats(web);
            s["active"] == 0 && s["lost_worker_died"] == lost_so_far
        });
        assert!(settled, "round {round}: {}", stats(web));
        let backend_stats = &stats(web)["pools"][0]["backends"][0];
        assert_eq!(backend_stats["active"], 0);
        assert_eq!(backend_stats["lost_worker_died"], lost_so_far);
        let metrics = http_get(web, "/metrics");
        assert_eq!(metric(&metrics, "forwarder_active_connections "), Some(0));
        assert_eq!(
            metric(
                &metrics,
                "forwarder_connections_lost_total{reason=\"worker_died\"} "
            ),
            Some(lost_so_far)
        );
        assert!(
            fwd.output().contains("worker 0 killed by signal 9 after")
                && fwd
                    .output()
                    .contains(&format!("holding {held} connections; restarting")),
            "{}",
            fwd.output()
        );
        assert!(
            wait_until(WAIT, || worker_pid(fwd.pid(), 0)
                .is_some_and(|p| p != victim)),
            "worker 0 restarted"
        );
    }
}
