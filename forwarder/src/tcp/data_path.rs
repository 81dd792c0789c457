//! `--data-path`: how established TCP connections move their bytes, and the one decision the
//! supervisor makes at start (resolving `auto` by [`calibrate`]) that every worker then follows,
//! the start-up line says and the page, API and metrics show.

use serde::{Deserialize, Serialize};

use crate::tcp::{calibrate, sockmap};

/// Which way a worker moves the bytes of established TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// User space copies through a pooled buffer (read/write).
    Copy,
    /// User space moves bulk through a pooled pipe with splice(2), small messages by copying.
    Splice,
    /// Copy or splice, whichever a short calibration at start finds cheaper per byte.
    #[default]
    Auto,
    /// The kernel: a BPF sk_skb verdict program redirects between the sockets of a SOCKHASH map
    /// (needs CAP_BPF and CAP_NET_ADMIN, else splice).
    Sockmap,
}

impl DataPath {
    pub fn name(self) -> &'static str {
        match self {
            DataPath::Copy => "copy",
            DataPath::Splice => "splice",
            DataPath::Auto => "auto",
            DataPath::Sockmap => "sockmap",
        }
    }
}

/// The data path in force and why: what the start-up line, the page, the API and the metrics
/// say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// What the workers do: `copy`, `splice` or `sockmap`, never `auto`.
    pub path: DataPath,
    /// What was asked for (`auto` when the calibration chose).
    pub asked: DataPath,
    /// The calibration's CPU per GB each way (auto only; absent when it failed).
    pub copy_ms_per_gb: Option<f64>,
    pub splice_ms_per_gb: Option<f64>,
    /// One sentence: why this path.
    pub reason: String,
}

impl Default for Choice {
    fn default() -> Self {
        Choice {
            path: DataPath::Copy,
            asked: DataPath::Copy,
            copy_ms_per_gb: None,
            splice_ms_per_gb: None,
            reason: String::new(),
        }
    }
}

impl Choice {
    /// Whether bulk directions splice (sockmap falls back to splice for what the kernel does
    /// not take).
    pub fn splices(&self) -> bool {
        matches!(self.path, DataPath::Splice | DataPath::Sockmap)
    }

    /// The start-up line.
    pub fn describe(&self) -> String {
        format!("data path: {} ({})", self.path.name(), self.reason)
    }
}

/// Resolves what was asked for on this host: runs the calibration for `auto`, checks that the
/// sockmap program loads for `sockmap`.
pub fn choose(asked: DataPath) -> Choice {
    let mut choice = Choice {
        path: asked,
        asked,
        ..Choice::default()
    };
    match asked {
        DataPath::Copy | DataPath::Splice => choice.reason = "--data-path".into(),
        DataPath::Sockmap => {
            choice.path = sockmap::check(asked);
            choice.reason = if choice.path == DataPath::Sockmap {
                "--data-path; the verdict program loaded".into()
            } else {
                "--data-path sockmap, but the verdict program does not load here".into()
            };
        }
        DataPath::Auto => match calibrate::run() {
            Ok(c) => {
                choice.copy_ms_per_gb = Some(c.copy_ms_per_gb);
                choice.splice_ms_per_gb = Some(c.splice_ms_per_gb);
                choice.path = if c.splice_wins() {
                    DataPath::Splice
                } else {
                    DataPath::Copy
                };
                choice.reason = format!(
                    "auto: calibrated in {} ms, copy {:.0} ms/GB, splice {:.0} ms/GB of CPU{}",
                    c.elapsed.as_millis(),
                    c.copy_ms_per_gb,
                    c.splice_ms_per_gb,
                    if c.splice_wins() {
                        ""
                    } else {
                        "; splice must be 5 % cheaper to be chosen"
                    }
                );
            }
            Err(e) => {
                choice.path = DataPath::Copy;
                choice.reason = format!("auto: calibration failed ({e}); copying");
            }
        },
    }
    choice
}
