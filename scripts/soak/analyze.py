#!/usr/bin/env python3
"""The table of scripts/soak.sh, from what the run left in its results folder.

Reads the faults it injected (faults.tsv), what every traffic role saw (traffic/, tls/, chat/),
the forwarder's RSS and descriptors over time (timeseries.csv) and the logs; matches every lost
connection to an injected fault that explains it (a killed worker's connections, a killed
backend's); prints the table, writes summary.md, summary.json and chart.png; exits 0 only if no
byte was corrupted, every loss is explained, every fault did what it should, nothing leaked and
no log has a panic or an error.
"""

import csv
import glob
import json
import os
import re
import sys

# A loss this long after a kill still belongs to it: a slow reader notices the reset late.
AFTER_MS = 10_000
BEFORE_MS = 1_000
LEAK_TOLERANCE = 0.05
# A killed worker's connections are counted from its descriptors just before the kill (about
# 0.1 s under load); connections it accepts in between die with it. So its toll may exceed the
# count by this share (2,519 TLS + 13 other losses for 2,525 counted in a 10-minute run).
HELD_RACE = 0.02


def env(path):
    out = {}
    for line in open(path):
        k, _, v = line.strip().partition("=")
        if k:
            out[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
    return out


def faults_of(path):
    rows = list(csv.DictReader(open(path), delimiter="\t"))
    for r in rows:
        r["t_start_ms"], r["t_end_ms"], r["held"] = int(r["t_start_ms"]), int(r["t_end_ms"]), int(r["held"] or 0)
        r["explained"] = 0
    return rows


def kill_target_backend(f):
    """The soak backend id a kill-backend fault took down (bulk1 -> 1), or None."""
    m = re.fullmatch(r"bulk(\d+)", f["target"])
    return int(m.group(1)) if m else None


# What a client is doing when it meets a reset made before the forwarder relayed a byte for it:
# the kernel's reset of a killed worker's accept queue (net.ipv4.tcp_migrate_req=0), or the
# forwarder's own when the fd-budget fault left it no descriptor for the backend socket.
EARLY_STEPS = ("connecting", "sending the header", "reading the backend id")


def early_reset(e):
    """A reset met while connecting or before the first byte came back (docs/sysctl.md)."""
    return e["cause"] == "reset" and e["detail"].startswith(EARLY_STEPS)


def nearest(faults, t):
    """'kind target, N s after|before' of the fault nearest to t, for the unexplained list."""
    best = None
    for f in faults:
        d = t - f["t_end_ms"] if t > f["t_end_ms"] else t - f["t_start_ms"]
        if best is None or abs(d) < abs(best[0]):
            best = (d, f)
    if best is None:
        return "no fault injected"
    d, f = best
    return f"nearest fault {f['kind']} {f['target']}, {abs(d) / 1000:.1f} s {'after' if d >= 0 else 'before'} it"


def explain(faults, t_start, t_end, fits, kinds=("kill-worker", "kill-backend")):
    """The first fault of `kinds` whose window covers [t_start, t_end] and that `fits`, or None."""
    for f in faults:
        if f["kind"] not in kinds:
            continue
        if f["t_start_ms"] - BEFORE_MS <= t_end and t_start <= f["t_end_ms"] + AFTER_MS and fits(f):
            return f
    return None


def main(out):
    run = env(f"{out}/run.env")
    faults = faults_of(f"{out}/faults.tsv")
    losses = []  # (what, cause, fault or None)
    corrupt = []
    totals = {"bytes_verified": 0, "bulk_ok": 0, "churn_ok": 0, "backend_ok": 0, "udp_ok": 0}
    udp = {"bytes": 0, "late": 0}
    udp_losses = []  # kept apart: a datagram lost does not use up a kill's count of connections

    # Bulk and churn clients (warm-up and soak) and the backends: summaries and events.
    for path in sorted(glob.glob(f"{out}/traffic/**/*.json", recursive=True)):
        doc = json.load(open(path))
        c, who = doc["counts"], doc["who"]
        if who == "udp":
            udp["bytes"] += c["bytes_verified"]
            udp["late"] += c.get("late", 0)
        else:
            totals["bytes_verified"] += c["bytes_verified"]
        key = "backend_ok" if who.startswith("backend") else f"{who}_ok"
        totals[key] = totals.get(key, 0) + c["connections_ok"]
    for path in sorted(glob.glob(f"{out}/traffic/**/*.events.jsonl", recursive=True)):
        for line in open(path):
            if not line.strip():
                continue
            e = json.loads(line)
            if e["event"] == "corrupt":
                corrupt.append(f"{e['who']}: {e['detail']}")
                continue
            backend = e.get("backend")
            client_side = not e["who"].startswith("backend")
            if e["who"] == "udp":
                # A datagram in flight dies with a killed worker's session; a new session cannot
                # open while the descriptor budget is full. Nothing else may drop one on loopback.
                f = explain(faults, e["t_ms"], e["t_ms"], lambda f: True, ("kill-worker", "fd-budget"))
                udp_losses.append((f"udp ({e['cause']}: {e['detail']})", e["cause"], f, True))
                continue

            def fits(f, backend=backend, client_side=client_side):
                if f["kind"] == "kill-worker":
                    return True
                # A killed soak backend explains its own clients' losses (or one whose backend
                # the client never learnt).
                return client_side and kill_target_backend(f) is not None and backend in (None, kill_target_backend(f))

            f = explain(faults, e["t_ms"], e["t_ms"], fits)
            if f is None and client_side and early_reset(e):
                # Made on a fault's behalf before any byte was relayed: a budget fault's too.
                f = explain(faults, e["t_ms"], e["t_ms"], lambda f: True, ("kill-worker", "fd-budget"))
            what = f"{e['who']} ({e['cause']}: {e['detail']})"
            if f is None:
                what += f"; {nearest(faults, e['t_ms'])}"
            losses.append((what, e["cause"], f, client_side))

    # TLS rounds: the client's summary has its losses and failures by cause, and its time span.
    tls_losses = []  # (round, start, end, cause, count): matched after the others, by count
    tls = {"rounds": 0, "ok": 0, "lost": 0, "failed": 0, "bytes": 0, "messages": 0, "bad": []}
    for path in sorted(glob.glob(f"{out}/tls/*.json")):
        base = path[:-5]
        tls["rounds"] += 1
        try:
            s = json.load(open(path))
        except Exception as e:
            tls["bad"].append(f"{os.path.basename(base)}: no summary ({e}); see {base}.log")
            continue
        start, end = int(open(f"{base}.start").read()), int(open(f"{base}.end").read())
        tls["ok"] += s["connections_ok"] - s["connections_lost"]
        tls["lost"] += s["connections_lost"]
        tls["failed"] += s["connections_failed"]
        tls["bytes"] += s["bytes_received"]
        tls["messages"] += s["messages"]
        if s["errors"].get("wrong_echo", 0):
            corrupt.append(f"tls {os.path.basename(base)}: {s['errors']['wrong_echo']} wrong echoes")
        for cause, n in sorted(s["errors"].items()):
            if n and cause != "wrong_echo":
                tls_losses.append((os.path.basename(base), start, end, cause, n))

    # Chat pairs: a pair that did not finish is a loss (both users of it).
    chat = {"pairs": 0, "ok": 0}
    for path in sorted(glob.glob(f"{out}/chat/*.result")):
        start, end, rc1, rc2 = (int(x) for x in open(path).read().split())
        chat["pairs"] += 1
        if rc1 == 0 and rc2 == 0:
            chat["ok"] += 1
            continue
        f = explain(faults, start, end, lambda f: f["kind"] == "kill-worker")
        losses.append((f"chat {os.path.basename(path)[:-7]} (exit {rc1}/{rc2})", "chat", f, True))

    for _, _, f, client_side in losses:
        if f is not None and client_side:
            f["explained"] += 1
    # A TLS round reports only how many it lost, not when: each loss goes to a kill during the
    # round (a killed worker, or a killed echo server) that still has connections of its own to
    # account for; more losses than the victims held stay unexplained.
    for name, start, end, cause, n in tls_losses:
        for f in faults:
            if n == 0:
                break
            if f["kind"] not in ("kill-worker", "kill-backend") or not (
                f["kind"] == "kill-worker" or f["target"].startswith("echo")
            ):
                continue
            if not (f["t_start_ms"] - BEFORE_MS <= end and start <= f["t_end_ms"] + AFTER_MS):
                continue
            room = f["held"] + (int(f["held"] * HELD_RACE) if f["kind"] == "kill-worker" else 0)
            take = min(n, max(room - f["explained"], 0))
            f["explained"] += take
            n -= take
            losses += [(f"tls {name} ({cause})", cause, f, True)] * take
        losses += [(f"tls {name} ({cause}): more losses than the kills during the round held", cause, None, True)] * n
    unexplained = [what for what, _, f, _ in losses + udp_losses if f is None]
    by_cause = {}
    for _, cause, f, client_side in losses:
        if client_side:
            by_cause[cause] = by_cause.get(cause, 0) + 1
    client_losses = sum(1 for *_, cs in losses if cs)

    # Logs of the servers and the forwarder (the load clients' logs hold their losses, not errors).
    log_problems = []
    for path in sorted(glob.glob(f"{out}/logs/*")):
        for n, line in enumerate(open(path, errors="replace"), 1):
            if "panicked" in line or re.search(r"\bERROR\b", line):
                log_problems.append(f"{os.path.basename(path)}:{n}: {line.strip()[:200]}")

    def count(kind, ok=None):
        return sum(1 for f in faults if f["kind"] == kind and (ok is None or f["ok"] == ok))

    failed_faults = [f for f in faults if f["ok"] != "yes"]
    reloads = count("rules-file") + count("web-api") + count("sighup")
    reloads_ok = count("rules-file", "yes") + count("web-api", "yes") + count("sighup", "yes")
    rss_ok = run["RSS1"] <= run["RSS0"] * (1 + LEAK_TOLERANCE)
    fds_ok = run["FDS1"] <= run["FDS0"] * (1 + LEAK_TOLERANCE)
    moved = totals["bytes_verified"] + tls["bytes"] + udp["bytes"]
    traffic_ok = (totals["bulk_ok"] > 0 and totals["churn_ok"] > 0 and tls["ok"] > 0 and chat["ok"] > 0
                  and totals["udp_ok"] > 0)

    checks = [
        ("no byte corrupted", not corrupt, f"{len(corrupt)} corrupted"),
        ("every loss explained by an injected fault", not unexplained, f"{len(unexplained)} unexplained"),
        ("every fault did what it should", not failed_faults, f"{len(failed_faults)} failed"),
        ("every reload applied", reloads_ok == reloads and run["RELOAD_ERRORS"] == 0,
         f"{reloads_ok}/{reloads}, {run['RELOAD_ERRORS']} reload errors logged"),
        ("RSS back within 5 %", rss_ok, f"{run['RSS0']} -> {run['RSS1']} KiB"),
        ("descriptors back within 5 %", fds_ok, f"{run['FDS0']} -> {run['FDS1']}"),
        ("no panic or error in the logs", not log_problems, f"{len(log_problems)} lines"),
        ("every kind of traffic ran", traffic_ok, "bulk, churn, TLS, chat and UDP all completed"),
        ("every TLS round wrote its summary", not tls["bad"], f"{len(tls['bad'])} without"),
    ]
    passed = all(ok for _, ok, _ in checks)

    def gib(b):
        return f"{b / 2**30:,.2f} GiB" if b >= 2**30 else f"{b / 2**20:,.1f} MiB"

    rows = [
        ("duration", f"{run['DURATION_S']} s of load (+ 8 s warm-up), a fault every {run['FAULT_EVERY']} s"),
        ("connections asked", f"{run['CONNECTIONS']:,}: {run['TLS_CONNS']:,} TLS, {run['BULK']} bulk streams, {run['CHURN']} churn loops, {run['CHAT_PAIRS']} chat pairs"),
        ("bytes moved and verified", f"{gib(moved)} ({gib(totals['bytes_verified'])} bulk/churn streams checked byte by byte at both ends, {gib(tls['bytes'])} TLS echoes checked by the client, {gib(udp['bytes'])} UDP echoes checked whole)"),
        ("connections completed", f"bulk {totals['bulk_ok']:,}, churn {totals['churn_ok']:,}, TLS {tls['ok']:,} (in {tls['rounds']} rounds, {tls['messages']:,} echoes), chat pairs {chat['ok']}/{chat['pairs']}"),
        ("UDP datagrams", f"{totals['udp_ok']:,} echoed whole in {run.get('UDP_SESSIONS', '?')} sessions; {len(udp_losses)} lost ({sum(1 for *_, f, _ in udp_losses if f is None)} unexplained), {udp['late']} of them came back late"),
        ("connections lost", f"{client_losses} ({', '.join(f'{k} {v}' for k, v in sorted(by_cause.items())) or 'none'}); backend side {len(losses) - client_losses}; unexplained {len(unexplained)}"),
        ("corrupted", f"{len(corrupt)}"),
        ("reloads applied", f"{reloads_ok}/{reloads} (rules file {count('rules-file', 'yes')}, web API {count('web-api', 'yes')}, SIGHUP {count('sighup', 'yes')})"),
        ("worker restarts", f"{count('kill-worker', 'yes')}/{count('kill-worker')} killed workers came back"),
        ("backends killed and restarted", f"{count('kill-backend', 'yes')}/{count('kill-backend')}; stalled {count('stall-backend', 'yes')}/{count('stall-backend')}"),
        ("descriptor budget filled", f"{count('fd-budget', 'yes')}/{count('fd-budget')}"),
        ("forwarder RSS start / end", f"{run['RSS0']:,} / {run['RSS1']:,} KiB ({(run['RSS1'] / max(run['RSS0'], 1) - 1) * 100:+.1f} %)"),
        ("forwarder descriptors start / end", f"{run['FDS0']:,} / {run['FDS1']:,} ({(run['FDS1'] / max(run['FDS0'], 1) - 1) * 100:+.1f} %)"),
        ("panics and errors in the logs", f"{len(log_problems)}"),
    ]
    lines = ["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "| check | result | |", "|---|---|---|"]
    lines += [f"| {name} | {'PASS' if ok else 'FAIL'} | {why} |" for name, ok, why in checks]
    lines += ["", "Losses by fault (client side; held = the fault's victim's connections when it struck; a killed",
              f"worker's may exceed it by {HELD_RACE:.0%}, the connections it accepted while they were counted):", ""]
    for f in faults:
        if f["kind"] in ("kill-worker", "kill-backend"):
            lines.append(f"- {f['kind']} {f['target']}: {f['explained']} lost, {f['held']} held")
    if unexplained:
        lines += ["", "Unexplained losses:"] + [f"- {u}" for u in unexplained[:50]]
    if corrupt:
        lines += ["", "Corrupted:"] + [f"- {c}" for c in corrupt[:50]]
    if failed_faults:
        lines += ["", "Faults that did not do what they should:"] + [f"- {f['kind']} {f['target']}: {f['detail']}" for f in failed_faults]
    if log_problems:
        lines += ["", "Log lines:"] + [f"- {p}" for p in log_problems[:50]]
    lines += ["", f"soak: {'PASS' if passed else 'FAIL'}"]
    text = "\n".join(lines)
    print(text)
    open(f"{out}/summary.md", "w").write(text + "\n")
    json.dump({"passed": passed, "rows": dict(rows), "checks": {n: ok for n, ok, _ in checks},
               "unexplained": unexplained, "corrupt": corrupt, "faults": faults, "log_problems": log_problems},
              open(f"{out}/summary.json", "w"), indent=2)
    chart(out, faults)
    return 0 if passed else 1


def chart(out, faults):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no chart: python3-matplotlib missing)", file=sys.stderr)
        return
    rows = list(csv.DictReader(open(f"{out}/timeseries.csv")))
    if not rows:
        return
    t0 = int(rows[0]["t_ms"])
    t = [(int(r["t_ms"]) - t0) / 1000 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(11, 7.5), sharex=True)
    series = [("connections", "established client connections", 1), ("rss_kib", "forwarder RSS, MiB", 1024),
              ("fds", "forwarder descriptors", 1)]
    colours = {"kill-worker": "red", "kill-backend": "darkorange", "stall-backend": "gold", "fd-budget": "purple",
               "rules-file": "green", "web-api": "teal", "sighup": "blue"}
    for ax, (key, label, div) in zip(axes, series):
        ax.plot(t, [int(r[key]) / div for r in rows], lw=1, color="black")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        for f in faults:
            ax.axvline((f["t_start_ms"] - t0) / 1000, color=colours.get(f["kind"], "grey"), lw=0.8, alpha=0.7)
    for kind, c in colours.items():
        axes[0].plot([], [], color=c, label=kind)
    axes[0].legend(fontsize=7, ncol=7, loc="upper center", bbox_to_anchor=(0.5, 1.3))
    axes[-1].set_xlabel("seconds since the forwarder started (warm-up first, then the soak)")
    fig.tight_layout()
    fig.savefig(f"{out}/chart.png", dpi=90)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "soak-results"))
