//! Routing by TLS server name: which backends of a pool serve the name a ClientHello asked for.
//! Built once per reload from the rows' `sni=` names. Each distinct set of backends becomes a
//! group served as a pool of its own (a [`ServedPool`] holding only those backends, counting into
//! the same slots), so every balancing option works inside a group unchanged. Rows without
//! `sni` form the default group: names nothing matches, ClientHellos without a name, non-TLS
//! clients.

use std::collections::HashMap;
use std::rc::Rc;

use super::ServedPool;
use crate::control::PoolSpec;

/// A pool's routes by server name.
#[derive(Debug)]
pub struct SniRoutes {
    /// Exact name → group.
    exact: HashMap<String, usize>,
    /// `*.example.com` is stored as `example.com`: a name whose first label is dropped looks
    /// it up (so it matches exactly one label).
    wildcard: HashMap<String, usize>,
    default: Option<usize>,
    groups: Vec<Rc<ServedPool>>,
}

impl SniRoutes {
    /// The routes of `spec`, or `None` when no row carries `sni` (the pool routes as before).
    pub fn build(
        spec: &PoolSpec,
        build_group: impl Fn(PoolSpec) -> ServedPool,
    ) -> Option<SniRoutes> {
        if spec.backends.iter().all(|b| b.options.sni.is_empty()) {
            return None;
        }
        // Name → backend indices, in file order.
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut default = Vec::new();
        for (i, b) in spec.backends.iter().enumerate() {
            if b.options.sni.is_empty() {
                default.push(i);
            }
            for name in &b.options.sni {
                by_name.entry(name.as_str()).or_default().push(i);
            }
        }
        let mut group_of: HashMap<Vec<usize>, usize> = HashMap::new();
        let mut groups = Vec::new();
        let mut group = |members: &Vec<usize>| -> usize {
            *group_of.entry(members.clone()).or_insert_with(|| {
                let mut sub = spec.clone();
                sub.backends = members.iter().map(|&i| spec.backends[i].clone()).collect();
                groups.push(Rc::new(build_group(sub)));
                groups.len() - 1
            })
        };
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (name, members) in &by_name {
            let g = group(members);
            match name.strip_prefix("*.") {
                Some(suffix) => wildcard.insert(suffix.to_string(), g),
                None => exact.insert(name.to_string(), g),
            };
        }
        let default = (!default.is_empty()).then(|| group(&default));
        Some(SniRoutes {
            exact,
            wildcard,
            default,
            groups,
        })
    }

    /// The group serving `name` (already lower case), else the default group; `None` when
    /// neither exists.
    pub fn route(&self, name: Option<&str>) -> Option<Rc<ServedPool>> {
        let by_name = name.and_then(|n| {
            self.exact.get(n).or_else(|| {
                let (_, parent) = n.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        by_name
            .or(self.default.as_ref())
            .map(|&g| Rc::clone(&self.groups[g]))
    }
}

#[cfg(test)]
mod tests {
    use crate::balance::ServedPool;
    use crate::rules::parse;
    use crate::stats::Shared;
    use crate::supervisor::slots::Slots;

    fn routes(text: &str) -> ServedPool {
        let set = parse(text, "f").unwrap();
        let shared = Shared::create().unwrap();
        let spec = Slots::default()
            .assign(&set, &Default::default(), &shared)
            .unwrap()
            .remove(0);
        ServedPool::new(spec, &[], &[])
    }

    fn names(pool: &ServedPool, name: Option<&str>) -> Option<Vec<String>> {
        let g = pool.sni.as_ref().unwrap().route(name)?;
        Some(g.spec.backends.iter().map(|b| b.name.clone()).collect())
    }

    #[test]
    fn exact_then_one_label_wildcard_then_default() {
        let p = routes(
            "a1,443,127.0.0.1,1,sni=a.test\na2,443,127.0.0.1,2,\"sni=a.test weight=2\"\nw,443,127.0.0.1,3,\"sni=*.example.com,b.test\"\nd,443,127.0.0.1,4\n",
        );
        assert_eq!(names(&p, Some("a.test")).unwrap(), ["a1", "a2"]);
        assert_eq!(names(&p, Some("x.example.com")).unwrap(), ["w"]);
        assert_eq!(names(&p, Some("b.test")).unwrap(), ["w"]);
        assert_eq!(
            names(&p, Some("x.y.example.com")).unwrap(),
            ["d"],
            "one label only"
        );
        assert_eq!(names(&p, Some("example.com")).unwrap(), ["d"]);
        assert_eq!(names(&p, None).unwrap(), ["d"]);
        let g = p.sni.as_ref().unwrap().route(Some("a.test")).unwrap();
        assert_eq!(
            g.spec.slot, p.spec.slot,
            "a group counts into its pool's slots"
        );
        assert_eq!(g.spec.backends[1].options.weight, 2);
        assert!(g.sni.is_none());
    }

    #[test]
    fn without_a_default_unmatched_names_have_no_route() {
        let p = routes("a,443,127.0.0.1,1,sni=a.test\n");
        assert!(names(&p, Some("b.test")).is_none());
        assert!(names(&p, None).is_none());
        assert!(
            routes("a,443,127.0.0.1,1\n").sni.is_none(),
            "no sni: no routes"
        );
    }
}
