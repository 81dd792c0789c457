//! How a reload reaches the workers: the rules file changed (or SIGHUP, or the web page wrote
//! it), the new listen addresses are probed, the shared slots assigned, and every worker gets
//! the new pools through its control socket, all or nothing; then the change is logged.

use std::net::SocketAddr;

use super::workers::deliver;
use super::Supervisor;
use crate::rules::{self, Entry, Proto, RuleError, RuleSet, RulesError};
use crate::stats::now_ms;

impl Supervisor {
    /// Applies the rules file if it changed since it was last applied (or, with `force`, in any
    /// case); on any error the old rules stay in force.
    pub fn reload_from_file(&self, force: bool) -> Result<(), RulesError> {
        let Some(file) = self.config.rules.take_change(force) else {
            return Ok(());
        };
        if !force {
            tracing::info!("{} changed: reloading", self.config.rules.label());
        }
        let result = match &file.rules {
            Ok(set) => self.apply(set.clone()),
            Err(e) => Err(e.clone()),
        };
        if let Err(e) = &result {
            tracing::error!("rules not reloaded, the previous rules stay in force:\n{e}");
        }
        self.lock().reload_error = result.as_ref().err().map(|e| e.to_string());
        result
    }

    /// Why the last reload of the rules file was refused, if it was.
    pub fn reload_error(&self) -> Option<String> {
        self.lock().reload_error.clone()
    }

    /// Makes `new` the rules in force: new ports are checked for being free, then every worker
    /// switches over. Established connections are untouched.
    pub fn apply(&self, new: RuleSet) -> Result<(), RulesError> {
        crate::ranges::check_limits(
            &new,
            self.config.rules.label(),
            self.config.listen_budget,
            self.config
                .steering
                .as_ref()
                .map(|_| ())
                .map_err(|s| s.as_str()),
        )?;
        let steer = self.config.steering.is_ok();
        self.look_up_new_names(&new);
        let mut inner = self.lock();
        let mut errors = Vec::new();
        for (pool, fresh) in new_listeners(&inner.rules, &new, steer) {
            if let Some(e) = probe_pool(pool, fresh.into_iter(), self.config.rules.label()) {
                errors.push(e);
            }
        }
        if !errors.is_empty() {
            return Err(RulesError(errors));
        }
        // Slots are committed only once every worker took the rules.
        let mut slots = inner.slots.clone();
        let mut specs = match slots.assign(&new, &inner.answers, &self.shared) {
            Ok(s) => s,
            Err(e) => {
                return Err(RulesError(vec![RuleError {
                    file: self.config.rules.label().to_string(),
                    line: 0,
                    field: "row".into(),
                    message: e.to_string(),
                }]))
            }
        };
        crate::outbound::apply_default_sources(&mut specs, &self.config.default_sources);
        crate::ranges::mark_steered(&mut specs, &new, steer);
        crate::balance::tier::mark_returning(&inner.specs, &specs, &self.shared, now_ms());
        let failures = deliver(&mut inner.workers, &specs);
        if !failures.is_empty() {
            // All or nothing: put the workers that switched back on the rules in force.
            let previous = inner.specs.clone();
            for (worker, why) in deliver(&mut inner.workers, &previous) {
                tracing::error!(worker, "cannot return to the previous rules: {why}");
            }
            let file = self.config.rules.label().to_string();
            return Err(RulesError(
                failures
                    .into_iter()
                    .map(|(worker, why)| RuleError {
                        file: file.clone(),
                        line: 0,
                        field: "row".into(),
                        message: format!(
                            "worker {worker} could not apply the rules ({why}); the previous rules stay in force"
                        ),
                    })
                    .collect(),
            ));
        }
        self.shared.publish_rates(&specs);
        if let Ok(steering) = &self.config.steering {
            // After the workers listen on the ranges' first ports, so no redirect finds none.
            let ranges = crate::steer::steered_ranges(new.pools.iter());
            // Rules that steer nothing before or after leave the table as start-up left it (gone):
            // no `nft` run on every reload of a file without large ranges.
            let before = crate::steer::steered_ranges(inner.rules.pools.iter());
            if !(ranges.is_empty() && before.is_empty()) {
                match steering.sync(&ranges) {
                    Ok(()) => log_steering(steering, &ranges),
                    Err(e) => tracing::error!("nftables table {} not updated: {e}", steering.table),
                }
            }
        }
        inner.slots = slots;
        inner.reload_error = None;
        log_changes(&inner.rules, &new);
        inner.rules = new;
        inner.specs = specs;
        Ok(())
    }
}

