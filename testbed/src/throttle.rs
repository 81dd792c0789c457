//! Logging what many peers do without one line per event: the first event of an address is
//! logged at once, then at most one line per [`LOG_EVERY`] says how many went unlogged. Used
//! where strangers can cause events cheaply (the web page's refused connections, the chat
//! server's cut clients), so a flood cannot flood the log too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// One log line per address per this long, however many events it causes.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// Most addresses remembered; expired ones are pruned when it is full.
pub const THROTTLE_LIMIT: usize = 4096;

/// Decides when an address's losses are logged: the first at once, then at most one line per
/// [`LOG_EVERY`], saying how many went unlogged in between.
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// Per address: when it was last logged and how many events were not logged since.
    last: HashMap<IpAddr, (Instant, u64)>,
}

impl LogThrottle {
    /// `Some(unlogged)` when this event should be logged (with the count of the quiet ones
    /// since the last line), `None` when it is only counted.
    pub fn note(&mut self, ip: IpAddr, now: Instant) -> Option<u64> {
        if self.last.len() >= THROTTLE_LIMIT && !self.last.contains_key(&ip) {
            self.last
                .retain(|_, (at, _)| now.duration_since(*at) < LOG_EVERY);
            if self.last.len() >= THROTTLE_LIMIT {
                // Still full of recent addresses: a flood from many; count without logging.
                return None;
            }
        }
        match self.last.get_mut(&ip) {
            Some((at, quiet)) if now.duration_since(*at) < LOG_EVERY => {
                *quiet += 1;
                None
            }
            Some((at, quiet)) => {
                let unlogged = *quiet;
                *at = now;
                *quiet = 0;
                Some(unlogged)
            }
            None => {
                self.last.insert(ip, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_log_speaks_once_a_minute_per_address_and_counts_the_quiet_ones() {
        let mut t = LogThrottle::default();
        let start = Instant::now();
        assert_eq!(t.note(ip("10.0.0.1"), start), Some(0));
        assert_eq!(t.note(ip("10.0.0.2"), start), Some(0));
        for s in 1..60 {
            assert_eq!(t.note(ip("10.0.0.1"), start + Duration::from_secs(s)), None);
        }
        assert_eq!(
            t.note(ip("10.0.0.1"), start + Duration::from_secs(60)),
            Some(59)
        );
        assert_eq!(
            t.note(ip("10.0.0.1"), start + Duration::from_secs(61)),
            None
        );
    }

    #[test]
    fn the_throttle_stays_bounded_under_a_flood_of_addresses() {
        let mut t = LogThrottle::default();
        let now = Instant::now();
        for i in 0..(THROTTLE_LIMIT as u32 + 100) {
            t.note(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(t.last.len() <= THROTTLE_LIMIT);
        // A minute later the old entries make room again.
        let later = now + LOG_EVERY;
        assert_eq!(t.note(ip("203.0.113.9"), later), Some(0));
    }
}
