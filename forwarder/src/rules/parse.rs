//! The one reader and the one writer of the rules CSV: rows read with their line numbers (kept
//! even when malformed, so the page can show them), each field checked (host names are checked,
//! not resolved: `dns` does that in the background), pools formed; and entries written back as
//! rows.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::options::{merge_pool, parse_options, pool_conflict, RowOptions};
use super::range::{overlap_message, parse_port_range, PortIndex, PortRange};
use super::{Entry, Pool, PoolOptions, Proto, Rule, RuleError, RuleSet, RulesError, EXAMPLE_FILE};

/// One row of a rules file as written, valid or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// 1-based line in the file.
    pub line: usize,
    /// The fields, padded or cut to the columns a rule has when the row had another number.
    pub entry: Entry,
    /// Why the row is not a rule whatever its fields say (wrong field count, bad CSV).
    pub malformed: Option<RuleError>,
}

/// What a row separated by semicolons gets (a spreadsheet saving "CSV" in many locales).
const SEMICOLONS: &str =
    "this row is separated by ';' (as spreadsheets save CSV in many locales); \
     the rules file separates fields with commas: name,listen_port,dest_ip,dest_port";

/// Parses and validates rules text; `file` labels the errors.
pub fn parse(text: &str, file: &str) -> Result<RuleSet, RulesError> {
    let rows = read_rows(text, file);
    let mut errors: Vec<RuleError> = rows.iter().filter_map(|r| r.malformed.clone()).collect();
    // A ;-separated file is said once, not once per line.
    let semicolon_rows = errors.iter().filter(|e| e.message == SEMICOLONS).count();
    if semicolon_rows > 1 {
        let mut first = true;
        errors.retain(|e| e.message != SEMICOLONS || std::mem::take(&mut first));
        if let Some(e) = errors.iter_mut().find(|e| e.message == SEMICOLONS) {
            e.message = format!(
                "the file looks ;-separated ({semicolon_rows} rows like this one); the rules \
                 file separates fields with commas: name,listen_port,dest_ip,dest_port"
            );
        }
    }
    let entries: Vec<(usize, Entry)> = rows
        .into_iter()
        .filter(|r| r.malformed.is_none())
        .map(|r| (r.line, r.entry))
        .collect();
    match validate(&entries, file) {
        Ok(set) if errors.is_empty() => Ok(set),
        Ok(_) => Err(RulesError(errors)),
        Err(RulesError(more)) => {
            errors.extend(more);
            errors.sort_by_key(|e| e.line);
            Err(RulesError(errors))
        }
    }
}

/// Every row of a rules file with its line: comments, blank lines and a header row skipped,
/// fields trimmed. A row with the wrong number of fields is kept, with its error, so the page
/// can show it and let it be fixed.
pub fn read_rows(text: &str, file: &str) -> Vec<Row> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut rows = Vec::new();
    let mut first = true;
    let mut lines = LineCursor::default();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e
                    .position()
                    .map(|p| lines.line_at(text, p.byte()))
                    .unwrap_or(0);
                rows.push(Row {
                    line,
                    entry: Entry::default(),
                    malformed: Some(err(file, line, "row", format!("not valid CSV: {e}"))),
                });
                continue;
            }
        };
        if skipped_row(&record, &mut first) {
            continue;
        }
        // The csv crate's own line count skips comments and blank lines; count from the offset.
        let line = record
            .position()
            .map(|p| lines.line_at(text, p.byte()))
            .unwrap_or(0);
        let malformed = (!(4..=5).contains(&record.len())).then(|| {
            let message = if record.len() == 1 && record[0].contains(';') {
                SEMICOLONS.to_string()
            } else {
                format!(
                    "expected 4 fields (name,listen_port,dest_ip,dest_port) or 5 (with options), found {}",
                    record.len()
                )
            };
            err(file, line, "row", message)
        });
        let field = |i: usize| record.get(i).unwrap_or("").to_string();
        rows.push(Row {
            line,
            entry: Entry {
                name: field(0),
                listen_port: field(1),
                dest_ip: field(2),
                dest_port: field(3),
                options: field(4),
            },
            malformed,
        });
    }
    rows
}

