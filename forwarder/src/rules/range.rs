//! Port ranges in the rules: `FROM-TO` in `listen_port` (alone, after `ADDR:`, before `/udp`)
//! and in `dest_port`, and the index that finds which pool already holds a port. Sans-IO and
//! public, so the parser can be fuzzed and property-tested on its own.

use std::fmt;

use super::Proto;

/// Ports `first..=last` (one port when they are equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// One port.
    pub fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// How many ports (1 for a single port; at most 65,535 since port 0 is never allowed).
    pub fn len(&self) -> u16 {
        self.last - self.first + 1
    }

    /// Never true (a range holds at least one port); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn is_single(&self) -> bool {
        self.first == self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A port 1..=65535.
pub fn parse_port(field: &str) -> Result<u16, String> {
    if field.is_empty() {
        return Err("port is empty".into());
    }
    match field.parse::<u32>() {
        Ok(0) => Err("port 0 is not allowed".into()),
        Ok(p) if p <= 65535 => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("\"{field}\" is not a port number")),
    }
}

/// `PORT` or `FROM-TO` (FROM not above TO), each port 1..=65535.
pub fn parse_port_range(field: &str) -> Result<PortRange, String> {
    let Some((from, to)) = field.split_once('-') else {
        return parse_port(field).map(PortRange::single);
    };
    let first = parse_port(from.trim()).map_err(|m| format!("range \"{field}\": {m}"))?;
    let last = parse_port(to.trim()).map_err(|m| format!("range \"{field}\": {m}"))?;
    if first > last {
        return Err(format!(
            "range \"{field}\" runs backwards: write {last}-{first}"
        ));
    }
    Ok(PortRange { first, last })
}

/// Which line's pool holds each port, per transport: finds an overlap in time linear in the
/// number of ports written (a range of 20,000 ports is 20,000 steps, never rows × rows).
#[derive(Debug, Default)]
pub struct PortIndex {
    /// Per transport, per port: index into `owners` + 1 (0 = free).
    tcp: Vec<u32>,
    udp: Vec<u32>,
    owners: Vec<Owner>,
}

/// The first row that claimed a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub range: PortRange,
    pub line: usize,
}

impl PortIndex {
    fn table(&mut self, proto: Proto) -> &mut Vec<u32> {
        let t = match proto {
            Proto::Tcp => &mut self.tcp,
            Proto::Udp => &mut self.udp,
        };
        if t.is_empty() {
            t.resize(65_536, 0);
        }
        t
    }

    /// Claims `range` for `line`. The same range again (another row of the same pool) is fine
    /// and returns its first owner; a range overlapping another one is refused with that one.
    pub fn claim(&mut self, range: PortRange, proto: Proto, line: usize) -> Result<Owner, Owner> {
        let owners_len = self.owners.len();
        let table = self.table(proto);
        let here = table[range.first as usize];
        if here != 0 {
            let owner = self.owners[here as usize - 1];
            return if owner.range == range {
                Ok(owner)
            } else {
                Err(owner)
            };
        }
        if let Some(&taken) = table[range.first as usize..=range.last as usize]
            .iter()
            .find(|&&o| o != 0)
        {
            return Err(self.owners[taken as usize - 1]);
        }
        let id = owners_len as u32 + 1;
        table[range.first as usize..=range.last as usize].fill(id);
        let owner = Owner { range, line };
        self.owners.push(owner);
        Ok(owner)
    }
}