/// Checks that nothing else holds `addr`: a bind without listen, with SO_REUSEPORT like the
/// workers, fails only when a socket that does not share the port has it.
fn probe_bind(addr: SocketAddr, proto: Proto) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let kind = match proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    let s = Socket::new(Domain::for_address(addr), kind, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())
}

/// Checks every listen address of `set` (for `--check` and start-up; a steered range listens
/// on its first port only).
pub fn check_bindable(set: &RuleSet, file: &str, steering: bool) -> Result<(), RulesError> {
    let errors: Vec<RuleError> = set
        .pools
        .iter()
        .filter_map(|p| probe_pool(p, crate::ranges::listen_addrs(p, steering), file))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RulesError(errors))
    }
}

/// Probes `addrs` of `pool` (all its ports, or those not listened on yet); the error names the
/// first port that cannot be listened on, and how many others of a range cannot either.
fn probe_pool(
    pool: &rules::Pool,
    addrs: impl Iterator<Item = SocketAddr>,
    file: &str,
) -> Option<RuleError> {
    let mut first: Option<(SocketAddr, std::io::Error)> = None;
    let mut more = 0usize;
    for addr in addrs {
        if let Err(e) = probe_bind(addr, pool.proto) {
            match first {
                None => first = Some((addr, e)),
                Some(_) => more += 1,
            }
        }
    }
    let (addr, e) = first?;
    let what = if pool.ports.is_single() {
        pool.label()
    } else {
        let suffix = if pool.proto == Proto::Udp { "/udp" } else { "" };
        let others = if more > 0 {
            format!(" and {more} more port(s) of the range")
        } else {
            String::new()
        };
        format!("{addr}{suffix} (of {}){others}", pool.label())
    };
    Some(RuleError {
        file: file.to_string(),
        line: pool.rules.first().map(|r| r.line).unwrap_or(0),
        field: "listen_port".into(),
        message: format!("cannot listen on {what}: {e}"),
    })
}

/// Logs how each steered range is served.
pub(super) fn log_steering(
    steering: &crate::steer::Steering,
    ranges: &[(SocketAddr, rules::PortRange)],
) {
    for (addr, ports) in ranges {
        tracing::info!(
            "{}:{ports}: steered to one listener on port {} by nftables table inet {} ({} ports: too many for one socket each)",
            addr.ip(),
            ports.first,
            steering.table,
            ports.len()
        );
    }
}

