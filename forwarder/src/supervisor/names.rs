//! Backend host names for the supervisor: looked up once before the workers start, then again by
//! the `dns` thread whenever an answer's TTL ran out (outside the lock); a changed answer becomes
//! changed pool members for the workers. Connections already open stay where they are.

use std::time::{Duration, Instant};

use super::workers::deliver;
use super::{Inner, Supervisor};
use crate::dns::{self, Answer, Answers, DnsConfig, Outcome, Resolver};
use crate::rules::RuleSet;
use crate::stats::now_ms;

/// How often the thread looks for answers that ran out.
const TICK: Duration = Duration::from_millis(200);

/// Every host name the rules use, once.
fn host_names(rules: &RuleSet) -> Vec<String> {
    let mut names: Vec<String> = rules.rules().filter_map(|r| r.host.clone()).collect();
    names.sort();
    names.dedup();
    names
}

/// The first answers, before any worker starts: a name that resolves serves from the first
/// connection; one that does not leaves its backend down (said once), not the file refused.
pub(super) fn first_answers(config: &DnsConfig, rules: &RuleSet) -> anyhow::Result<Answers> {
    let mut answers = Answers::default();
    let names = host_names(rules);
    if names.is_empty() {
        return Ok(answers);
    }
    let resolver = Resolver::new(config)?;
    for host in names {
        let (answer, _) = dns::fold(None, resolver.lookup(&host), config, Instant::now());
        if answer.addrs.is_empty() {
            tracing::warn!("{}", dns::describe(&host, Some(&answer)));
        } else {
            tracing::info!("{}", dns::describe(&host, Some(&answer)));
        }
        answers.insert(host, answer);
    }
    Ok(answers)
}

impl Supervisor {
    /// Looks up, before a reload applies, the names of `new` that have no answer yet (outside
    /// the lock), so a live edit with a name that resolves serves from its first connection.
    pub(super) fn look_up_new_names(&self, new: &RuleSet) {
        let missing: Vec<String> = {
            let inner = self.lock();
            host_names(new)
                .into_iter()
                .filter(|h| !inner.answers.contains_key(h))
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let config = self.config.dns;
        let resolver = match Resolver::new(&config) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot resolve host names: {e:#}");
                return;
            }
        };
        let found: Vec<(String, Answer)> = missing
            .into_iter()
            .map(|host| {
                let (answer, _) = dns::fold(None, resolver.lookup(&host), &config, Instant::now());
                if answer.addrs.is_empty() {
                    tracing::warn!("{}", dns::describe(&host, Some(&answer)));
                } else {
                    tracing::info!("{}", dns::describe(&host, Some(&answer)));
                }
                (host, answer)
            })
            .collect();
        let mut inner = self.lock();
        for (host, answer) in found {
            inner.answers.entry(host).or_insert(answer);
        }
    }

    /// Starts the `dns` thread.
    pub(super) fn start_dns(&self) {
        let me = self.clone();
        let config = self.config.dns;
        let spawned = std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || {
                let mut resolver: Option<Resolver> = None;
                loop {
                    std::thread::sleep(TICK);
                    let due = me.names_due();
                    if due.is_empty() {
                        continue;
                    }
                    if resolver.is_none() {
                        match Resolver::new(&config) {
                            Ok(r) => resolver = Some(r),
                            Err(e) => {
                                tracing::error!("cannot resolve host names: {e:#}");
                                std::thread::sleep(config.min_ttl);
                                continue;
                            }
                        }
                    }
                    let Some(r) = resolver.as_ref() else { continue };
                    for (host, previous) in due {
                        let result = r.lookup(&host);
                        let (answer, outcome) =
                            dns::fold(previous.as_ref(), result, &config, Instant::now());
                        match outcome {
                            Outcome::Changed => tracing::info!(
                                "{} (was {})",
                                dns::describe(&host, Some(&answer)),
                                previous
                                    .as_ref()
                                    .map_or("unresolved".to_string(), |p| dns::list(&p.addrs))
                            ),
                            Outcome::FailedFirst => {
                                tracing::warn!("{}", dns::describe(&host, Some(&answer)))
                            }
                            Outcome::FailedAgain | Outcome::Same => {}
                        }
                        let mut inner = me.lock();
                        inner.answers.insert(host, answer);
                        if outcome == Outcome::Changed {
                            me.reassign(&mut inner);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the dns thread: {e}");
        }
    }

    /// The names of the rules in force whose answer ran out (or that were never asked).
    fn names_due(&self) -> Vec<(String, Option<Answer>)> {
        let inner = self.lock();
        let now = Instant::now();
        host_names(&inner.rules)
            .into_iter()
            .filter_map(|h| {
                let a = inner.answers.get(&h).cloned();
                let due = a.as_ref().and_then(|a| a.next_at).is_none_or(|t| t <= now);
                due.then_some((h, a))
            })
            .collect()
    }

    /// Gives the workers the members the current answers make of the rules in force; when a
    /// worker refuses them, every worker goes back to the previous members.
    fn reassign(&self, inner: &mut Inner) {
        let mut slots = inner.slots.clone();
        let specs = match slots.assign(&inner.rules, &inner.answers, &self.shared) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("new addresses not applied: {e}");
                return;
            }
        };
        crate::balance::tier::mark_returning(&inner.specs, &specs, &self.shared, now_ms());
        if !deliver(&mut inner.workers, &specs).is_empty() {
            let previous = inner.specs.clone();
            for (worker, why) in deliver(&mut inner.workers, &previous) {
                tracing::error!(worker, "cannot return to the previous members: {why}");
            }
            return;
        }
        inner.slots = slots;
        inner.specs = specs;
    }
}
