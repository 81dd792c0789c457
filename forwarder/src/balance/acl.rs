//! A pool's access list compiled for the accept path: the allow and deny CIDRs as sorted,
//! merged address ranges, so admitting a client is two binary searches whatever the list's
//! length (a 1,000-CIDR list costs about ten comparisons, not a thousand).

use std::net::IpAddr;

use ipnet::IpNet;

/// Sorted, non-overlapping inclusive ranges of one address family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ranges<T> {
    spans: Vec<(T, T)>,
}

impl<T: Ord + Copy + One> Ranges<T> {
    fn build(mut spans: Vec<(T, T)>) -> Ranges<T> {
        spans.sort();
        let mut merged: Vec<(T, T)> = Vec::with_capacity(spans.len());
        for (lo, hi) in spans {
            match merged.last_mut() {
                // Overlapping or adjacent: one range.
                Some(last) if lo <= last.1.saturating_inc() => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ranges { spans: merged }
    }

    fn contains(&self, x: T) -> bool {
        // The last range starting at or before x is the only one that can hold it.
        let i = self.spans.partition_point(|&(lo, _)| lo <= x);
        i > 0 && x <= self.spans[i - 1].1
    }
}

/// `saturating_add(1)` for both widths.
trait One {
    fn saturating_inc(self) -> Self;
}
impl One for u32 {
    fn saturating_inc(self) -> Self {
        self.saturating_add(1)
    }
}
impl One for u128 {
    fn saturating_inc(self) -> Self {
        self.saturating_add(1)
    }
}

/// One list (allow or deny) of both families.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct List {
    v4: Ranges<u32>,
    v6: Ranges<u128>,
    /// The list has entries (false for the default, empty list).
    any: bool,
}

impl List {
    fn build(nets: &[IpNet]) -> List {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        List {
            v4: Ranges::build(v4),
            v6: Ranges::build(v6),
            any: !nets.is_empty(),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(u32::from(a)),
            IpAddr::V6(a) => self.v6.contains(u128::from(a)),
        }
    }
}

/// Who may connect to a pool: deny wins; without an allow list everyone not denied may.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    allow: List,
    deny: List,
}

impl Acl {
    /// The pool's lists over the forwarder's defaults (`--allow`/`--deny`): a pool's own allow
    /// list replaces the default one; the default deny list applies to every pool as well.
    pub fn build(
        allow: &[IpNet],
        deny: &[IpNet],
        default_allow: &[IpNet],
        default_deny: &[IpNet],
    ) -> Acl {
        let allow = if allow.is_empty() {
            default_allow
        } else {
            allow
        };
        let deny: Vec<IpNet> = deny.iter().chain(default_deny).copied().collect();
        Acl {
            allow: List::build(allow),
            deny: List::build(&deny),
        }
    }

    /// True when the pool has no list at all (the accept path skips the check).
    pub fn is_open(&self) -> bool {
        !self.allow.any && !self.deny.any
    }

    /// Whether `client` may connect.
    pub fn admits(&self, client: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d; lists say a.b.c.d.
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            v4 => v4,
        };
        if self.deny.contains(client) {
            return false;
        }
        !self.allow.any || self.allow.contains(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::options::{parse_options, Proto};

    fn nets(s: &str) -> Vec<IpNet> {
        s.split(',').map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn deny_wins_and_no_allow_admits_everyone_else() {
        let acl = Acl::build(
            &nets("10.0.0.0/24,2001:db8::/32"),
            &nets("10.0.0.66/32"),
            &[],
            &[],
        );
        let ok = |s: &str| acl.admits(s.parse().unwrap());
        assert!(ok("10.0.0.0") && ok("10.0.0.255") && ok("10.0.0.65") && ok("10.0.0.67"));
        assert!(!ok("10.0.0.66"));
        assert!(!ok("10.0.1.0") && !ok("9.255.255.255"));
        assert!(ok("2001:db8:ffff::1") && !ok("2001:db9::1"));
        assert!(ok("::ffff:10.0.0.7") && !ok("::ffff:10.0.0.66"));
        let open = Acl::build(&[], &nets("127.0.0.5/32"), &[], &[]);
        assert!(open.admits("8.8.8.8".parse().unwrap()));
        assert!(!open.admits("127.0.0.5".parse().unwrap()));
        assert!(Acl::default().is_open() && !open.is_open());
    }

    #[test]
    fn defaults_fill_in_and_a_pool_allow_list_replaces_the_default() {
        let d_allow = nets("127.0.0.0/8");
        let d_deny = nets("127.0.0.9/32");
        let acl = Acl::build(&[], &[], &d_allow, &d_deny);
        assert!(acl.admits("127.0.0.1".parse().unwrap()));
        assert!(!acl.admits("127.0.0.9".parse().unwrap()));
        assert!(!acl.admits("10.0.0.1".parse().unwrap()));
        let own = Acl::build(&nets("10.0.0.0/8"), &[], &d_allow, &d_deny);
        assert!(own.admits("10.0.0.1".parse().unwrap()));
        assert!(!own.admits("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn ranges_agree_with_a_linear_scan_of_the_same_list() {
        // Overlapping, nested and adjacent CIDRs of both families, against PoolOptions::admits.
        let text =
            "allow=10.0.0.0/8,10.1.0.0/16,11.0.0.0/8,12.0.0.0/31,12.0.0.2/31,192.168.1.7,::/0 \
                    deny=10.200.0.0/16,12.0.0.1,2001:db8::/33";
        let opts = parse_options(text, Proto::Tcp).unwrap().pool;
        let acl = Acl::build(&opts.allow, &opts.deny, &[], &[]);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ip: IpAddr = match i % 3 {
                0 => IpAddr::V4(((x as u32) & 0x0fff_ffff | 0x0a00_0000).into()),
                1 => IpAddr::V4((x as u32).into()),
                _ => IpAddr::V6(((0x2001_0db8u128 << 96) | (x as u128) << 64).into()),
            };
            assert_eq!(acl.admits(ip), opts.admits(ip), "{ip}");
        }
        for edge in [
            "12.0.0.0",
            "12.0.0.1",
            "12.0.0.3",
            "12.0.0.4",
            "192.168.1.7",
            "192.168.1.8",
        ] {
            let ip = edge.parse().unwrap();
            assert_eq!(acl.admits(ip), opts.admits(ip), "{edge}");
        }
    }
}