/// How one listen address (with its protocol) differs between two rule sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change<'a> {
    /// Not in the old set: its port must be probed before anything switches.
    New(&'a rules::Pool),
    /// Forwards elsewhere now (or with other options); established connections keep theirs.
    Changed(&'a rules::Pool),
    /// Gone: the workers stop listening; established connections stay.
    Removed(&'a rules::Pool),
}

/// Every listen address that is new, changed or removed from `old` to `new`, in the new set's
/// order and then the removed ones in the old set's order. A rewrite that only moves lines
/// changes nothing.
fn changes<'a>(old: &'a RuleSet, new: &'a RuleSet) -> Vec<Change<'a>> {
    let same = |a: &rules::Pool, b: &rules::Pool| a.listen == b.listen && a.proto == b.proto;
    let mut out: Vec<Change> = new
        .pools
        .iter()
        .filter_map(|p| match old.pools.iter().find(|o| same(o, p)) {
            None => Some(Change::New(p)),
            Some(o) if destinations(o) != destinations(p) => Some(Change::Changed(p)),
            Some(_) => None,
        })
        .collect();
    out.extend(
        old.pools
            .iter()
            .filter(|o| !new.pools.iter().any(|p| same(o, p)))
            .map(Change::Removed),
    );
    out
}

/// The addresses each pool of `new` listens on that `old` does not (every port of a range served
/// port by port, the first of a steered one).
fn new_listeners<'a>(
    old: &RuleSet,
    new: &'a RuleSet,
    steer: bool,
) -> Vec<(&'a rules::Pool, Vec<SocketAddr>)> {
    let held: std::collections::HashSet<(SocketAddr, Proto)> = old
        .pools
        .iter()
        .flat_map(|p| crate::ranges::listen_addrs(p, steer).map(|a| (a, p.proto)))
        .collect();
    new.pools
        .iter()
        .map(|p| {
            let fresh = crate::ranges::listen_addrs(p, steer)
                .filter(|a| !held.contains(&(*a, p.proto)))
                .collect();
            (p, fresh)
        })
        .filter(|(_, fresh): &(_, Vec<SocketAddr>)| !fresh.is_empty())
        .collect()
}

fn log_changes(old: &RuleSet, new: &RuleSet) {
    for change in changes(old, new) {
        match change {
            Change::New(p) => tracing::info!(listen = %p.label(), "new port: {}", describe_pool(p)),
            Change::Changed(p) => {
                tracing::info!(listen = %p.label(), "pool changed: {}", describe_pool(p))
            }
            Change::Removed(o) => {
                tracing::info!(listen = %o.label(), "port removed (established connections stay)")
            }
        }
    }
}

/// What a pool forwards to, without the line numbers a rewrite of the file shifts.
fn destinations(p: &rules::Pool) -> Vec<(&Entry, SocketAddr)> {
    p.rules.iter().map(|r| (&r.entry, r.dest)).collect()
}

/// `a 127.0.0.1:9001, b 127.0.0.1:9002` (a host name as written, a range as `ip:from-to`).
pub fn describe_pool(p: &rules::Pool) -> String {
    p.rules
        .iter()
        .map(|r| match r.entry.options.trim() {
            "" => format!("{} {}", r.entry.name, r.dest_label()),
            options => format!("{} {} [{options}]", r.entry.name, r.dest_label()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::parse;

    fn set(text: &str) -> RuleSet {
        parse(text, "entries.csv").unwrap()
    }

    fn labels(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::New(p) => format!("new {}", p.label()),
                Change::Changed(p) => format!("changed {}", p.label()),
                Change::Removed(p) => format!("removed {}", p.label()),
            })
            .collect()
    }

    #[test]
    fn only_new_addresses_are_probed() {
        let old = set("a,127.0.0.1:7101,127.0.0.1,9001\n");
        let new = set("a,127.0.0.1:7101,127.0.0.1,9002\nb,127.0.0.1:7102,127.0.0.1,9001\n");
        let probed: Vec<String> = new_listeners(&old, &new, false)
            .iter()
            .map(|(p, _)| p.label())
            .collect();
        assert_eq!(probed, ["127.0.0.1:7102"]);
        // A range grown by ten ports probes only the ten.
        let old = set("a,127.0.0.1:7200-7209,127.0.0.1,9001\n");
        let new = set("a,127.0.0.1:7200-7219,127.0.0.1,9001\n");
        let fresh = &new_listeners(&old, &new, false)[0].1;
        assert_eq!(fresh.len(), 10);
        assert_eq!(fresh[0], "127.0.0.1:7210".parse().unwrap());
    }

    #[test]
    fn the_same_port_in_the_other_protocol_is_new() {
        let old = set("a,127.0.0.1:7103,127.0.0.1,9001\n");
        let new = set("a,127.0.0.1:7103,127.0.0.1,9001\nu,127.0.0.1:7103/udp,127.0.0.1,9001\n");
        assert_eq!(labels(&changes(&old, &new)), ["new 127.0.0.1:7103/udp"]);
    }

    #[test]
    fn new_changed_and_removed_are_told_apart() {
        let old = set(
            "a,127.0.0.1:7104,127.0.0.1,9001\nb,127.0.0.1:7105,127.0.0.1,9001\nc,127.0.0.1:7106,127.0.0.1,9001\n",
        );
        let new = set(
            "a,127.0.0.1:7104,127.0.0.1,9001\nb,127.0.0.1:7105,127.0.0.1,9002\nd,127.0.0.1:7107,127.0.0.1,9001\n",
        );
        assert_eq!(
            labels(&changes(&old, &new)),
            [
                "changed 127.0.0.1:7105",
                "new 127.0.0.1:7107",
                "removed 127.0.0.1:7106"
            ]
        );
    }

    #[test]
    fn moving_lines_or_adding_comments_changes_nothing() {
        let old = set("a,127.0.0.1:7108,127.0.0.1,9001\nb,127.0.0.1:7109,127.0.0.1,9002\n");
        let new =
            set("# moved\n\nb,127.0.0.1:7109,127.0.0.1,9002\na,127.0.0.1:7108,127.0.0.1,9001\n");
        assert!(changes(&old, &new).is_empty());
    }

    #[test]
    fn a_changed_option_is_a_change() {
        let old = set("a,127.0.0.1:7110,127.0.0.1,9001\n");
        let new = set("a,127.0.0.1:7110,127.0.0.1,9001,send_proxy=v1\n");
        assert_eq!(labels(&changes(&old, &new)), ["changed 127.0.0.1:7110"]);
    }

    #[test]
    fn a_held_port_is_refused_naming_file_line_and_field() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let set = set(&format!("a,127.0.0.1:{port},127.0.0.1,9001\n"));
        let e = check_bindable(&set, "entries.csv", false).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!((e.0[0].file.as_str(), e.0[0].line), ("entries.csv", 1));
        assert_eq!(e.0[0].field, "listen_port");
        assert!(e.0[0]
            .message
            .starts_with(&format!("cannot listen on 127.0.0.1:{port}: ")));
    }
}