/// Validates entries (with their line numbers) into pools: each field checked, options parsed,
/// destinations resolved, duplicates, overlapping or conflicting listen ports and pool options
/// that two rows disagree on refused. Linear in the rows (and in the ports of the ranges).
pub fn validate(entries: &[(usize, Entry)], file: &str) -> Result<RuleSet, RulesError> {
    let mut errors = Vec::new();
    let mut pools: Vec<Pool> = Vec::new();
    // The row options each pool's rows wrote, with their lines, to find disagreements.
    let mut pool_rows: Vec<Vec<(usize, RowOptions)>> = Vec::new();
    // Which row first claimed each port; ranges that overlap without being equal are refused.
    let mut claimed = PortIndex::default();
    // (first port, transport) -> (listen address, first line): one port takes one listen address.
    let mut ports: HashMap<(u16, Proto), (SocketAddr, usize)> = HashMap::new();
    // (listen address, transport) -> index into `pools`.
    let mut pool_at: HashMap<(SocketAddr, Proto), usize> = HashMap::new();
    // (pool index, destination, host name) -> line, for duplicates.
    let mut dests: HashMap<(usize, SocketAddr, Option<String>), usize> = HashMap::new();
    for (line, entry) in entries {
        let line = *line;
        let before = errors.len();
        check_name(&entry.name).unwrap_or_else(|m| errors.push(err(file, line, "name", m)));
        let listen = parse_listen(&entry.listen_port)
            .map_err(|m| errors.push(err(file, line, "listen_port", m)))
            .ok();
        let dest_ports = parse_port_range(&entry.dest_port)
            .map_err(|m| errors.push(err(file, line, "dest_port", m)))
            .ok();
        if let (Some(l), Some(d)) = (listen, dest_ports) {
            if !d.is_single() && d.len() != l.ports.len() {
                errors.push(err(
                    file,
                    line,
                    "dest_port",
                    format!(
                        "{d} has {} ports but listen_port {} has {}; a destination range must be as long as the listen range, or one port",
                        d.len(),
                        l.ports,
                        l.ports.len()
                    ),
                ));
            }
        }
        let dest = match dest_ports {
            Some(d) => destination(&entry.dest_ip, d.first)
                .map_err(|m| errors.push(err(file, line, "dest_ip", m)))
                .ok(),
            None => None,
        };
        let proto = listen.map_or(Proto::Tcp, |l| l.proto);
        let options = parse_options(&entry.options, proto)
            .map_err(|m| errors.push(err(file, line, "options", m)))
            .ok();
        if let (Some((dest, None)), Some(options)) = (&dest, &options) {
            // A host name's addresses are known only once it resolves.
            crate::outbound::check(&options.backend, *dest)
                .unwrap_or_else(|m| errors.push(err(file, line, "options", m)));
        }
        if errors.len() > before {
            continue;
        }
        let (Some(listen), Some((dest, host)), Some(dest_ports), Some(options)) =
            (listen, dest, dest_ports, options)
        else {
            continue;
        };
        if let Err(owner) = claimed.claim(listen.ports, proto, line) {
            errors.push(err(
                file,
                line,
                "listen_port",
                overlap_message(listen.ports, owner, proto),
            ));
            continue;
        }
        match ports.get(&(listen.addr.port(), proto)) {
            Some((addr, first_line)) if *addr != listen.addr => {
                errors.push(err(
                    file,
                    line,
                    "listen_port",
                    format!(
                        "port {} is already bound to {addr} by line {first_line}; one port takes one listen address",
                        port_label(listen)
                    ),
                ));
                continue;
            }
            Some(_) => {}
            None => {
                ports.insert((listen.addr.port(), proto), (listen.addr, line));
            }
        }
        let rule_host = host.clone();
        let rule = Rule {
            entry: entry.clone(),
            line,
            listen: listen.addr,
            proto,
            dest,
            dest_ports,
            host,
            options: options.backend.clone(),
        };
        match pool_at.get(&(listen.addr, proto)).copied() {
            Some(i) => {
                let pool = &mut pools[i];
                if let Some(dup) = dests.get(&(i, dest, rule.host.clone())) {
                    errors.push(err(
                        file,
                        line,
                        "dest_ip",
                        format!(
                            "duplicate destination {} for listen port {} (already on line {dup})",
                            rule.dest_label(),
                            port_label(listen),
                        ),
                    ));
                    continue;
                }
                let conflict = pool_rows[i]
                    .iter()
                    .find_map(|(l, other)| pool_conflict(other, &options).map(|k| (*l, k)));
                if let Some((other_line, key)) = conflict {
                    errors.push(err(
                        file,
                        line,
                        "options",
                        format!(
                            "{key} differs from line {other_line} of the same pool ({listen}); pool options must agree"
                        ),
                    ));
                    continue;
                }
                dests.insert((i, dest, rule_host.clone()), line);
                merge_pool(&mut pool.options, &options);
                pool.rules.push(rule);
                pool_rows[i].push((line, options));
            }
            None => {
                let mut pool_options = PoolOptions::default();
                merge_pool(&mut pool_options, &options);
                pool_at.insert((listen.addr, proto), pools.len());
                dests.insert((pools.len(), dest, rule_host.clone()), line);
                pools.push(Pool {
                    listen: listen.addr,
                    ports: listen.ports,
                    proto,
                    options: pool_options,
                    rules: vec![rule],
                });
                pool_rows.push(vec![(line, options)]);
            }
        }
    }
    if errors.is_empty() {
        Ok(RuleSet { pools })
    } else {
        Err(RulesError(errors))
    }
}

