//! The choice for pools whose backends carry `backup`, `drain`/`disabled` or `slowstart`: the
//! primaries are tried before any backup (a backup serves only while no primary can take the
//! connection: down, in back-off, or at `max_conns`), and the backups balance among themselves;
//! drained and disabled backends get no new connection at all, not even to fail open; a backend
//! in its slow start takes a connection offered to it with a probability that rises from
//! [`RAMP_FLOOR`] to 1 over its `slowstart`. Pools without these options never come here.

use crate::control::{BackendSpec, PoolSpec};
use crate::rules::options::Admin;
use crate::stats::{BackendSlot, Shared};

use super::{mix, smooth_schedule, Refusal};

/// Share of its weight a backend takes at the start of its slow start (HAProxy starts near
/// 1/weight; a floor keeps one connection in twenty flowing to it at once).
pub const RAMP_FLOOR: f64 = 0.05;

/// The primaries and the backups of one pool.
#[derive(Debug)]
pub struct Tiers {
    tiers: [Tier; 2],
}

#[derive(Debug)]
struct Tier {
    backup: bool,
    /// Backend indices in file order.
    members: Vec<usize>,
    /// Positions in `members` in smooth weighted order; empty when the weights are equal.
    schedule: Vec<u16>,
}

impl Tiers {
    /// The tiers of `backends`, or `None` when no backend has an option that needs them (the
    /// plain pick then runs as before).
    pub fn build(backends: &[BackendSpec]) -> Option<Tiers> {
        let needed = backends.iter().any(|b| {
            b.options.backup || b.options.admin != Admin::Active || b.options.slowstart_ms > 0
        });
        if !needed {
            return None;
        }
        let tier = |backup: bool| {
            let members: Vec<usize> = (0..backends.len())
                .filter(|&i| backends[i].options.backup == backup)
                .collect();
            let weights: Vec<u32> = members
                .iter()
                .map(|&i| backends[i].options.weight)
                .collect();
            let schedule = if weights.windows(2).all(|w| w[0] == w[1]) {
                Vec::new()
            } else {
                smooth_schedule(&weights)
            };
            Tier {
                backup,
                members,
                schedule,
            }
        };
        Some(Tiers {
            tiers: [tier(false), tier(true)],
        })
    }
}

/// How the pool's strategy orders the backends for this connection.
pub enum Ranking<'a> {
    /// Round robin: this turn of the pool's counter, applied within each tier.
    Turn(u64),
    /// Leastconn or source: every backend, best first; `turn` draws the slow-start lottery
    /// (`None` for source, which is not ramped).
    List(&'a [usize], Option<u64>),
}

/// Picks and reserves a backend not in `tried`: primaries up, backups up, then (fail open)
/// primaries and backups in back-off; never a drained or disabled one.
pub fn choose(
    tiers: &Tiers,
    backends: &[BackendSpec],
    shared: &Shared,
    worker: usize,
    now_ms: u64,
    ranking: Ranking<'_>,
    tried: &[usize],
) -> Result<usize, Refusal> {
    let draw = match ranking {
        Ranking::Turn(turn) => Some(turn),
        Ranking::List(_, turn) => turn,
    };
    let mut full = false;
    let mut order = Vec::with_capacity(backends.len());
    for want_down in [false, true] {
        for tier in &tiers.tiers {
            order.clear();
            match ranking {
                Ranking::Turn(turn) => tier.rotation(turn, &mut order),
                Ranking::List(list, _) => order.extend(
                    list.iter()
                        .copied()
                        .filter(|&i| backends[i].options.backup == tier.backup),
                ),
            }
            // In slow start a backend may decline (the lottery); if every other one is full or
            // down, the second sweep gives it the connection anyway.
            let sweeps: &[bool] = if want_down || draw.is_none() {
                &[false]
            } else {
                &[true, false]
            };
            for &lottery in sweeps {
                for &i in &order {
                    let b = &backends[i];
                    let s = shared.backend(b.slot);
                    if tried.contains(&i)
                        || b.options.admin != Admin::Active
                        || s.is_down(now_ms) != want_down
                    {
                        continue;
                    }
                    if lottery {
                        if let (Some(share), Some(turn)) = (ramp_share(b, s, now_ms), draw) {
                            if unit(turn, i) >= share {
                                continue;
                            }
                        }
                    }
                    if shared.reserve(worker, b.slot, b.options.max_conns) {
                        return Ok(i);
                    }
                    full = true;
                }
            }
        }
    }
    Err(if full {
        Refusal::Full
    } else {
        Refusal::NoBackend
    })
}

