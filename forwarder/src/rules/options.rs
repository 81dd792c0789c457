//! The optional fifth column of a rule: space-separated `key=value` items. Some concern the row's
//! backend (`weight`, `send_proxy`, `max_conns`, `backup`, `drain`, `disabled`, `slowstart`), the
//! others the whole pool (`balance`, `allow`,
//! `deny`, `accept_proxy`, `max_conns_per_ip`), which any row of the pool may carry as long as no
//! two rows disagree. Parsed here into types, so nothing downstream reads the text again.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Largest `weight`.
pub const MAX_WEIGHT: u32 = 256;

/// Transport of a rule: `PORT` or `PORT/tcp` is TCP, `PORT/udp` UDP.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// How a pool picks a backend for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// In turn, across all workers (smooth weighted when weights differ).
    #[default]
    RoundRobin,
    /// The backend with the fewest open connections across all workers.
    LeastConn,
    /// A hash of the client address: the same client lands on the same backend.
    Source,
}

/// PROXY protocol header version sent to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    V1,
    V2,
}

/// Options of one row's backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendOptions {
    /// Share of new connections relative to the pool's other backends (1–256).
    pub weight: u32,
    /// Send a PROXY protocol header with the client's address before any byte.
    pub send_proxy: Option<ProxyVersion>,
    /// Most connections open to this backend at once (0 = no limit).
    pub max_conns: u64,
    /// The address the forwarder's socket toward this backend is bound to (`source=`; else
    /// `--source`, else the route's choice).
    #[serde(default)]
    pub source: Option<IpAddr>,
    /// The interface that socket is bound to (`interface=`, `SO_BINDTODEVICE`).
    #[serde(default)]
    pub interface: Option<String>,
    /// The mark its packets carry (`mark=`, `SO_MARK`), for policy routing and nft.
    #[serde(default)]
    pub mark: Option<u32>,
    /// `transparent`: the connection to the backend carries the client's address as its source
    /// (`IP_TRANSPARENT`); replies come back through `forwarder transparent-setup`'s routing.
    #[serde(default)]
    pub transparent: bool,
    /// `sni=`: the TLS server names this backend serves (lower case; `*.example.com` matches
    /// one label). Empty: the row takes no part in SNI routing, or is its pool's default route.
    #[serde(default)]
    pub sni: Vec<String>,
    /// A backup: new connections only while no primary of the pool can take one.
    #[serde(default)]
    pub backup: bool,
    /// Taken out of service by the operator (`drain` or `disabled`); kept across restarts
    /// because it is written in the rules file.
    #[serde(default)]
    pub admin: Admin,
    /// Ramp from a small share to the full weight over this long after coming back (0 = off).
    #[serde(default)]
    pub slowstart_ms: u64,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            weight: 1,
            send_proxy: None,
            max_conns: 0,
            source: None,
            interface: None,
            mark: None,
            transparent: false,
            sni: Vec::new(),
            backup: false,
            admin: Admin::Active,
            slowstart_ms: 0,
        }
    }
}

/// Whether the operator lets a backend take new connections. Neither `drain` nor `disabled` cuts
/// an open connection; a drained backend is still health-checked, a disabled one is not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    #[default]
    Active,
    Drain,
    Disabled,
}

impl Admin {
    /// How the page, the API and `/metrics` name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Admin::Active => "active",
            Admin::Drain => "drain",
            Admin::Disabled => "disabled",
        }
    }

    /// `active`, `drain` or `disabled` (what the API takes).
    pub fn parse(text: &str) -> Option<Admin> {
        match text {
            "active" => Some(Admin::Active),
            "drain" => Some(Admin::Drain),
            "disabled" => Some(Admin::Disabled),
            _ => None,
        }
    }
}

/// Most `slowstart`: an hour.
pub const MAX_SLOWSTART_MS: u64 = 3_600_000;

