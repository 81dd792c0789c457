//! The web page on port 3001 is built in its own issue; until then the forwarder says so.

use std::net::SocketAddr;

use crate::supervisor::Supervisor;

/// Starts the web page for `supervisor` on `addr`.
pub fn start(
    _supervisor: Supervisor,
    addr: SocketAddr,
    _token: Option<String>,
) -> anyhow::Result<()> {
    tracing::warn!("web page on {addr}: not built yet (use --no-web to silence this)");
    Ok(())
}
