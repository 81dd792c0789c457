//! Pacing the connect ramp: a token bucket. Tokens come at the connect rate and the bucket holds
//! at most [`BURST`] worth of them, so a ramp that was held back (by the in-flight cap or a slow
//! server) goes on at the rate afterwards instead of firing the backlog at once.

use std::time::{Duration, Instant};

/// The most the bucket holds, in seconds of the rate (at least one token): enough to absorb the
/// timer's 1 ms granularity at high rates, far too little to be a burst a server notices.
pub const BURST: Duration = Duration::from_millis(10);

/// A token bucket that lends: a take without a token reserves the next one and says how long to
/// wait for it.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket of `rate` tokens per second (> 0), full at `now`.
    pub fn new(rate: f64, now: Instant) -> TokenBucket {
        let capacity = (rate * BURST.as_secs_f64()).max(1.0);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes one token at `now`: `None` to go at once, else how long to wait first.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts `n` connections with `bucket`, each taking `hold` after its wait (the in-flight
    /// cap of one) and returns when each started, in ms after `t0`.
    fn starts(bucket: &mut TokenBucket, t0: Instant, n: usize, stall_after: usize) -> Vec<f64> {
        let mut now = t0;
        let mut out = Vec::new();
        for i in 0..n {
            if i == stall_after {
                now += Duration::from_secs(2); // the ramp is held back for 2 s
            }
            if let Some(w) = bucket.take(now) {
                now += w;
            }
            out.push((now - t0).as_secs_f64() * 1000.0);
        }
        out
    }

    #[test]
    fn the_rate_is_kept_and_a_stall_is_not_made_up_in_a_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, t0); // 10 ms apart, capacity 1
        let s = starts(&mut b, t0, 40, 20);
        // Before the stall: one every 10 ms (the first at once).
        for (i, at) in s[..20].iter().enumerate() {
            assert!((at - 10.0 * i as f64).abs() < 1e-6, "{i}: {at}");
        }
        // After it: one token was waiting, then 10 ms apart again — no 200-connection burst.
        let after = &s[20..];
        assert!((after[0] - (190.0 + 2000.0)).abs() < 1e-6, "{after:?}");
        for w in after.windows(2).skip(1) {
            assert!((w[1] - w[0] - 10.0).abs() < 1e-6, "{after:?}");
        }
        assert!((after[1] - after[0] - 10.0).abs() < 1e-6, "{after:?}");
    }

    #[test]
    fn a_high_rate_may_go_ten_milliseconds_ahead_at_most() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10_000.0, t0); // capacity 100
        let mut at_once = 0;
        while b.take(t0).is_none() {
            at_once += 1;
        }
        assert_eq!(at_once, 100);
        // The reserved one after that waits one interval.
        assert_eq!(b.take(t0), Some(Duration::from_micros(200)));
    }
}
