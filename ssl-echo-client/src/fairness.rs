//! How evenly the connections were served: messages per connection (min, 1st percentile,
//! median, max) and Jain's fairness index, (Σx)² / (n·Σx²): 1 when every connection exchanged
//! the same number of messages, 1/n when one got everything.

use serde::{Deserialize, Serialize};

/// Messages per connection over the connections that were up for phase 2.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fairness {
    pub connections: u64,
    pub min: u64,
    pub p1: u64,
    pub median: u64,
    pub max: u64,
    pub jain: f64,
}

impl Fairness {
    /// From each connection's message count.
    pub fn of(counts: impl Iterator<Item = u64>) -> Fairness {
        let mut v: Vec<u64> = counts.collect();
        if v.is_empty() {
            return Fairness::default();
        }
        v.sort_unstable();
        let n = v.len();
        // Nearest rank: the smallest value with at least q of the connections at or below it.
        let rank = |q: f64| v[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let squares: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        Fairness {
            connections: n as u64,
            min: v[0],
            p1: rank(0.01),
            median: rank(0.5),
            max: v[n - 1],
            jain: if squares > 0.0 {
                sum * sum / (n as f64 * squares)
            } else {
                1.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_counts_are_perfectly_fair() {
        let f = Fairness::of([40u64; 100].into_iter());
        assert_eq!((f.min, f.p1, f.median, f.max), (40, 40, 40, 40));
        assert!((f.jain - 1.0).abs() < 1e-12);
        assert_eq!(f.connections, 100);
    }

    #[test]
    fn one_connection_taking_everything_gives_one_over_n() {
        let mut counts = vec![0u64; 99];
        counts.push(1000);
        let f = Fairness::of(counts.into_iter());
        assert!((f.jain - 0.01).abs() < 1e-12, "{f:?}");
        assert_eq!((f.min, f.median, f.max), (0, 0, 1000));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        // 1..=200: p1 is the 2nd value, the median the 100th.
        let f = Fairness::of(1..=200u64);
        assert_eq!((f.min, f.p1, f.median, f.max), (1, 2, 100, 200));
        // Half the connections at 10, half at 30: (20n)² / (n · 500n) = 0.8.
        let f = Fairness::of((0..100).map(|i| if i % 2 == 0 { 10 } else { 30 }));
        assert!((f.jain - 0.8).abs() < 1e-12, "{f:?}");
        assert_eq!(Fairness::of(std::iter::empty()), Fairness::default());
        assert_eq!(Fairness::of([0u64, 0].into_iter()).jain, 1.0);
    }
}