/// Options of a whole pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolOptions {
    pub balance: Balance,
    /// Clients allowed to connect (empty = everyone not denied).
    pub allow: Vec<IpNet>,
    /// Clients refused (wins over `allow`).
    pub deny: Vec<IpNet>,
    /// Connections arrive from another proxy with a PROXY protocol header naming the client.
    pub accept_proxy: bool,
    /// Most connections one client address may have open at once (0 = no limit).
    pub max_conns_per_ip: u64,
    /// Bandwidth limits: per connection, per client address, for the whole pool.
    #[serde(default)]
    pub rates: crate::rate::Rates,
}

impl PoolOptions {
    /// Whether `client` may use the pool: not denied, and allowed when there is an allow list.
    pub fn admits(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        if self.deny.iter().any(|n| n.contains(&client)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&client))
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, how a dual-stack socket reports an IPv4
/// client) as the IPv4 address lists are written with.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The options of one row: its backend's, and what it says about its pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowOptions {
    pub backend: BackendOptions,
    pub pool: PoolOptions,
    /// The pool-wide keys the row wrote (only those must agree with other rows).
    pub pool_keys: Vec<&'static str>,
}

/// Every key, with whether it is pool-wide and whether a UDP rule takes it.
const KEYS: &[(&str, bool, bool)] = &[
    ("weight", false, true),
    ("send_proxy", false, false),
    ("max_conns", false, true),
    ("source", false, true),
    ("interface", false, true),
    ("mark", false, true),
    ("transparent", false, true),
    ("backup", false, true),
    ("drain", false, true),
    ("disabled", false, true),
    ("slowstart", false, true),
    ("balance", true, true),
    ("allow", true, true),
    ("deny", true, true),
    ("accept_proxy", true, false),
    ("max_conns_per_ip", true, false),
    ("conn_rate_up", true, true),
    ("conn_rate_down", true, true),
    ("ip_rate_up", true, true),
    ("ip_rate_down", true, true),
    ("rate_up", true, true),
    ("rate_down", true, true),
    ("sni", false, false),
];