/// A port as messages name it: `8080` (TCP, as the original tool's messages did), `53/udp`,
/// `27000-27099`.
fn port_label(listen: Listen) -> String {
    match listen.proto {
        Proto::Tcp => listen.ports.to_string(),
        Proto::Udp => format!("{}/udp", listen.ports),
    }
}

/// Serialises entries back to the file format (one row each, quoted only where needed), after
/// the comment header.
pub fn to_csv(entries: &[Entry]) -> String {
    let mut out = String::from(EXAMPLE_FILE);
    for e in entries {
        // A row without options keeps the original four columns.
        let mut fields = vec![&e.name, &e.listen_port, &e.dest_ip, &e.dest_port];
        if !e.options.is_empty() {
            fields.push(&e.options);
        }
        // A row starting with '#' would read back as a comment: quote it.
        let style = if e.name.starts_with('#') {
            csv::QuoteStyle::Always
        } else {
            csv::QuoteStyle::Necessary
        };
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .quote_style(style)
            .from_writer(Vec::new());
        // Writing to a Vec cannot fail.
        let _ = w.write_record(fields);
        out.push_str(&String::from_utf8_lossy(
            &w.into_inner().unwrap_or_default(),
        ));
    }
    out
}

/// A row that is no rule: an empty one, or the header row (allowed as the first row only).
/// `first` tracks whether a row has been seen yet.
fn skipped_row(record: &csv::StringRecord, first: &mut bool) -> bool {
    if record.iter().all(|f| f.is_empty()) {
        return true;
    }
    let is_header = *first
        && record
            .get(1)
            .is_some_and(|f| f.eq_ignore_ascii_case("listen_port"));
    *first = false;
    is_header
}

/// Turns the byte offsets the csv reader reports into 1-based lines, counting newlines only
/// between one record and the next (records come in order), so reading a file is linear in its
/// size, not quadratic.
#[derive(Debug, Default)]
struct LineCursor {
    /// Byte offset counted up to, and the newlines before it.
    byte: usize,
    newlines: usize,
}

