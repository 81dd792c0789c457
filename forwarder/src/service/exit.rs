//! The forwarder's exit codes, distinct so a service manager can tell a mistake in the
//! configuration (restarting will not help: the unit's `RestartPreventExitStatus=`) from a port
//! someone else holds (restarting may). The man page and README list them from [`CODES`].

use std::process::ExitCode;

/// A failure that ends the process with a specific code. Carried inside an `anyhow::Error`;
/// [`code_of`] finds it in the chain.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: Code,
    pub message: String,
}

/// Why the forwarder stopped, as its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Stopped by SIGTERM/SIGINT after draining, or `--check` found nothing wrong.
    Ok = 0,
    /// Anything else that went wrong while starting or running.
    Failure = 1,
    /// The command line itself is wrong (clap's own code).
    Usage = 2,
    /// The rules file is missing, unreadable or invalid; `--user` names no user; or root was
    /// refused by `--refuse-root`.
    Config = 3,
    /// A listen port or the web page's address is in use or not allowed.
    CannotBind = 4,
}

/// Every exit code with its meaning, in the words of the man page.
pub const CODES: &[(Code, &str)] = &[
    (
        Code::Ok,
        "stopped by SIGTERM or SIGINT after draining; --check found nothing wrong",
    ),
    (Code::Failure, "any other failure while starting or running"),
    (Code::Usage, "unknown flag or bad flag value"),
    (
        Code::Config,
        "configuration error: the rules file is unreadable or invalid, --user names no user, or root is refused by --refuse-root",
    ),
    (
        Code::CannotBind,
        "cannot bind: a listen port or the --web address is in use or not allowed",
    ),
];

/// What each signal does, in the words of the man page.
pub const SIGNALS: &[(&str, &str)] = &[
    (
        "SIGHUP",
        "reload the rules file (as systemctl reload does); a bad file keeps the rules in force",
    ),
    (
        "SIGTERM",
        "stop accepting, let established connections finish for up to --drain-timeout-s, exit 0",
    ),
    ("SIGINT", "the same as SIGTERM (Ctrl-C)"),
    (
        "SIGUSR1",
        "log one status line per listen port (connections accepted, backends up and down, active connections) and have the workers reopen the --access-log file (for logrotate); a worker sent it directly reopens its access log",
    ),
];

impl Exit {
    pub fn config(message: impl Into<String>) -> Exit {
        Exit {
            code: Code::Config,
            message: message.into(),
        }
    }

    pub fn cannot_bind(message: impl Into<String>) -> Exit {
        Exit {
            code: Code::CannotBind,
            message: message.into(),
        }
    }
}

/// The exit code for an error: the first [`Exit`] in its chain, else [`Code::Failure`].
pub fn code_of(error: &anyhow::Error) -> ExitCode {
    let code = error
        .chain()
        .find_map(|e| e.downcast_ref::<Exit>())
        .map_or(Code::Failure, |e| e.code);
    ExitCode::from(code as u8)
}

/// Marks `error` as [`Code::CannotBind`] when it comes from bind(2) refusing an address.
pub fn bind_failure(error: anyhow::Error) -> anyhow::Error {
    use std::io::ErrorKind::{AddrInUse, AddrNotAvailable, PermissionDenied};
    let refused = error
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| matches!(e.kind(), AddrInUse | AddrNotAvailable | PermissionDenied));
    if refused {
        Exit::cannot_bind(format!("{error:#}")).into()
    } else {
        error
    }
}

/// The man page's EXIT STATUS and SIGNALS sections, as roff.
pub fn man_sections() -> Vec<(&'static str, String)> {
    let exit: String = CODES
        .iter()
        .map(|(code, text)| format!(".TP\n\\fB{}\\fR\n{}\n", *code as u8, escape(text)))
        .collect();
    let signals: String = SIGNALS
        .iter()
        .map(|(name, text)| format!(".TP\n\\fB{name}\\fR\n{}\n", escape(text)))
        .collect();
    vec![("EXIT STATUS", exit), ("SIGNALS", signals)]
}

/// Escapes what roff would read as commands or escapes.
fn escape(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_comes_from_the_chain() {
        let e = anyhow::Error::new(Exit::config("entries.csv: 2 error(s)")).context("starting");
        assert_eq!(code_of(&e), ExitCode::from(3));
        assert_eq!(code_of(&anyhow::anyhow!("other")), ExitCode::from(1));
    }

    #[test]
    fn the_readme_lists_every_code_and_signal() {
        let readme = include_str!("../../../docs/service.md");
        for (code, text) in CODES {
            let row = format!("| {} | {text} |", *code as u8);
            assert!(readme.contains(&row), "README lacks {row}");
        }
        for (name, text) in SIGNALS {
            let row = format!("| {name} | {text} |");
            assert!(readme.contains(&row), "README lacks {row}");
        }
    }
}
