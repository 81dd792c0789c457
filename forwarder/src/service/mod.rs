//! Running the forwarder as a gateway service: telling systemd how it is doing (`notify`),
//! dropping root after start (`privilege`), the exit codes a service manager acts on (`exit`),
//! and the signals beyond reload and stop (`signals`).

pub mod exit;
pub mod notify;
pub mod privilege;
pub mod signals;