/// The overlap message, naming both lines' ports: `27050 is already in 27000-27099 (line 3)`.
pub fn overlap_message(mine: PortRange, theirs: Owner, proto: Proto) -> String {
    let suffix = match proto {
        Proto::Tcp => "",
        Proto::Udp => "/udp",
    };
    let (t, line) = (theirs.range, theirs.line);
    if mine.is_single() {
        format!("{mine}{suffix} is already in {t}{suffix} (line {line})")
    } else if t.is_single() {
        format!("{mine}{suffix} includes {t}{suffix} (line {line})")
    } else {
        format!("{mine}{suffix} overlaps {t}{suffix} (line {line})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_parse_and_refuse_clearly() {
        assert_eq!(
            parse_port_range("27000-27099"),
            Ok(PortRange {
                first: 27000,
                last: 27099
            })
        );
        assert_eq!(parse_port_range("443"), Ok(PortRange::single(443)));
        assert_eq!(
            parse_port_range("9-5").unwrap_err(),
            "range \"9-5\" runs backwards: write 5-9"
        );
        assert_eq!(
            parse_port_range("0-5").unwrap_err(),
            "range \"0-5\": port 0 is not allowed"
        );
        assert_eq!(
            parse_port_range("1-70000").unwrap_err(),
            "range \"1-70000\": port 70000 is out of range 1-65535"
        );
        assert_eq!(
            parse_port_range("1-").unwrap_err(),
            "range \"1-\": port is empty"
        );
    }

    #[test]
    fn the_index_finds_overlaps_and_lets_a_pool_repeat_its_range() {
        let mut idx = PortIndex::default();
        let r = |a, b| PortRange { first: a, last: b };
        assert!(idx.claim(r(27000, 27099), Proto::Tcp, 3).is_ok());
        assert_eq!(
            idx.claim(r(27000, 27099), Proto::Tcp, 4).unwrap().line,
            3,
            "same range: same pool"
        );
        let e = idx
            .claim(PortRange::single(27050), Proto::Tcp, 7)
            .unwrap_err();
        assert_eq!(
            overlap_message(PortRange::single(27050), e, Proto::Tcp),
            "27050 is already in 27000-27099 (line 3)"
        );
        assert!(
            idx.claim(PortRange::single(27050), Proto::Udp, 8).is_ok(),
            "transports apart"
        );
        let e = idx.claim(r(26000, 27000), Proto::Tcp, 9).unwrap_err();
        assert_eq!(
            overlap_message(r(26000, 27000), e, Proto::Tcp),
            "26000-27000 overlaps 27000-27099 (line 3)"
        );
        let e = idx.claim(r(27000, 27010), Proto::Tcp, 10).unwrap_err();
        assert_eq!(e.line, 3, "same first port, other length");
        assert!(idx.claim(PortRange::single(8080), Proto::Tcp, 11).is_ok());
        let e = idx.claim(r(8000, 8999), Proto::Tcp, 12).unwrap_err();
        assert_eq!(
            overlap_message(r(8000, 8999), e, Proto::Udp),
            "8000-8999/udp includes 8080/udp (line 11)"
        );
    }

    proptest! {
        #[test]
        fn any_text_parses_or_says_why(text in "[0-9 -]{0,14}|.{0,12}") {
            match parse_port_range(&text) {
                Ok(r) => {
                    prop_assert!(r.first >= 1 && r.first <= r.last);
                    prop_assert_eq!(parse_port_range(&r.to_string()), Ok(r));
                }
                Err(m) => prop_assert!(!m.is_empty()),
            }
        }

        #[test]
        fn written_ranges_read_back(a in 1u16.., b in 1u16..) {
            let r = PortRange { first: a.min(b), last: a.max(b) };
            prop_assert_eq!(parse_port_range(&r.to_string()), Ok(r));
            prop_assert_eq!(r.len() as u32, r.last as u32 - r.first as u32 + 1);
        }

        #[test]
        fn the_index_agrees_with_a_naive_check(
            ranges in proptest::collection::vec((1u16..200, 0u16..20), 1..30)
        ) {
            let mut idx = PortIndex::default();
            let mut kept: Vec<PortRange> = Vec::new();
            for (line, (first, len)) in ranges.into_iter().enumerate() {
                let r = PortRange { first, last: first.saturating_add(len) };
                let naive = kept.iter().find(|k| k.first <= r.last && r.first <= k.last).copied();
                match (idx.claim(r, Proto::Tcp, line), naive) {
                    (Ok(o), Some(k)) => prop_assert_eq!(o.range, k),
                    (Ok(_), None) => kept.push(r),
                    (Err(o), Some(_)) => prop_assert!(o.range != r),
                    (Err(o), None) => prop_assert!(false, "index refused {:?} for {:?}", r, o),
                }
            }
        }
    }
}