impl LineCursor {
    /// The line of the record that the csv reader reports at `byte`. The reader reports where it
    /// started looking, before the blank and comment lines it skipped, so skip them too.
    fn line_at(&mut self, text: &str, byte: u64) -> usize {
        let mut start = (byte as usize).min(text.len());
        if start < self.byte {
            *self = LineCursor::default();
        }
        self.newlines += text.as_bytes()[self.byte..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.byte = start;
        let mut line = self.newlines + 1;
        while let Some(rest) = text.get(start..) {
            let this = rest.split('\n').next().unwrap_or("");
            let skipped = this.trim().is_empty() || this.starts_with('#');
            if !skipped || this.len() == rest.len() {
                break;
            }
            start += this.len() + 1;
            line += 1;
        }
        line
    }
}

fn err(file: &str, line: usize, field: &str, message: String) -> RuleError {
    RuleError {
        file: file.to_string(),
        line,
        field: field.to_string(),
        message,
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty".into());
    }
    if name.chars().count() > 64 {
        return Err("name is longer than 64 characters".into());
    }
    if name.chars().any(char::is_control) {
        return Err("name contains control characters".into());
    }
    Ok(())
}

/// Where a rule listens: an address and a transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listen {
    /// The address and the first port.
    pub addr: SocketAddr,
    /// The ports listened on (`addr`'s port alone, or a range starting there).
    pub ports: PortRange,
    pub proto: Proto,
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr.ip() {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.ports)?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.ports)?,
        }
        match self.proto {
            Proto::Tcp => Ok(()),
            Proto::Udp => write!(f, "/udp"),
        }
    }
}

/// `PORT` (all IPv4 addresses), `ADDR:PORT`, or `[V6]:PORT`, where PORT may be a range
/// `FROM-TO`, each optionally followed by `/udp` or `/tcp`.
pub fn parse_listen(field: &str) -> Result<Listen, String> {
    if field.is_empty() {
        return Err("listen port is empty".into());
    }
    let (field, proto) = match field.rsplit_once('/') {
        Some((f, p)) if p.eq_ignore_ascii_case("udp") => (f, Proto::Udp),
        Some((f, p)) if p.eq_ignore_ascii_case("tcp") => (f, Proto::Tcp),
        Some((_, p)) => return Err(format!("\"/{p}\" is not a transport: write /tcp or /udp")),
        None => (field, Proto::Tcp),
    };
    if !field.contains(':') {
        let ports = parse_port_range(field)?;
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports.first);
        return Ok(Listen { addr, ports, proto });
    }
    let bad =
        || format!("\"{field}\" is neither a port nor ADDR:PORT (use [v6addr]:PORT for IPv6)");
    // The last ':' splits the port off ("[::1]:80", "127.0.0.1:27000-27099").
    let (host, port) = field.rsplit_once(':').ok_or_else(bad)?;
    let bare = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6,
        None if host.contains(':') => return Err(bad()),
        None => host,
    };
    let ip: IpAddr = bare.parse().map_err(|_| bad())?;
    let ports = if port.contains('-') {
        parse_port_range(port)?
    } else {
        PortRange::single(port.parse::<u16>().map_err(|_| bad())?)
    };
    if ports.first == 0 {
        return Err("port 0 is not allowed".into());
    }
    Ok(Listen {
        addr: SocketAddr::new(ip, ports.first),
        ports,
        proto,
    })
}