/// Parses the options column; the error says which item is wrong and why.
pub fn parse_options(text: &str, proto: Proto) -> Result<RowOptions, String> {
    let mut out = RowOptions::default();
    let mut seen: Vec<&str> = Vec::new();
    for item in text.split_whitespace() {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let Some(&(key, pool_wide, udp)) = KEYS.iter().find(|(k, _, _)| *k == key) else {
            let known: Vec<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
            return Err(format!(
                "unknown option \"{key}\" (known: {})",
                known.join(", ")
            ));
        };
        if seen.contains(&key) {
            return Err(format!("{key} is given twice"));
        }
        seen.push(key);
        if proto == Proto::Udp && !udp {
            return Err(format!("{key} is for TCP rules only"));
        }
        if pool_wide {
            out.pool_keys.push(key);
        }
        let needs = |what: &str| -> Result<&str, String> {
            value
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{key} needs a value: {key}={what}"))
        };
        match key {
            "weight" => {
                out.backend.weight = number(key, needs("N")?, 1, MAX_WEIGHT as u64)? as u32;
            }
            "send_proxy" => {
                out.backend.send_proxy = Some(match needs("v1|v2")? {
                    "v1" => ProxyVersion::V1,
                    "v2" => ProxyVersion::V2,
                    other => {
                        return Err(format!("send_proxy \"{other}\" is not v1 or v2"));
                    }
                })
            }
            "max_conns" => out.backend.max_conns = number(key, needs("N")?, 1, u64::MAX)?,
            "source" => {
                let v = needs("ADDR")?;
                let bare = v
                    .strip_prefix('[')
                    .and_then(|v| v.strip_suffix(']'))
                    .unwrap_or(v);
                out.backend.source = Some(
                    bare.parse::<IpAddr>()
                        .map_err(|_| format!("source=\"{v}\" is not an IP address"))?,
                );
            }
            "interface" => {
                let v = needs("NAME")?;
                // IFNAMSIZ is 16 with the NUL.
                if v.len() > 15 || v.contains('/') {
                    return Err(format!("interface=\"{v}\" is not an interface name"));
                }
                out.backend.interface = Some(v.to_string());
            }
            "mark" => out.backend.mark = Some(mark(needs("N")?)?),
            "transparent" => {
                out.backend.transparent = match value {
                    None | Some("on") | Some("yes") | Some("true") => true,
                    Some("off") | Some("no") | Some("false") => false,
                    Some(other) => return Err(format!("transparent \"{other}\" is not on or off")),
                }
            }
            "backup" => out.backend.backup = flag(key, value)?,
            "drain" | "disabled" => {
                let other = if key == "drain" { "disabled" } else { "drain" };
                if seen.contains(&other) {
                    return Err("drain and disabled exclude each other".into());
                }
                if flag(key, value)? {
                    out.backend.admin = Admin::parse(key).unwrap_or_default();
                }
            }
            "slowstart" => {
                out.backend.slowstart_ms = duration_ms(key, needs("DURATION (30s, 500ms, 2m)")?)?
            }
            "balance" => {
                out.pool.balance = match needs("roundrobin|leastconn|source")? {
                    "roundrobin" => Balance::RoundRobin,
                    "leastconn" => Balance::LeastConn,
                    "source" => Balance::Source,
                    other => {
                        return Err(format!(
                            "balance \"{other}\" is not roundrobin, leastconn or source"
                        ))
                    }
                }
            }
            "allow" => out.pool.allow = cidrs(key, needs("CIDR[,CIDR...]")?)?,
            "deny" => out.pool.deny = cidrs(key, needs("CIDR[,CIDR...]")?)?,
            "accept_proxy" => out.pool.accept_proxy = flag(key, value)?,
            "max_conns_per_ip" => {
                out.pool.max_conns_per_ip = number(key, needs("N")?, 1, u64::MAX)?;
            }
            rate if rate.contains("rate_") => {
                let bits = crate::rate::parse_bits(key, needs("BITS")?)?;
                out.pool.rates.set(rate, bits);
            }
            "sni" => out.backend.sni = server_names(needs("NAME[,NAME...]")?)?,
            _ => unreachable!("every key of KEYS is handled"),
        }
    }
    if out.backend.transparent {
        if out.backend.send_proxy.is_some() {
            return Err(
                "send_proxy and transparent on one backend: a transparent backend sees \
                        the client's address as the source already; keep one of them"
                    .into(),
            );
        }
        if out.backend.source.is_some() {
            return Err(
                "source= and transparent on one backend: transparent uses the client's address \
                 as the source; keep one of them"
                    .into(),
            );
        }
    }
    Ok(out)
}

/// `mark=4737` or `mark=0x1281`: a non-zero 32-bit firewall mark.
fn mark(value: &str) -> Result<u32, String> {
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse::<u32>(),
    };
    match parsed {
        Ok(0) => Err("mark=0 is no mark: give 1-4294967295 (or 0x1-0xffffffff)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "mark=\"{value}\" is not a 32-bit number (decimal or 0x hex)"
        )),
    }
}

/// A key that may stand alone (on) or be `=on|off` (yes/no, true/false).
fn flag(key: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("on") | Some("yes") | Some("true") => Ok(true),
        Some("off") | Some("no") | Some("false") => Ok(false),
        Some(other) => Err(format!("{key} \"{other}\" is not on or off")),
    }
}

/// `30s`, `500ms`, `2m`, `1h` as milliseconds: 1 ms to an hour.
pub fn duration_ms(key: &str, value: &str) -> Result<u64, String> {
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits);
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "{key}=\"{value}\" is not a duration: write a number and ms, s, m or h (30s)"
            ))
        }
    };
    match number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
    {
        Some(ms) if (1..=MAX_SLOWSTART_MS).contains(&ms) => Ok(ms),
        Some(_) => Err(format!("{key}={value} is out of range 1ms-1h")),
        None => Err(format!(
            "{key}=\"{value}\" is not a duration: write a number and ms, s, m or h (30s)"
        )),
    }
}

