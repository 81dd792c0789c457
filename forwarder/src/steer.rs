//! Steering a large TCP port range to one listening socket: an nftables table of the forwarder's
//! own redirects every port of the range to the range's first port, where each worker has one
//! listener; the port the client reached is read back from conntrack (`SO_ORIGINAL_DST`). So a
//! 20,000-port range costs each worker one descriptor instead of 20,000. The supervisor installs
//! the table, rewrites it (one atomic `nft -f` transaction) when the rules change, deletes it on
//! exit, and deletes a table left by a crash when it starts again on the same rules file.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::rules::{Pool, PortRange, Proto};

/// Ranges of at least this many ports are steered when steering is available; smaller ones are
/// listened on port by port (a few hundred descriptors is cheap, and needs no privilege).
pub const STEER_MIN_PORTS: u16 = 256;

/// Prefix of the forwarder's nftables tables (another feature's tables have other names).
pub const TABLE_PREFIX: &str = "forwarder_ranges";

/// Whether `pool` is steered when steering is available.
pub fn wants_steering(pool: &Pool) -> bool {
    pool.proto == Proto::Tcp && pool.ports.len() >= STEER_MIN_PORTS
}

/// The forwarder's nftables table.
#[derive(Debug, Clone)]
pub struct Steering {
    /// `forwarder_ranges_<hash of the rules file's path>`: the same forwarder finds its own
    /// table again after a crash; two forwarders on other files never touch each other's.
    pub table: String,
}

impl Steering {
    /// The table for the forwarder of `rules_file`, if `nft` runs and may change the ruleset
    /// (root or `CAP_NET_ADMIN`); the error says why steering is unavailable. A table left by an
    /// earlier run that crashed is replaced by the first [`Steering::sync`] at start.
    pub fn probe(rules_file: &Path) -> Result<Steering, String> {
        let path = std::fs::canonicalize(rules_file).unwrap_or_else(|_| rules_file.to_path_buf());
        let table = format!(
            "{TABLE_PREFIX}_{:016x}",
            fnv1a(path.as_os_str().as_encoded_bytes())
        );
        let steering = Steering { table };
        // Creating (then deleting) a table in one transaction is the test of privilege; one of
        // its own, so that `--check` never touches the table of a forwarder running on the file.
        steering
            .run(&format!(
                "table inet {t} {{}}\ndelete table inet {t}\n",
                t = format_args!("{TABLE_PREFIX}_probe_{}", std::process::id())
            ))
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => "no nft command (install nftables)".to_string(),
                _ => format!("nft cannot change the ruleset: {e}"),
            })?;
        Ok(steering)
    }

    /// The whole table for `ranges` (listen address and ports), as one `nft -f` script that
    /// replaces what was there; deletes the table when `ranges` is empty. Sans-IO.
    pub fn script(&self, ranges: &[(SocketAddr, PortRange)]) -> String {
        let t = &self.table;
        // Declaring the table first makes the delete succeed whether or not it exists.
        let mut s = format!("table inet {t} {{}}\ndelete table inet {t}\n");
        if ranges.is_empty() {
            return s;
        }
        let mut rules = String::new();
        for (addr, ports) in ranges {
            let dport = format!("tcp dport {}-{}", ports.first, ports.last);
            let line = match addr.ip() {
                // Only connections to this host's own addresses: traffic routed through it, and
                // the forwarder's own connections to backends elsewhere, are left alone.
                IpAddr::V4(ip) if ip.is_unspecified() => format!(
                    "meta nfproto ipv4 fib daddr type local {dport} redirect to :{}",
                    ports.first
                ),
                IpAddr::V4(ip) => format!("ip daddr {ip} {dport} dnat ip to {ip}:{}", ports.first),
                IpAddr::V6(ip) if ip.is_unspecified() => format!(
                    "meta nfproto ipv6 fib daddr type local {dport} redirect to :{}",
                    ports.first
                ),
                IpAddr::V6(ip) => {
                    format!("ip6 daddr {ip} {dport} dnat ip6 to [{ip}]:{}", ports.first)
                }
            };
            rules.push_str("\t\t");
            rules.push_str(&line);
            rules.push('\n');
        }
        s.push_str(&format!(
            "table inet {t} {{\n\
             \tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{rules}\t}}\n\
             \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n{rules}\t}}\n\
             }}\n"
        ));
        s
    }

    /// Makes the table steer exactly `ranges`.
    pub fn sync(&self, ranges: &[(SocketAddr, PortRange)]) -> io::Result<()> {
        self.run(&self.script(ranges))
    }

    /// Deletes the table (on exit).
    pub fn remove(&self) {
        if let Err(e) = self.sync(&[]) {
            tracing::warn!("cannot delete nftables table {}: {e}", self.table);
        }
    }

    fn run(&self, script: &str) -> io::Result<()> {
        let mut child = Command::new("nft")
            .arg("-f")
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    }
}

/// The steered ranges of `pools` (those [`wants_steering`] picks).
pub fn steered_ranges<'a>(pools: impl Iterator<Item = &'a Pool>) -> Vec<(SocketAddr, PortRange)> {
    pools
        .filter(|p| wants_steering(p))
        .map(|p| (p.listen, p.ports))
        .collect()
}

/// The address a redirected connection was made to, from conntrack (`SO_ORIGINAL_DST`); for a
/// connection that was not redirected, the address it reached.
pub fn original_dst(fd: RawFd, v6: bool) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: getsockopt writes at most `len` bytes into storage we own, and says how many.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
        if libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        match storage.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    0,
                    0,
                )))
            }
            _ => Err(io::Error::other("SO_ORIGINAL_DST: unknown address family")),
        }
    }
}

/// FNV-1a, 64 bits: a fixed hash, so the same path names the same table in every run.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_replaces_the_whole_table_atomically() {
        let s = Steering {
            table: "forwarder_ranges_t".into(),
        };
        let r = |a, b| PortRange { first: a, last: b };
        let text = s.script(&[
            ("0.0.0.0:20000".parse().unwrap(), r(20000, 39999)),
            ("10.0.0.1:5000".parse().unwrap(), r(5000, 5999)),
        ]);
        assert!(text.starts_with(
            "table inet forwarder_ranges_t {}\ndelete table inet forwarder_ranges_t\ntable inet forwarder_ranges_t {\n"
        ));
        assert!(text.contains(
            "meta nfproto ipv4 fib daddr type local tcp dport 20000-39999 redirect to :20000\n"
        ));
        assert!(text.contains("ip daddr 10.0.0.1 tcp dport 5000-5999 dnat ip to 10.0.0.1:5000\n"));
        assert_eq!(
            text.matches("redirect to :20000").count(),
            2,
            "prerouting and output"
        );
        assert_eq!(
            s.script(&[]),
            "table inet forwarder_ranges_t {}\ndelete table inet forwarder_ranges_t\n"
        );
    }
}
