//! What the forwarder knows about a backend's health, in the three states the page, the API and
//! `/metrics` all show: `up` (a connect, a reply or a check succeeded), `down` (failed, and not
//! yet back for [`RISE`](super::RISE) good checks in a row) and `unknown` (nothing tried yet: no
//! traffic and no check, such as a UDP backend no datagram was sent to). Read from the shared
//! slot; the one place these words are decided.

use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

use super::BackendSlot;

/// A backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
    Unknown,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unknown => "unknown",
        }
    }

    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [Health; 3] = [Health::Up, Health::Down, Health::Unknown];
}

/// The health `slot` records.
pub fn health(slot: &BackendSlot) -> Health {
    if slot.down_since_ms.load(Relaxed) != 0 || slot.failures_in_row.load(Relaxed) != 0 {
        Health::Down
    } else if slot.ever_ok.load(Relaxed) != 0 {
        Health::Up
    } else {
        Health::Unknown
    }
}

/// What tells the forwarder about a backend's health, for the page: an active check, or only
/// the traffic itself (TCP connects; UDP replies and ICMP port unreachable).
pub fn check_kind(udp: bool, active_tcp_checks: bool, disabled: bool) -> &'static str {
    match (udp, active_tcp_checks, disabled) {
        (_, _, true) => "none (disabled)",
        (true, _, _) => "passive (replies, ICMP port unreachable)",
        (false, true, _) => "tcp connect",
        (false, false, _) => "passive (connects)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Shared;

    #[test]
    fn unknown_until_something_is_seen_then_up_or_down() {
        let shared = Shared::create().unwrap();
        let b = shared.backend(3);
        assert_eq!(health(b), Health::Unknown);
        b.record_success(1000);
        assert_eq!(health(b), Health::Up);
        b.record_failure(111, 2000);
        assert_eq!(health(b), Health::Down);
        b.record_success(4000);
        assert_eq!(health(b), Health::Down, "one good check is not enough");
        b.record_success(5000);
        assert_eq!(health(b), Health::Up);
        let fresh = shared.backend(4);
        fresh.record_failure(111, 1000);
        assert_eq!(health(fresh), Health::Down, "failed before it ever worked");
    }
}