/// `a.test,*.example.com`: host names (letters, digits, `-`, `_`, dots), lower-cased; a
/// wildcard is `*.` and at least one more label.
pub fn server_names(value: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for name in value.split(',') {
        let lower = name.trim().trim_end_matches('.').to_ascii_lowercase();
        let bare = lower.strip_prefix("*.").unwrap_or(&lower);
        let labels_ok = !bare.is_empty()
            && bare.len() <= 253
            && bare.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !labels_ok {
            return Err(format!(
                "sni: \"{name}\" is not a host name (write a.example.com, or *.example.com for any one label)"
            ));
        }
        if names.contains(&lower) {
            return Err(format!("sni: \"{name}\" is given twice"));
        }
        names.push(lower);
    }
    Ok(names)
}

/// `options` with its `drain`/`disabled` item replaced by `admin` (removed for `active`), the
/// other items kept as written: how the page and the API put a backend in or out of service.
pub fn with_admin(options: &str, admin: Admin) -> String {
    let mut items: Vec<&str> = options
        .split_whitespace()
        .filter(|item| {
            let key = item.split_once('=').map_or(*item, |(k, _)| k);
            key != "drain" && key != "disabled"
        })
        .collect();
    if admin != Admin::Active {
        items.push(admin.as_str());
    }
    items.join(" ")
}

fn number(key: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(n) if max == u64::MAX => Err(format!("{key}={n}: at least {min}")),
        Ok(n) => Err(format!("{key}={n} is out of range {min}-{max}")),
        Err(_) => Err(format!("{key}=\"{value}\" is not a number")),
    }
}

/// `10.0.0.0/24,2001:db8::/32,10.0.0.66`: a bare address is a /32 (or /128). `key` names the
/// option or flag in the error.
pub fn cidrs(key: &str, value: &str) -> Result<Vec<IpNet>, String> {
    value
        .split(',')
        .map(|item| {
            let item = item.trim();
            item.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{key}: \"{item}\" is not an address or CIDR"))
        })
        .collect()
}

/// What differs between two rows' pool-wide options, for keys both wrote.
pub fn pool_conflict(a: &RowOptions, b: &RowOptions) -> Option<&'static str> {
    a.pool_keys
        .iter()
        .copied()
        .filter(|k| b.pool_keys.contains(k))
        .find(|&k| match k {
            "balance" => a.pool.balance != b.pool.balance,
            "allow" => a.pool.allow != b.pool.allow,
            "deny" => a.pool.deny != b.pool.deny,
            "accept_proxy" => a.pool.accept_proxy != b.pool.accept_proxy,
            "max_conns_per_ip" => a.pool.max_conns_per_ip != b.pool.max_conns_per_ip,
            rate if rate.contains("rate_") => a.pool.rates.get(rate) != b.pool.rates.get(rate),
            _ => false,
        })
}

