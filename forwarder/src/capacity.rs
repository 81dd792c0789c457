//! How many connections fit: every forwarded connection holds two sockets, and each worker
//! process has the same open-file limit, so the worker count follows from the descriptor budget.
//! A UDP session holds one socket (the listening socket is shared by all its sessions), so the
//! same budget holds twice as many UDP sessions as TCP connections.

use serde::Serialize;

/// Descriptors a worker keeps for things other than connections: listeners, its control
/// socket, epoll, signal pipe, log output, and slack.
pub const WORKER_RESERVE_FDS: usize = 200;

/// Listening sockets the reserve above has room for: only the ones beyond these take
/// descriptors from connections (a range served port by port, thousands of rules).
pub const LISTENERS_IN_RESERVE: usize = 100;

/// Connections a worker keeps room for however many ports the rules listen on: listening
/// sockets may take the rest of its descriptors, never these.
pub const MIN_CONNECTIONS_PER_WORKER: usize = 1000;

/// Listening sockets one worker may hold (a port listened on port by port costs one each): its
/// open-file limit less the reserve, the pipes, and room for [`MIN_CONNECTIONS_PER_WORKER`] —
/// or, under a small limit, for half of what is left, so a handful of ports still starts
/// (a 520-descriptor limit forwarded one port before ranges existed, and still does).
pub fn listen_budget(nofile: u64, pipe_fds: usize) -> usize {
    let available = (nofile as usize).saturating_sub(WORKER_RESERVE_FDS + pipe_fds);
    available - (2 * MIN_CONNECTIONS_PER_WORKER).min(available / 2)
}

/// The plan printed at start and shown on the web page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CapacityPlan {
    pub workers: usize,
    /// Connections one worker takes before it stops accepting.
    pub per_worker: usize,
    pub total: usize,
}

/// Plans workers for `wanted` connections. `workers` = 0 picks the number: at least one per
/// core, more when the descriptor budget of one process cannot hold its share.
pub fn plan(
    wanted: usize,
    workers: usize,
    nofile: u64,
    pipe_fds: usize,
    cores: usize,
) -> CapacityPlan {
    let budget = (nofile as usize).saturating_sub(WORKER_RESERVE_FDS + pipe_fds);
    let per_worker = (budget / 2).max(1);
    let workers = if workers == 0 {
        cores.max(1).max(wanted.div_ceil(per_worker))
    } else {
        workers
    };
    CapacityPlan {
        workers,
        per_worker,
        total: per_worker * workers,
    }
}

/// UDP sessions per worker and in all: `wanted` in all (0 = as many as the descriptor budget
/// holds), spread over the plan's workers.
pub fn udp_sessions(plan: &CapacityPlan, wanted: usize) -> (usize, usize) {
    let per_worker = if wanted == 0 {
        plan.per_worker * 2
    } else {
        wanted.div_ceil(plan.workers.max(1))
    };
    (per_worker, per_worker * plan.workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_session_costs_one_descriptor() {
        let p = plan(20_000, 0, 20_000, 256, 2);
        assert_eq!(udp_sessions(&p, 0), (19_544, 58_632));
        assert_eq!(udp_sessions(&p, 100), (34, 102));
    }

    #[test]
    fn twenty_thousand_connections_need_three_workers_at_twenty_thousand_fds() {
        let p = plan(20_000, 0, 20_000, 256, 2);
        assert_eq!(p.per_worker, 9_772);
        assert_eq!(p.workers, 3);
        assert_eq!(p.total, 29_316);
    }

    #[test]
    fn listening_sockets_leave_room_for_connections() {
        assert_eq!(listen_budget(20_000, 256), 17_544);
        assert_eq!(listen_budget(1_024, 256), 284);
        assert_eq!(listen_budget(100, 256), 0);
    }

    #[test]
    fn explicit_worker_count_is_kept() {
        assert_eq!(plan(20_000, 1, 20_000, 256, 2).workers, 1);
        assert_eq!(plan(100, 0, 20_000, 256, 4).workers, 4);
    }
}