impl Tier {
    /// The tier's members for round-robin turn `turn`: from the turn's place on, wrapping, so
    /// the members of each tier take turns among themselves.
    fn rotation(&self, turn: u64, out: &mut Vec<usize>) {
        let n = self.members.len();
        if n == 0 {
            return;
        }
        let start = if self.schedule.is_empty() {
            (turn % n as u64) as usize
        } else {
            self.schedule[(turn % self.schedule.len() as u64) as usize] as usize
        };
        out.extend((0..n).map(|k| self.members[(start + k) % n]));
    }
}

/// Which tier takes a pool's new connections now: `primary` while some primary can (in service,
/// not in back-off, below `max_conns`), else `backup` when a backup can, else `none`.
pub fn serving_tier(backends: &[BackendSpec], shared: &Shared, now_ms: u64) -> &'static str {
    let can_take = |backup: bool| {
        backends.iter().any(|b| {
            let s = shared.backend(b.slot);
            b.options.backup == backup
                && b.options.admin == Admin::Active
                && !s.is_down(now_ms)
                && (b.options.max_conns == 0
                    || s.open_now.load(std::sync::atomic::Ordering::Relaxed) < b.options.max_conns)
        })
    };
    if can_take(false) {
        "primary"
    } else if can_take(true) {
        "backup"
    } else {
        "none"
    }
}

