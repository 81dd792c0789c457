//! The per-process open-file limit. Our programs hold thousands of sockets, so each raises its soft
//! limit to the hard limit at start and plans its capacity from what it got.

use std::io;

/// The open-file limit before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the most an unprivileged raise can do; on our
/// machines the hard limit itself cannot be raised, not even by root).
pub fn raise_nofile() -> io::Result<NofileLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(NofileLimit {
        soft_before,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// How many processes are needed for `connections`, when each connection costs
/// `fds_per_connection` descriptors and each process keeps `reserve` for everything else.
pub fn processes_needed(connections: u64, fds_per_connection: u64, reserve: u64, soft: u64) -> u64 {
    let per_process = soft.saturating_sub(reserve) / fds_per_connection.max(1);
    if per_process == 0 {
        return u64::MAX;
    }
    connections.div_ceil(per_process).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_never_lowers() {
        let l = raise_nofile().unwrap();
        assert!(l.soft >= l.soft_before);
        assert_eq!(l.soft, l.hard.min(l.soft));
    }

    #[test]
    fn twenty_thousand_forwarded_connections_need_three_processes() {
        // 2 sockets per forwarded connection, 200 descriptors kept back per process.
        assert_eq!(processes_needed(20_000, 2, 200, 20_000), 3);
        assert_eq!(processes_needed(1_000, 2, 200, 20_000), 1);
        assert_eq!(processes_needed(20_000, 1, 200, 20_000), 2);
    }
}
