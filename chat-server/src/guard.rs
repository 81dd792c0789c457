//! What keeps strangers from holding the room's slots for free: at most `--max-per-address`
//! connections from one client address, and a line once begun must end (its `\n`) within
//! `--line-timeout-ms`, or the client is told `ERR line-timeout` and closed. Idle clients
//! between lines are people reading the room, and stay. Sans-IO: the server loop asks and
//! tells; tests drive it with made-up instants.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Connections by client address. A limit of 0 means none.
#[derive(Debug, Default)]
pub struct PerAddress {
    limit: usize,
    held: HashMap<IpAddr, usize>,
}

impl PerAddress {
    pub fn new(limit: usize) -> PerAddress {
        PerAddress {
            limit,
            held: HashMap::new(),
        }
    }

    /// Takes a place for `ip`; false when it already holds the limit.
    pub fn admit(&mut self, ip: IpAddr) -> bool {
        let held = self.held.entry(ip).or_insert(0);
        if self.limit > 0 && *held >= self.limit {
            if *held == 0 {
                self.held.remove(&ip);
            }
            return false;
        }
        *held += 1;
        true
    }

    /// Gives back a place taken by [`PerAddress::admit`].
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(held) = self.held.get_mut(&ip) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(&ip);
            }
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// A connection as the line clock knows it: its slab key and a serial that is never reused,
/// so a stale entry for a key since given to another client is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who {
    pub id: usize,
    pub serial: u64,
}

/// Deadlines of unfinished lines, oldest first. Every line has the same limit, so deadlines
/// arrive in order and a queue suffices; each connection has at most one entry.
#[derive(Debug)]
pub struct LineClock {
    limit: Duration,
    queue: VecDeque<(Instant, Who)>,
}

impl LineClock {
    pub fn new(limit: Duration) -> LineClock {
        LineClock {
            limit,
            queue: VecDeque::new(),
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// A line of `who` began at `at` and the connection has no entry queued.
    pub fn started(&mut self, who: Who, at: Instant) {
        self.queue.push_back((at + self.limit, who));
    }

    /// How long the loop may sleep before the next deadline.
    pub fn next_in(&self, now: Instant) -> Option<Duration> {
        self.queue
            .front()
            .map(|(deadline, _)| deadline.saturating_duration_since(now))
    }

    /// Takes the entries whose deadline has come. For each, `line_started(who)` says when its
    /// current unfinished line began (`None`: no line pending, or another connection now):
    /// returned when that line is over the limit, queued again when it began later.
    pub fn expired(
        &mut self,
        now: Instant,
        mut line_started: impl FnMut(Who) -> Option<Instant>,
    ) -> Vec<Who> {
        let mut late = Vec::new();
        while let Some(&(deadline, who)) = self.queue.front() {
            if deadline > now {
                break;
            }
            self.queue.pop_front();
            match line_started(who) {
                Some(at) if at + self.limit <= now => late.push(who),
                // A later line: its own deadline, still in order (it is after `now`).
                Some(at) => self.queue.push_back((at + self.limit, who)),
                None => {}
            }
        }
        late
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_limit_and_zero_means_none() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut p = PerAddress::new(2);
        assert!(p.admit(ip) && p.admit(ip));
        assert!(!p.admit(ip));
        assert!(p.admit("10.0.0.2".parse().unwrap()));
        p.release(ip);
        assert!(p.admit(ip));
        let mut open = PerAddress::new(0);
        assert!((0..1000).all(|_| open.admit(ip)));
    }

    #[test]
    fn an_unfinished_line_is_late_at_the_limit_and_a_finished_one_never() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut clock = LineClock::new(10 * s);
        let a = Who { id: 1, serial: 1 };
        let b = Who { id: 2, serial: 2 };
        clock.started(a, t0);
        clock.started(b, t0 + s);
        assert_eq!(clock.next_in(t0), Some(10 * s));
        // b finished its line (None) and a is still on the one begun at t0.
        let pending = |w: Who| (w == a).then_some(t0);
        assert!(clock.expired(t0 + 9 * s, pending).is_empty());
        assert_eq!(clock.expired(t0 + 11 * s, pending), vec![a]);
        assert!(clock.is_empty());
    }

    #[test]
    fn a_later_line_gets_its_own_deadline_and_a_reused_key_is_not_confused() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut clock = LineClock::new(10 * s);
        let old = Who { id: 1, serial: 1 };
        clock.started(old, t0);
        // Key 1 now belongs to serial 7, whose line began at t0 + 5 s; serial 1 is gone.
        let now_at_1 = Who { id: 1, serial: 7 };
        let pending = |w: Who| (w == now_at_1).then_some(t0 + 5 * s);
        assert!(clock.expired(t0 + 10 * s, pending).is_empty());
        assert!(clock.is_empty());
        // The same connection starting another line later is requeued, then late.
        clock.started(now_at_1, t0 + 5 * s);
        let later = |_: Who| Some(t0 + 8 * s);
        assert!(clock.expired(t0 + 15 * s, later).is_empty());
        assert_eq!(clock.len(), 1);
        assert_eq!(clock.expired(t0 + 18 * s, later), vec![now_at_1]);
    }
}
