#!/usr/bin/env python3
"""One scripted chat user for the lab (case 2).

Connects to the chat server through the forwarder, sends its nickname, waits until it can see its
peer, then sends COUNT messages that carry their own send time and collects the peer's. It does not
depend on the server's line format: it looks for its own marker anywhere in a received line.
The two peers run in different namespaces of one machine, so their clocks are the same clock and
"received - sent" is the delivery delay. Prints a JSON summary on stdout.
"""

import argparse
import json
import re
import select
import socket
import sys
import time



class Lines:
    """Buffers a socket's bytes and hands out complete lines."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.eof = False

    def read(self, timeout):
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return []
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return []
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


def send_line(sock, text):
    sock.sendall(text.encode() + b"\n")


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--nick", required=True)
    ap.add_argument("--peer", required=True, help="the other user's nickname")
    ap.add_argument("--count", type=int, default=50, help="messages to send")
    ap.add_argument("--interval-ms", type=int, default=100, help="pause between messages")
    ap.add_argument("--timeout", type=float, default=60, help="give up after this many seconds")
    ap.add_argument("--transcript", help="write every received line here")
    ap.add_argument("--session", default="s", help="tag shared by both peers; lines of other sessions (e.g. replayed history) are ignored")
    args = ap.parse_args()
    tag = re.escape(args.session)
    mark = re.compile(rf"labmsg session={tag} from=(\S+) seq=(\d+) sent=(\d+\.\d+)")
    hello = re.compile(rf"lab(hello|ack) session={tag} from=(\S+)")

    deadline = time.monotonic() + args.timeout
    transcript = []
    try:
        sock = socket.create_connection((args.host, args.port), timeout=10)
    except OSError as e:
        return finish(args, f"cannot connect to {args.host}:{args.port}: {e}", 0, {}, 0, transcript)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lines = Lines(sock)
    send_line(sock, args.nick)

    delays = {}
    own_seen = 0
    peer_seen = False

    def handle(line):
        """Records one received line; the peer's messages may already arrive during phase 1."""
        nonlocal own_seen, peer_seen
        received = time.time()
        transcript.append(line)
        m = mark.search(line)
        if m:
            if m.group(1) == args.nick:
                own_seen += 1
            elif m.group(1) == args.peer:
                delays.setdefault(int(m.group(2)), (received - float(m.group(3))) * 1000)
                peer_seen = True
            return
        m = hello.search(line)
        if m and m.group(2) == args.peer:
            peer_seen = True

    # Phase 1: say hello until the peer answers, so no message is sent before both are in the room.
    next_hello = 0.0
    while not peer_seen:
        if time.monotonic() > deadline or lines.eof:
            return finish(args, "peer never appeared", 0, delays, own_seen, transcript)
        if time.monotonic() >= next_hello:
            send_line(sock, f"labhello session={args.session} from={args.nick}")
            next_hello = time.monotonic() + 0.2
        for line in lines.read(0.05):
            handle(line)
    send_line(sock, f"laback session={args.session} from={args.nick}")

    # Phase 2: send COUNT timestamped messages while collecting the peer's.
    sent = 0
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if sent == args.count and len(delays) >= args.count:
            break
        if now > deadline or lines.eof:
            break
        if sent < args.count and now >= next_send:
            send_line(sock, f"labmsg session={args.session} from={args.nick} seq={sent} sent={time.time():.6f}")
            sent += 1
            next_send = now + args.interval_ms / 1000
        wait = next_send - time.monotonic() if sent < args.count else 0.2
        for line in lines.read(wait):
            handle(line)
    sock.close()
    return finish(args, None, sent, delays, own_seen, transcript)


def finish(args, error, sent, delays, own_seen, transcript):
    if args.transcript:
        with open(args.transcript, "w") as f:
            f.write("\n".join(transcript) + "\n")
    values = sorted(delays.values())
    missing = [i for i in range(args.count) if i not in delays]
    summary = {
        "nick": args.nick,
        "peer": args.peer,
        "error": error,
        "sent": sent,
        "expected_from_peer": args.count,
        "received_from_peer": len(delays),
        "missing_from_peer": missing,
        "own_messages_seen": own_seen,
        "delay_ms": {
            "avg": round(sum(values) / len(values), 3) if values else None,
            "p50": round(percentile(values, 50), 3) if values else None,
            "p99": round(percentile(values, 99), 3) if values else None,
            "max": round(values[-1], 3) if values else None,
        },
    }
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0 if error is None and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
