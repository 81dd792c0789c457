#!/usr/bin/env bash
# CI step: `transparent` against real servers that know nothing of proxies. In namespaces of its
# own (tpl-*), sshd's log, apache2's access log (%h, no mod_remoteip), the chat server's and the
# echo server's connection logs behind a transparent gateway name the client namespace's address;
# `forwarder transparent-setup undo` leaves no rule, route or nft table. Bounded; always cleans up.
#
#   tpl-c 10.131.1.5 ── 10.131.1.1 tpl-gw (forwarder) 10.131.2.1 ── tpl-s 10.131.2.10
#                                                                    (default route via 10.131.2.1)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
root=$PWD

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages openssh-server openssh-client apache2 nftables iproute2

target=${CARGO_TARGET_DIR:-$root/target}/debug
for b in forwarder ssl-echo-server chat-server; do
    [ -x "$target/$b" ] || { echo "transparent: $target/$b not found: cargo build --workspace first" >&2; exit 1; }
done

CLIENT=10.131.1.5 GW_FRONT=10.131.1.1 GW_BACK=10.131.2.1 SERVER=10.131.2.10
work=$(mktemp -d /tmp/tpl.XXXXXX)
chmod 755 "$work"
drop_namespaces() {
    ip netns exec tpl-gw "$target/forwarder" transparent-setup undo >/dev/null 2>&1
    for ns in tpl-c tpl-gw tpl-s; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
    done
    sleep 0.5
    for ns in tpl-c tpl-gw tpl-s; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
}
cleanup() {
    drop_namespaces
    [ -f "$work/created-run-sshd" ] && rmdir /run/sshd 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
fail() {
    echo "transparent: FAIL: $*" >&2
    for log in forwarder.log sshd.log echo.log chat.log access.log; do
        [ -s "$work/$log" ] && { echo "--- $log" >&2; tail -5 "$work/$log" >&2; }
    done
    exit 1
}
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
wait_for() { # SECONDS WHAT CMD...
    local t=$1 what=$2 i
    shift 2
    for ((i = 0; i < t * 10; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    fail "timed out waiting for $what"
}
listening() { in_ns "$1" ss -Htln "sport = :$2" | grep -q LISTEN; }

drop_namespaces 2>/dev/null # a run killed before its trap
for ns in tpl-c tpl-gw tpl-s; do
    if ! ip netns add "$ns" || ! ip -n "$ns" link set lo up; then fail "netns $ns"; fi
done
ip -n tpl-gw link add tpe0 type veth peer name eth0 netns tpl-c
ip -n tpl-gw link add tpe1 type veth peer name eth0 netns tpl-s
ip -n tpl-gw addr add "$GW_FRONT/24" dev tpe0
ip -n tpl-gw addr add "$GW_BACK/24" dev tpe1
ip -n tpl-c addr add "$CLIENT/24" dev eth0
ip -n tpl-s addr add "$SERVER/24" dev eth0
for l in "tpl-gw tpe0" "tpl-gw tpe1" "tpl-c eth0" "tpl-s eth0"; do
    # shellcheck disable=SC2086
    set -- $l
    ip -n "$1" link set "$2" up
done
ip -n tpl-c route add default via "$GW_FRONT"
ip -n tpl-s route add default via "$GW_BACK"

# The servers, each logging its peers its own way.
# sshd refuses keys others can read: they live apart from apache2's world-readable files.
ssh=$work/ssh
mkdir -m 700 "$ssh"
ssh-keygen -q -t ed25519 -N '' -f "$ssh/client_key"
ssh-keygen -q -t ed25519 -N '' -f "$ssh/host_key"
cp "$ssh/client_key.pub" "$ssh/authorized_keys"
cat >"$ssh/sshd_config" <<CONF
ListenAddress $SERVER:22
HostKey $ssh/host_key
PidFile $ssh/sshd.pid
AuthorizedKeysFile $ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
CONF
if [ ! -d /run/sshd ]; then mkdir -p /run/sshd && chmod 755 /run/sshd && touch "$work/created-run-sshd"; fi
in_ns tpl-s /usr/sbin/sshd -D -e -f "$ssh/sshd_config" 2>"$work/sshd.log" &
mods=/usr/lib/apache2/modules
mkdir -p "$work/htdocs" "$work/run"
echo "transparent lab page" >"$work/htdocs/index.html"
cat >"$work/apache2.conf" <<CONF
LoadModule mpm_event_module $mods/mod_mpm_event.so
LoadModule authz_core_module $mods/mod_authz_core.so
LoadModule dir_module $mods/mod_dir.so
LoadModule mime_module $mods/mod_mime.so
ServerName tpl-s
Listen $SERVER:80
User www-data
Group www-data
PidFile $work/run/apache2.pid
DefaultRuntimeDir $work/run
Mutex file:$work/run default
ErrorLog $work/apache-error.log
LogFormat "%h %t \"%r\" %>s %b" lab
CustomLog $work/access.log lab
TypesConfig /etc/mime.types
DocumentRoot $work/htdocs
DirectoryIndex index.html
<Directory $work/htdocs>
    Require all granted
</Directory>
CONF
chmod 755 "$work"
chmod -R a+rX "$work/htdocs" "$work/run" "$work/apache2.conf"
in_ns tpl-s /usr/sbin/apache2 -f "$work/apache2.conf" -DFOREGROUND >"$work/apache.out" 2>&1 &
in_ns tpl-s "$target/ssl-echo-server" --plain --listen "$SERVER:7000" --workers 1 --log-level debug >"$work/echo.log" 2>&1 &
in_ns tpl-s "$target/chat-server" --listen "$SERVER:7100" --log-level debug >"$work/chat.log" 2>&1 &
for port in 22 80 7000 7100; do wait_for 20 "server port $port" listening tpl-s "$port"; done

in_ns tpl-gw "$target/forwarder" transparent-setup apply || fail "transparent-setup apply"
cat >"$work/entries.csv" <<RULES
ssh,2222,$SERVER,22,transparent
web,8080,$SERVER,80,transparent
echo,7000,$SERVER,7000,transparent
chat,7100,$SERVER,7100,transparent
RULES
in_ns tpl-gw "$target/forwarder" --rules "$work/entries.csv" --no-web --workers 1 >"$work/forwarder.log" 2>&1 &
for port in 2222 8080 7000 7100; do wait_for 20 "forwarder port $port" listening tpl-gw "$port"; done
grep -q "transparent (the backend sees the client's address" "$work/forwarder.log" || fail "no start line naming the transparent rules"

# The client's traffic, each bounded in time.
in_ns tpl-c timeout 20 ssh -i "$ssh/client_key" -p 2222 -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o BatchMode=yes "root@$GW_FRONT" true || fail "ssh through the gateway"
in_ns tpl-c timeout 20 curl -fsS "http://$GW_FRONT:8080/" | grep -q "transparent lab page" || fail "http through the gateway"
in_ns tpl-c timeout 20 python3 - "$GW_FRONT" <<'PY' || fail "echo and chat through the gateway"
import socket, sys
gw = sys.argv[1]
s = socket.create_connection((gw, 7000), timeout=10)
s.sendall(b"transparent\n")
assert s.recv(64) == b"transparent\n"
s.close()
c = socket.create_connection((gw, 7100), timeout=10)
c.settimeout(2)
try:
    c.recv(4096)
except socket.timeout:
    pass
c.close()
PY

check() { # WHAT FILE — the servers write their logs as connections end: poll the file
    wait_for 10 "$1 to name the client $CLIENT" grep -q "$CLIENT" "$2"
    echo "transparent: $1 names the client: $(grep -m1 "$CLIENT" "$2")"
}
check "sshd's log" "$work/sshd.log"
check "apache2's access log (%h, no mod_remoteip)" "$work/access.log"
check "the echo server's log" "$work/echo.log"
check "the chat server's log" "$work/chat.log"

in_ns tpl-gw "$target/forwarder" transparent-setup undo || fail "transparent-setup undo"
left=$(in_ns tpl-gw sh -c 'ip -4 rule; ip -6 rule; ip -4 route show table 1281; ip -6 route show table 1281; nft list tables')
if grep -qE "0x1281|forwarder_tproxy|table 1281" <<<"$left"; then fail "undo left: $left"; fi
echo "transparent: PASS (undo left no rule, route or nft table)"
