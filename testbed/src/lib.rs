//! What several testbed programs really share: raising the open-file limit, SO_REUSEPORT
//! listeners, memory shared with worker processes, rustls configs built on the `ring` provider,
//! logging set-up, starting worker processes that never outlive their supervisor, man pages and
//! completions from clap. Test-only helpers live in `testbed-dev`, never here.

pub mod docs;
pub mod fdlimit;
pub mod listener;
pub mod logging;
pub mod shm;
pub mod tls;
pub mod workers;