/// Starts the slow start of every backend that `new` brings into service: added by a reload, or
/// back from `drain`/`disabled`. (A backend that recovers from down starts its own, in
/// [`BackendSlot::record_success`].) The rules first loaded start nothing.
pub fn mark_returning(old: &[PoolSpec], new: &[PoolSpec], shared: &Shared, now_ms: u64) {
    for b in new.iter().flat_map(|p| p.backends.iter()) {
        if b.options.admin != Admin::Active {
            continue;
        }
        let before = old
            .iter()
            .flat_map(|p| p.backends.iter())
            .find(|o| o.slot == b.slot);
        if before.is_none_or(|o| o.options.admin != Admin::Active) {
            shared
                .backend(b.slot)
                .up_since_ms
                .store(now_ms, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The share of its weight a backend in slow start takes now: `None` when it has no `slowstart`
/// or its window is over.
pub fn ramp_share(b: &BackendSpec, slot: &BackendSlot, now_ms: u64) -> Option<f64> {
    let window = b.options.slowstart_ms;
    if window == 0 {
        return None;
    }
    let since = slot.up_since_ms.load(std::sync::atomic::Ordering::Relaxed);
    if since == 0 || now_ms >= since + window {
        return None;
    }
    let elapsed = now_ms.saturating_sub(since) as f64;
    Some((elapsed / window as f64).max(RAMP_FLOOR))
}

/// A number in [0, 1) fixed by the turn and the backend: the slow-start lottery, the same in
/// every worker for the same turn.
fn unit(turn: u64, index: usize) -> f64 {
    let h = mix(turn ^ ((index as u64) << 40) ^ 0x5151);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::options::BackendOptions;
    use std::sync::atomic::Ordering::Relaxed;

    fn backends(opts: &[&str]) -> Vec<BackendSpec> {
        opts.iter()
            .enumerate()
            .map(|(i, o)| BackendSpec {
                name: format!("b{i}"),
                addr: format!("127.0.0.1:{}", 2000 + i).parse().unwrap(),
                slot: i,
                options: BackendOptions {
                    backup: o.contains("backup"),
                    admin: if o.contains("drain") {
                        Admin::Drain
                    } else if o.contains("disabled") {
                        Admin::Disabled
                    } else {
                        Admin::Active
                    },
                    slowstart_ms: if o.contains("slow") { 10_000 } else { 0 },
                    max_conns: if o.contains("max1") { 1 } else { 0 },
                    weight: if o.contains("w3") { 3 } else { 1 },
                    ..Default::default()
                },
                line: 0,
                port_range: false,
            })
            .collect()
    }

    fn pick(t: &Tiers, b: &[BackendSpec], shared: &Shared, turn: u64, now: u64) -> Option<usize> {
        let i = choose(t, b, shared, 0, now, Ranking::Turn(turn), &[]).ok()?;
        shared.release(0, b[i].slot);
        Some(i)
    }

    #[test]
    fn added_and_undrained_backends_start_their_slow_start() {
        let shared = Shared::create().unwrap();
        let spec = |b: Vec<BackendSpec>| PoolSpec {
            listen: "0.0.0.0:1".parse().unwrap(),
            ports: 1,
            steered: false,
            proto: Default::default(),
            slot: 0,
            options: Default::default(),
            backends: b,
        };
        let old = [spec(backends(&["", "drain", ""]))];
        let mut grown = backends(&["", "", "", ""]);
        grown[3].slot = 9;
        mark_returning(&old, &[spec(grown)], &shared, 777);
        let since: Vec<u64> = [0, 1, 2, 9]
            .iter()
            .map(|&s| shared.backend(s).up_since_ms.load(Relaxed))
            .collect();
        assert_eq!(since, [0, 777, 0, 777]);
    }

    #[test]
    fn plain_pools_need_no_tiers() {
        assert!(Tiers::build(&backends(&["", "w3"])).is_none());
        assert!(Tiers::build(&backends(&["", "backup"])).is_some());
    }

    #[test]
    fn backups_serve_exactly_when_the_last_primary_is_down_and_balance_among_themselves() {
        let b = backends(&["", "", "backup", "backup"]);
        let t = Tiers::build(&b).unwrap();
        let shared = Shared::create().unwrap();
        let got: Vec<_> = (0..4)
            .map(|k| pick(&t, &b, &shared, k, 100).unwrap())
            .collect();
        assert_eq!(got, [0, 1, 0, 1], "primaries only");
        shared.backend(0).record_failure(111, 100);
        let got: Vec<_> = (0..4)
            .map(|k| pick(&t, &b, &shared, k, 200).unwrap())
            .collect();
        assert_eq!(got, [1, 1, 1, 1], "one primary left: no backup yet");
        shared.backend(1).record_failure(111, 100);
        let got: Vec<_> = (0..4)
            .map(|k| pick(&t, &b, &shared, k, 200).unwrap())
            .collect();
        assert_eq!(got, [2, 3, 2, 3], "the backups, in turn");
        // Back-off over: the primary is tried again (its first connection is a check).
        assert_eq!(pick(&t, &b, &shared, 0, 1200), Some(0));
        // One good check holds it off until the next: the backups keep serving meanwhile.
        shared.backend(0).record_success(1200);
        shared.backend(1).record_failure(111, 1200);
        assert_eq!(pick(&t, &b, &shared, 0, 1300), Some(2));
        shared.backend(0).record_success(2300);
        assert_eq!(pick(&t, &b, &shared, 0, 2300), Some(0), "two good checks");
    }

    #[test]
    fn full_primaries_spill_to_the_backup_and_all_down_fails_open_to_primaries_first() {
        let b = backends(&["max1", "max1", "backup"]);
        let t = Tiers::build(&b).unwrap();
        let shared = Shared::create().unwrap();
        let held: Vec<_> = (0..3)
            .map(|k| choose(&t, &b, &shared, 0, 0, Ranking::Turn(k), &[]).unwrap())
            .collect();
        assert_eq!(held, [0, 1, 2]);
        for i in held {
            shared.release(0, b[i].slot);
        }
        for s in 0..3 {
            shared.backend(s).record_failure(111, 0);
        }
        assert_eq!(
            pick(&t, &b, &shared, 1, 10),
            Some(1),
            "fail open: a primary first"
        );
        assert_eq!(
            choose(&t, &b, &shared, 0, 10, Ranking::Turn(0), &[0, 1]),
            Ok(2)
        );
    }

    #[test]
    fn drained_and_disabled_backends_get_nothing_even_when_all_else_is_down() {
        let b = backends(&["drain", "", "disabled"]);
        let t = Tiers::build(&b).unwrap();
        let shared = Shared::create().unwrap();
        assert!((0..6).all(|k| pick(&t, &b, &shared, k, 0) == Some(1)));
        shared.backend(1).record_failure(111, 0);
        assert_eq!(
            pick(&t, &b, &shared, 0, 10),
            Some(1),
            "fail open to the active one only"
        );
        assert_eq!(
            choose(&t, &b, &shared, 0, 10, Ranking::Turn(0), &[1]),
            Err(Refusal::NoBackend)
        );
        let list = [2, 0, 1];
        assert_eq!(
            choose(&t, &b, &shared, 0, 10, Ranking::List(&list, Some(3)), &[]),
            Ok(1)
        );
    }

    #[test]
    fn slow_start_share_rises_with_the_window() {
        let b = backends(&["", "slow"]);
        let t = Tiers::build(&b).unwrap();
        let shared = Shared::create().unwrap();
        shared.backend(1).up_since_ms.store(1_000, Relaxed);
        let share_at = |now: u64| {
            let n = 4000;
            let ones = (0..n)
                .filter(|&k| pick(&t, &b, &shared, k, now) == Some(1))
                .count();
            ones as f64 / n as f64
        };
        // Round robin over two: full weight is 1/2; at a fraction f of the window, f/2.
        for (now, expected) in [(1_000, 0.025), (3_500, 0.125), (6_000, 0.25), (9_000, 0.4)] {
            let got = share_at(now);
            assert!(
                (got - expected).abs() < 0.03,
                "at {now}: {got} vs {expected}"
            );
        }
        assert_eq!(share_at(11_000), 0.5, "window over: plain alternation");
        // Alone in its tier, a ramping backend still takes every connection.
        let alone = backends(&["slow"]);
        let t1 = Tiers::build(&alone).unwrap();
        assert!((0..50).all(|k| pick(&t1, &alone, &shared, k, 1_500) == Some(0)));
    }
}
