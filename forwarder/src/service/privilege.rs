//! `--user NAME`: start as root, then run the supervisor and its workers as NAME. The one root
//! power kept is `CAP_NET_BIND_SERVICE` (ports below 1024), raised as an *ambient* capability so
//! the re-executed workers inherit it and a reload can still open a new low port. Listeners are
//! opened by the workers after the drop, as NAME: `SO_REUSEPORT` only lets sockets of the same
//! user share a port, so binding some as root and later ones as NAME would fail.

use std::ffi::{CStr, CString};
use std::path::Path;

/// `CAP_NET_BIND_SERVICE` from linux/capability.h.
const CAP_NET_BIND_SERVICE: u32 = 10;
/// `CAP_NET_ADMIN`: `IP_TRANSPARENT` (rules with `transparent`) and `SO_MARK` (`mark=`).
pub const CAP_NET_ADMIN: u32 = 12;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets, as two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Why the privileges could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error("--user {user}: running as uid {uid}, only root can switch users")]
    NotRoot { user: String, uid: u32 },
    #[error("--user {user}: {step}: {source}")]
    Os {
        user: String,
        step: &'static str,
        source: std::io::Error,
    },
    #[error(
        "refusing to run as root (--refuse-root): give --user NAME, or start as an ordinary user"
    )]
    RootRefused,
}

/// A user from the password database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks `name` up with getpwnam_r (thread-safe, unlike getpwnam).
pub fn lookup(name: &str) -> Result<User, PrivilegeError> {
    let missing = || PrivilegeError::NoSuchUser(name.to_string());
    let c_name = CString::new(name).map_err(|_| missing())?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwnam_r to overwrite.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to memory we own for the duration of the call.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(missing());
    }
    Ok(User {
        name: name.to_string(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Applies `--user` and `--refuse-root` before any thread or worker starts (credentials and
/// capabilities are per thread at the system-call level; threads created later copy them).
/// Returns the user switched to, if any.
/// `keep` names capabilities to keep besides `CAP_NET_BIND_SERVICE` (`CAP_NET_ADMIN` when a
/// rule is transparent or marks its packets).
pub fn drop_to(
    user: Option<&str>,
    refuse_root: bool,
    keep: &[u32],
) -> Result<Option<User>, PrivilegeError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let Some(name) = user else {
        if refuse_root && euid == 0 {
            return Err(PrivilegeError::RootRefused);
        }
        return Ok(None);
    };
    let user = lookup(name)?;
    if euid == user.uid {
        return Ok(Some(user));
    }
    if euid != 0 {
        return Err(PrivilegeError::NotRoot {
            user: name.to_string(),
            uid: euid,
        });
    }
    let os = |step: &'static str| {
        let source = std::io::Error::last_os_error();
        PrivilegeError::Os {
            user: name.to_string(),
            step,
            source,
        }
    };
    let c_name = CString::new(name).map_err(|_| PrivilegeError::NoSuchUser(name.into()))?;
    // SAFETY: plain system calls on this process; each result is checked.
    unsafe {
        // Keep the permitted set across setuid, so CAP_NET_BIND_SERVICE can be re-raised.
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(os("prctl(PR_SET_KEEPCAPS)"));
        }
        // Supplementary groups of the user (and nothing of root's), then the group, then the user.
        if libc::initgroups(c_name.as_ptr(), user.gid) != 0 {
            return Err(os("initgroups"));
        }
        if libc::setresgid(user.gid, user.gid, user.gid) != 0 {
            return Err(os("setresgid"));
        }
        if libc::setresuid(user.uid, user.uid, user.uid) != 0 {
            return Err(os("setresuid"));
        }
    }
    let mut caps = vec![CAP_NET_BIND_SERVICE];
    caps.extend_from_slice(keep);
    keep_only(&caps).map_err(|source| PrivilegeError::Os {
        user: name.to_string(),
        step: "keeping CAP_NET_BIND_SERVICE (and CAP_NET_ADMIN for transparent or mark=)",
        source,
    })?;
    // SAFETY: as above. Setting the uid made the process non-dumpable, which hides its
    // /proc entries from the user it now runs as; nothing secret of root's is left in memory.
    unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
    }
    Ok(Some(user))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Effective, permitted and inheritable sets = `caps` (all below 32), then each raised as
/// ambient so they survive execve of the (non-setuid) worker binary.
fn keep_only(caps: &[u32]) -> std::io::Result<()> {
    let bit = caps.iter().fold(0u32, |bits, &c| bits | 1 << c);
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: bit,
            permitted: bit,
            inheritable: bit,
        },
        CapData::default(),
    ];
    // SAFETY: capset reads a version-3 header and two data words we own (libc has no wrapper).
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for &cap in caps {
        // SAFETY: prctl with plain integer arguments.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What stops this process from writing the rules file the way the web page does (a temporary
/// file in its folder renamed over it, the old one copied to `<file>.bak`), or `None`. The file
/// itself need not be writable: it is replaced, not written in place. access(2) checks the real
/// uid, which is the `--user` after the drop.
pub fn rules_write_problem(path: &Path) -> Option<String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let bak = {
        let mut name = path.file_name()?.to_os_string();
        name.push(".bak");
        dir.join(name)
    };
    let mut problems = Vec::new();
    if !writable(dir) {
        problems.push(format!("the folder {}", dir.display()));
    }
    if bak.exists() && !writable(&bak) {
        problems.push(bak.display().to_string());
    }
    if problems.is_empty() {
        return None;
    }
    let user = current_user_name();
    let mut fix = format!("chown {user} {}", dir.display());
    if bak.exists() {
        fix.push_str(&format!(" {}", bak.display()));
    }
    Some(format!(
        "user {user} cannot write {}: changes from the web page will fail ({fix})",
        problems.join(" and "),
    ))
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access reads a NUL-terminated path we own.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// The name of the real uid, or its number when it has none.
fn current_user_name() -> String {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: as in lookup().
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to memory we own for the duration of the call.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc == 0 && !found.is_null() {
        // SAFETY: getpwuid_r filled pw_name with a NUL-terminated string inside `buf`.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        return name.to_string_lossy().into_owned();
    }
    uid.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_by_name() {
        let root = lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let err = lookup("no-such-user-here").unwrap_err();
        assert_eq!(err.to_string(), "--user no-such-user-here: no such user");
    }

    #[test]
    fn a_writable_folder_has_no_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("entries.csv");
        std::fs::write(&file, "").unwrap();
        assert_eq!(rules_write_problem(&file), None);
    }
}