/// Folds a row's pool-wide options into the pool's.
pub fn merge_pool(into: &mut PoolOptions, row: &RowOptions) {
    for key in &row.pool_keys {
        match *key {
            "balance" => into.balance = row.pool.balance,
            "allow" => into.allow = row.pool.allow.clone(),
            "deny" => into.deny = row.pool.deny.clone(),
            "accept_proxy" => into.accept_proxy = row.pool.accept_proxy,
            "max_conns_per_ip" => into.max_conns_per_ip = row.pool.max_conns_per_ip,
            rate if rate.contains("rate_") => {
                into.rates.set(rate, row.pool.rates.get(rate).unwrap_or(0));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_into_its_type() {
        let o = parse_options(
            "weight=3 send_proxy=v2 max_conns=500 balance=leastconn allow=10.0.0.0/24,2001:db8::/32 deny=10.0.0.66 accept_proxy max_conns_per_ip=4",
            Proto::Tcp,
        )
        .unwrap();
        assert_eq!(o.backend.weight, 3);
        assert_eq!(o.backend.send_proxy, Some(ProxyVersion::V2));
        assert_eq!(o.backend.max_conns, 500);
        let out = parse_options("source=[::1] interface=eth1 mark=0x1281", Proto::Udp).unwrap();
        assert_eq!(out.backend.source, Some("::1".parse().unwrap()));
        assert_eq!(out.backend.interface.as_deref(), Some("eth1"));
        assert_eq!(out.backend.mark, Some(0x1281));
        assert_eq!(
            parse_options("mark=4737", Proto::Tcp).unwrap().backend.mark,
            Some(4737)
        );
        assert_eq!(o.pool.balance, Balance::LeastConn);
        assert_eq!(o.pool.allow.len(), 2);
        assert!(o.pool.accept_proxy);
        assert_eq!(o.pool.max_conns_per_ip, 4);
        assert!(o.pool.admits("10.0.0.5".parse().unwrap()));
        assert!(!o.pool.admits("10.0.0.66".parse().unwrap()), "deny wins");
        assert!(!o.pool.admits("10.0.1.5".parse().unwrap()));
        assert!(
            o.pool.admits("::ffff:10.0.0.7".parse().unwrap()),
            "v4-mapped"
        );
        assert!(o.pool.admits("2001:db8::1".parse().unwrap()));
        assert_eq!(
            parse_options("", Proto::Tcp).unwrap(),
            RowOptions::default()
        );
    }

    #[test]
    fn bad_items_say_what_and_why() {
        let e = |t: &str| parse_options(t, Proto::Tcp).unwrap_err();
        assert!(e("colour=red").starts_with("unknown option \"colour\" (known: weight,"));
        assert_eq!(e("weight=0"), "weight=0 is out of range 1-256");
        assert_eq!(e("weight=x"), "weight=\"x\" is not a number");
        assert_eq!(e("weight"), "weight needs a value: weight=N");
        assert_eq!(e("weight=2 weight=3"), "weight is given twice");
        assert_eq!(e("send_proxy=v3"), "send_proxy \"v3\" is not v1 or v2");
        assert_eq!(
            e("allow=10.0.0.0/33"),
            "allow: \"10.0.0.0/33\" is not an address or CIDR"
        );
        assert_eq!(
            e("balance=random"),
            "balance \"random\" is not roundrobin, leastconn or source"
        );
        assert_eq!(e("source=10.0.0"), "source=\"10.0.0\" is not an IP address");
        assert_eq!(
            e("mark=0x"),
            "mark=\"0x\" is not a 32-bit number (decimal or 0x hex)"
        );
        assert!(e("mark=0").starts_with("mark=0 is no mark"));
        assert_eq!(
            e("interface=a-very-long-name0"),
            "interface=\"a-very-long-name0\" is not an interface name"
        );
        assert!(e("transparent send_proxy=v2").starts_with("send_proxy and transparent on one"));
        assert!(e("transparent source=127.0.0.1").starts_with("source= and transparent"));
        assert!(
            parse_options("transparent", Proto::Udp)
                .unwrap()
                .backend
                .transparent
        );
        assert_eq!(
            parse_options("send_proxy=v1", Proto::Udp).unwrap_err(),
            "send_proxy is for TCP rules only"
        );
    }

    #[test]
    fn rates_are_pool_options_in_bits_per_second() {
        let a = parse_options(
            "conn_rate_down=20m ip_rate_up=1.5m rate_down=1g",
            Proto::Udp,
        )
        .unwrap();
        assert_eq!(a.pool.rates.conn_down, 20_000_000);
        assert_eq!(a.pool.rates.ip_up, 1_500_000);
        assert_eq!(a.pool.rates.pool_down, 1_000_000_000);
        assert_eq!(a.pool_keys, ["conn_rate_down", "ip_rate_up", "rate_down"]);
        let b = parse_options("weight=2 rate_down=500m", Proto::Tcp).unwrap();
        assert_eq!(pool_conflict(&a, &b), Some("rate_down"));
        let mut pool = PoolOptions::default();
        merge_pool(&mut pool, &a);
        merge_pool(&mut pool, &parse_options("weight=2", Proto::Tcp).unwrap());
        assert_eq!(
            pool.rates, a.pool.rates,
            "one row's limits hold for the pool"
        );
        assert_eq!(
            parse_options("rate_up=fast", Proto::Tcp).unwrap_err(),
            "rate_up=\"fast\" is not a rate: bits per second, with k, m or g (rate_down=20m)"
        );
    }

    #[test]
    fn server_names_are_host_names_or_one_label_wildcards() {
        let o = parse_options("sni=A.test,*.Example.com.", Proto::Tcp).unwrap();
        assert_eq!(o.backend.sni, ["a.test", "*.example.com"]);
        let e = |t: &str| parse_options(t, Proto::Tcp).unwrap_err();
        assert!(e("sni=a.*.test").starts_with("sni: \"a.*.test\" is not a host name"));
        assert!(e("sni=*").starts_with("sni: \"*\" is not a host name"));
        assert!(e("sni=a..test").starts_with("sni: \"a..test\" is not a host name"));
        assert_eq!(e("sni=a.test,A.TEST"), "sni: \"A.TEST\" is given twice");
        assert_eq!(e("sni"), "sni needs a value: sni=NAME[,NAME...]");
        assert_eq!(
            parse_options("sni=a.test", Proto::Udp).unwrap_err(),
            "sni is for TCP rules only"
        );
    }

    #[test]
    fn backup_drain_disabled_and_slowstart() {
        let o = parse_options("backup drain slowstart=30s", Proto::Tcp).unwrap();
        assert!(o.backend.backup);
        assert_eq!(o.backend.admin, Admin::Drain);
        assert_eq!(o.backend.slowstart_ms, 30_000);
        let o = parse_options("disabled backup=off slowstart=500ms", Proto::Udp).unwrap();
        assert!(!o.backend.backup);
        assert_eq!(o.backend.admin, Admin::Disabled);
        assert_eq!(o.backend.slowstart_ms, 500);
        assert_eq!(
            parse_options("drain=off", Proto::Tcp)
                .unwrap()
                .backend
                .admin,
            Admin::Active
        );
        let e = |t: &str| parse_options(t, Proto::Tcp).unwrap_err();
        assert_eq!(e("drain disabled"), "drain and disabled exclude each other");
        assert_eq!(e("backup=maybe"), "backup \"maybe\" is not on or off");
        assert_eq!(
            e("slowstart=30"),
            "slowstart=\"30\" is not a duration: write a number and ms, s, m or h (30s)"
        );
        assert_eq!(e("slowstart=0s"), "slowstart=0s is out of range 1ms-1h");
        assert_eq!(e("slowstart=2h"), "slowstart=2h is out of range 1ms-1h");
        assert_eq!(
            e("slowstart"),
            "slowstart needs a value: slowstart=DURATION (30s, 500ms, 2m)"
        );
    }

    #[test]
    fn admin_state_is_rewritten_in_place_of_the_old_one() {
        assert_eq!(
            with_admin("weight=3 drain", Admin::Disabled),
            "weight=3 disabled"
        );
        assert_eq!(with_admin("disabled weight=3", Admin::Active), "weight=3");
        assert_eq!(with_admin("", Admin::Drain), "drain");
        assert_eq!(with_admin("drain=off backup", Admin::Drain), "backup drain");
    }

    #[test]
    fn only_pool_keys_both_rows_wrote_can_conflict() {
        let a = parse_options("weight=3 balance=source", Proto::Tcp).unwrap();
        let b = parse_options("weight=1", Proto::Tcp).unwrap();
        let c = parse_options("balance=leastconn", Proto::Tcp).unwrap();
        assert_eq!(pool_conflict(&a, &b), None);
        assert_eq!(pool_conflict(&a, &c), Some("balance"));
        let mut pool = PoolOptions::default();
        merge_pool(&mut pool, &a);
        merge_pool(&mut pool, &b);
        assert_eq!(pool.balance, Balance::Source);
    }
}
