//! `forwarder transparent-setup apply|undo|print`: the policy routing a gateway needs for rules
//! with `transparent`. A backend answers the client's address, which is not the gateway's; the
//! reply reaches the gateway (the servers route back through it) and must be handed to the
//! forwarder's socket instead of being forwarded or dropped: nft marks packets that belong to a
//! transparent socket (`socket transparent 1`), `ip rule fwmark` sends marked packets to a table
//! whose only route says every address is local. Both families. Applying twice changes nothing;
//! undo removes exactly what apply added.

use std::process::Command;

use anyhow::{bail, Context};

/// The mark nft puts on replies to transparent sockets (ranges-sni's setup uses 0x1280).
pub const MARK: u32 = 0x1281;
/// The route table those replies are looked up in.
pub const TABLE: u32 = 1281;
/// The nft table holding the marking rule.
pub const NFT_TABLE: &str = "forwarder_tproxy";

/// What `transparent-setup` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Add the rules, the routes and the nft table (idempotent)
    Apply,
    /// Remove what apply added
    Undo,
    /// Print the commands apply and undo run, with the network picture
    Print,
}

/// The nft ruleset, replaced whole and atomically (`add` then `delete` makes re-applying and a
/// first apply the same transaction).
fn nft_ruleset() -> String {
    format!(
        "add table inet {NFT_TABLE}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority mangle; policy accept;\n\
         \t\tmeta l4proto {{ tcp, udp }} socket transparent 1 meta mark set {MARK:#x} accept\n\
         \t}}\n\
         }}\n"
    )
}

const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Print => {
            print!("{}", script());
            Ok(())
        }
        Action::Apply => apply(),
        Action::Undo => undo(),
    }
}

/// The commands as a shell script, with the picture they serve.
pub fn script() -> String {
    let mut out = String::from(
        "# Transparent rules: the backend sees the client's address, so its replies go to the\n\
         # client's address. The servers must route those back through this gateway (their\n\
         # default route, or a route to the client networks, via the gateway's address on their\n\
         # link):\n\
         #\n\
         #   client 10.0.0.5 --> gateway (forwarder) --> server; server replies to 10.0.0.5\n\
         #                        ^ via its default route --'\n\
         #\n\
         # On the gateway, replies to transparent sockets are marked and delivered locally:\n",
    );
    for (family, any) in FAMILIES {
        out.push_str(&format!(
            "ip {family} rule add fwmark {MARK:#x} lookup {TABLE} priority {TABLE}\n\
             ip {family} route replace local {any} dev lo table {TABLE}\n"
        ));
    }
    out.push_str(&format!("nft -f - <<'EOF'\n{}EOF\n", nft_ruleset()));
    out.push_str("# Undo:\n");
    for (family, _) in FAMILIES {
        out.push_str(&format!(
            "# ip {family} rule del fwmark {MARK:#x} lookup {TABLE}; ip {family} route flush table {TABLE}\n"
        ));
    }
    out.push_str(&format!("# nft delete table inet {NFT_TABLE}\n"));
    out
}

fn apply() -> anyhow::Result<()> {
    for (family, any) in FAMILIES {
        if !rule_present(family)? {
            let mark = format!("{MARK:#x}");
            let table = TABLE.to_string();
            run_cmd(
                "ip",
                &[
                    family, "rule", "add", "fwmark", &mark, "lookup", &table, "priority", &table,
                ],
            )?;
        }
        run_cmd(
            "ip",
            &[
                family,
                "route",
                "replace",
                "local",
                any,
                "dev",
                "lo",
                "table",
                &TABLE.to_string(),
            ],
        )?;
    }
    nft_apply()?;
    eprintln!(
        "transparent-setup: fwmark {MARK:#x} -> table {TABLE} (local), nft table inet {NFT_TABLE}: applied"
    );
    Ok(())
}

fn undo() -> anyhow::Result<()> {
    for (family, _) in FAMILIES {
        // A rule added twice by hand would be listed twice: remove every copy.
        for _ in 0..16 {
            if !rule_present(family)? {
                break;
            }
            run_cmd(
                "ip",
                &[
                    family,
                    "rule",
                    "del",
                    "fwmark",
                    &format!("{MARK:#x}"),
                    "lookup",
                    &TABLE.to_string(),
                ],
            )?;
        }
        // Flushing an empty or missing table is not an error worth stopping for.
        let _ = output(
            "ip",
            &[family, "route", "flush", "table", &TABLE.to_string()],
        );
    }
    if output("nft", &["list", "table", "inet", NFT_TABLE]).is_ok() {
        run_cmd("nft", &["delete", "table", "inet", NFT_TABLE])?;
    }
    eprintln!("transparent-setup: removed");
    Ok(())
}

/// Whether `ip FAMILY rule` lists our fwmark rule.
fn rule_present(family: &str) -> anyhow::Result<bool> {
    let text = output("ip", &[family, "rule", "show"])?;
    let needle = format!("fwmark {MARK:#x} lookup {TABLE}");
    Ok(text.lines().any(|l| l.contains(&needle)))
}

fn nft_apply() -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (apt-get install nftables)")?;
    child
        .stdin
        .take()
        .context("nft's standard input")?
        .write_all(nft_ruleset().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft -f -: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    output(program, args).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_the_mark_table_and_nft_table() {
        let s = script();
        assert!(s.contains("ip -4 rule add fwmark 0x1281 lookup 1281 priority 1281\n"));
        assert!(s.contains("ip -6 route replace local ::/0 dev lo table 1281\n"));
        assert!(s.contains("socket transparent 1 meta mark set 0x1281 accept"));
        assert!(s.contains("# nft delete table inet forwarder_tproxy\n"));
    }
}