/// An IP literal (IPv6 with or without brackets), or a host name to resolve later: then
/// `(0.0.0.0:PORT, Some(name))`.
pub fn destination(host: &str, port: u16) -> Result<(SocketAddr, Option<String>), String> {
    if host.is_empty() {
        return Err("destination is empty".into());
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Err(format!("{ip} is not a destination address"));
        }
        return Ok((SocketAddr::new(ip, port), None));
    }
    let labels_ok = bare
        .trim_end_matches('.')
        .split('.')
        .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-'));
    if bare.len() > 253
        || !labels_ok
        || !bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(format!("\"{host}\" is not an IP address or host name"));
    }
    let unresolved = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    Ok((unresolved, Some(bare.to_ascii_lowercase())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        parse(text, "entries.csv")
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn original_quoted_format_loads_unchanged() {
        let set = parse(
            "\"web1\",\"8080\",\"127.0.0.1\",\"9001\"\n\"web2\",\"8080\",\"127.0.0.1\",\"9002\"\n\"ssh\",\"22222\",\"10.0.0.3\",\"22\"\n",
            "entries.csv",
        )
        .unwrap();
        assert_eq!(set.pools.len(), 2);
        assert_eq!(set.pools[0].listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(set.pools[0].rules.len(), 2);
        assert_eq!(
            set.pools[0].rules[1].dest,
            "127.0.0.1:9002".parse().unwrap()
        );
        assert_eq!(set.pools[1].rules[0].entry.name, "ssh");
    }

    #[test]
    fn header_comments_blank_lines_hosts_and_v6_are_allowed() {
        let text = "name,listen_port,dest_ip,dest_port\n\n# a comment\n a , 127.0.0.1:7000 , localhost , 7001\nb,[::1]:7002,::1,7003\nc,7004,[::1],7005\n";
        let set = parse(text, "f").unwrap();
        assert_eq!(set.pools.len(), 3);
        assert_eq!(set.pools[0].listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(set.pools[0].rules[0].line, 4);
        assert_eq!(set.pools[1].listen, "[::1]:7002".parse().unwrap());
        assert_eq!(set.pools[2].rules[0].dest, "[::1]:7005".parse().unwrap());
    }

    #[test]
    fn errors_name_file_line_field_and_why() {
        let e = errors("ok,8080,127.0.0.1,80\nbad,70000,127.0.0.1,80\nx,8081,127.0.0.1,abc\n");
        assert_eq!(
            e,
            vec![
                "entries.csv:2: listen_port: port 70000 is out of range 1-65535",
                "entries.csv:3: dest_port: \"abc\" is not a port number",
            ]
        );
    }

    #[test]
    fn duplicate_destination_and_wrong_field_count_are_refused() {
        let e = errors("a,8080,127.0.0.1,80\nb,8080,127.0.0.1,80\nc,8081,127.0.0.1\n");
        assert_eq!(e[0], "entries.csv:2: dest_ip: duplicate destination 127.0.0.1:80 for listen port 8080 (already on line 1)");
        assert!(e[1].starts_with("entries.csv:3: row: expected 4 fields"));
    }

    #[test]
    fn host_names_are_kept_for_later_and_conflicting_listen_address() {
        let set = parse(
            "a,8080,No-Such-Host.invalid,80\nb,8080,no-such-host.invalid,81\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            set.pools[0].rules[0].host.as_deref(),
            Some("no-such-host.invalid")
        );
        assert_eq!(set.pools[0].rules[1].dest, "0.0.0.0:81".parse().unwrap());
        let e = errors(
            "a,8080,web.lab,80\na2,8080,web.lab,80\nbad,8081,-x-.lab,80\nb,9000,127.0.0.1,80\nc,127.0.0.1:9000,127.0.0.1,81\n",
        );
        assert_eq!(e[0], "entries.csv:2: dest_ip: duplicate destination web.lab:80 for listen port 8080 (already on line 1)");
        assert_eq!(
            e[1],
            "entries.csv:3: dest_ip: \"-x-.lab\" is not an IP address or host name"
        );
        assert!(e[2].starts_with(
            "entries.csv:5: listen_port: port 9000 is already bound to 0.0.0.0:9000 by line 4"
        ));
    }

    #[test]
    fn csv_round_trip_keeps_entries() {
        let set = parse("\"a,b\",8080,127.0.0.1,80\nc,8081,localhost,81\n", "f").unwrap();
        let text = to_csv(&set.entries());
        let again = parse(&text, "f").unwrap();
        assert_eq!(again.entries(), set.entries());
        assert_eq!(again.entries()[0].name, "a,b");
    }

    #[test]
    fn rows_keep_lines_and_malformed_rows() {
        let text = "# c\nname,listen_port,dest_ip,dest_port\n\n a , 8080 ,127.0.0.1, 9001\n# x\nb,8081,127.0.0.1\n\"c,d\",8082,localhost,9003,extra\n";
        let rows = read_rows(text, "f.csv");
        let lines: Vec<usize> = rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, [4, 6, 7]);
        assert_eq!(rows[0].entry.name, "a");
        assert_eq!(rows[1].entry.dest_port, "");
        assert_eq!(rows[2].entry.name, "c,d");
        assert!(rows[0].malformed.is_none());
        assert_eq!(
            rows[1].malformed.as_ref().unwrap().to_string(),
            "f.csv:6: row: expected 4 fields (name,listen_port,dest_ip,dest_port) or 5 (with options), found 3"
        );
        let errors = parse(text, "f.csv").unwrap_err().0;
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), [6, 7]);
    }

    #[test]
    fn a_semicolon_separated_file_is_named_once() {
        let e = errors("# saved by a spreadsheet\na;8080;127.0.0.1;9001\nb;8081;127.0.0.1;9002\n\"c\";\"8082\";\"127.0.0.1\";\"9003\"\n");
        assert_eq!(
            e,
            vec!["entries.csv:2: row: the file looks ;-separated (3 rows like this one); the rules file separates fields with commas: name,listen_port,dest_ip,dest_port"]
        );
        let one = errors("ok,8080,127.0.0.1,80\na;8081;127.0.0.1;9001\n");
        assert_eq!(one.len(), 1);
        assert!(one[0].starts_with("entries.csv:2: row: this row is separated by ';'"));
    }

    #[test]
    fn udp_rules_and_options_extend_the_four_columns() {
        let text = "dns,53/udp,127.0.0.1,5353\ndns-tcp,53,127.0.0.1,5353\n\"web1\",\"8080\",\"127.0.0.1\",\"80\",\"weight=3 send_proxy=v2\"\nweb2,8080,127.0.0.1,81,\"weight=1 balance=leastconn\"\nv6,[::1]:9000/TCP,::1,9001,\n";
        let set = parse(text, "f").unwrap();
        assert_eq!(
            set.pools.len(),
            4,
            "TCP and UDP on one port are separate pools"
        );
        assert_eq!(set.pools[0].proto, Proto::Udp);
        assert_eq!(set.pools[0].label(), "0.0.0.0:53/udp");
        assert_eq!(set.pools[1].proto, Proto::Tcp);
        let web = &set.pools[2];
        assert_eq!(web.rules[0].options.weight, 3);
        assert_eq!(web.rules[1].options.weight, 1);
        assert_eq!(
            web.options.balance,
            crate::rules::options::Balance::LeastConn,
            "a pool option on any row applies to the pool"
        );
        assert_eq!(set.pools[3].listen, "[::1]:9000".parse().unwrap());
        // Written back: rows without options keep four columns, the others get the fifth.
        let written = to_csv(&set.entries());
        let rows: Vec<&str> = written.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            rows,
            [
                "dns,53/udp,127.0.0.1,5353",
                "dns-tcp,53,127.0.0.1,5353",
                "web1,8080,127.0.0.1,80,weight=3 send_proxy=v2",
                "web2,8080,127.0.0.1,81,weight=1 balance=leastconn",
                "v6,[::1]:9000/TCP,::1,9001",
            ]
        );
        assert_eq!(parse(&written, "f").unwrap().entries(), set.entries());
    }

    #[test]
    fn option_errors_name_the_field_and_disagreeing_rows_name_both_lines() {
        let e = errors("a,8080,127.0.0.1,80,weight=0\nb,9000,127.0.0.1,80,\"allow=10.0.0.0/8\"\nc,9000,127.0.0.1,81,\"allow=192.168.0.0/16\"\nd,53/udp,127.0.0.1,53,send_proxy=v1\ne,7000/sctp,127.0.0.1,1\n");
        assert_eq!(
            e,
            vec![
                "entries.csv:1: options: weight=0 is out of range 1-256",
                "entries.csv:3: options: allow differs from line 2 of the same pool (0.0.0.0:9000); pool options must agree",
                "entries.csv:4: options: send_proxy is for TCP rules only",
                "entries.csv:5: listen_port: \"/sctp\" is not a transport: write /tcp or /udp",
            ]
        );
    }

    #[test]
    fn empty_file_is_an_empty_rule_set() {
        assert_eq!(parse(EXAMPLE_FILE, "f").unwrap().pools.len(), 0);
    }
}
