//! Worker processes: the running program started again as a worker, inheriting the descriptors it
//! is given, and never outliving its supervisor (the kernel sends it SIGTERM when the supervisor
//! dies, and a worker can check it was not orphaned before that took effect).

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Tells a worker which process started it.
pub const SUPERVISOR_PID_ENV: &str = "TESTBED_SUPERVISOR_PID";

/// This executable, ready to be given a worker's arguments and spawned: `inherit` stay open across
/// exec, SIGTERM is asked for when the supervisor dies, and [`supervisor_alive`] works in it.
pub fn worker_command(inherit: &[RawFd]) -> io::Result<Command> {
    let exe = std::env::current_exe()?;
    let supervisor = std::process::id();
    let inherit = inherit.to_vec();
    let mut cmd = Command::new(exe);
    cmd.env(SUPERVISOR_PID_ENV, supervisor.to_string());
    // SAFETY: only async-signal-safe calls (fcntl, prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // The supervisor died before the request above took effect: no signal will come.
            if libc::getppid() as u32 != supervisor {
                return Err(io::Error::other("the supervisor is gone"));
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// In a worker: whether the supervisor that started it is still its parent (true when not started
/// by [`worker_command`]).
pub fn supervisor_alive() -> bool {
    let expected = std::env::var(SUPERVISOR_PID_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() } as u32;
    expected.is_none_or(|pid| pid == parent)
}
