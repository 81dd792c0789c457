#!/usr/bin/env bash
# CI step: rule options against real consumers, in network namespaces of its own (fwopt-*), so
# clients have addresses of their own. apache2 with mod_remoteip (`RemoteIPProxyProtocol On`) logs
# the true client address behind send_proxy=v1 and =v2, and so does nginx (`listen … proxy_protocol`,
# `$proxy_protocol_addr`); HAProxy in front with `send-proxy-v2`
# feeds a rule with accept_proxy (whose access list then sees the client HAProxy names); an allow
# list serves one client namespace and refuses the other. Bounded in time; always cleans up.
#
#   fwopt-c1 10.78.1.5 ──┐                      ┌── fwopt-be 10.78.2.10 (apache2 :8080, nginx :8090)
#   fwopt-c2 10.78.3.6 ──┴── fwopt-fw (forwarder, haproxy) ──┘
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
root=$PWD

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
ensure_apt_packages apache2 nginx haproxy curl iproute2

bin=${OPTIONS_FORWARDER_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/forwarder}
if [ ! -x "$bin" ]; then
    echo "options: $bin not found: build the workspace first (cargo build --workspace)" >&2
    exit 1
fi

work=$(mktemp -d /tmp/fwopt.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for ns in fwopt-c1 fwopt-c2 fwopt-fw fwopt-be; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
    done
    sleep 0.5
    for ns in fwopt-c1 fwopt-c2 fwopt-fw fwopt-be; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$work"
}
trap cleanup EXIT
fail() {
    echo "options: FAIL: $*" >&2
    for f in "$work"/*.log; do
        echo "--- $f" >&2
        tail -n 20 "$f" >&2
    done
    exit 1
}
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

# Leftovers of a killed run first.
for ns in fwopt-c1 fwopt-c2 fwopt-fw fwopt-be; do ip netns del "$ns" 2>/dev/null; done
for ns in fwopt-c1 fwopt-c2 fwopt-fw fwopt-be; do
    ip netns add "$ns" || fail "ip netns add $ns"
    in_ns "$ns" ip link set lo up
done
link() { # link NS NS_ADDR FW_ADDR NET
    ip link add "o-$1" type veth peer name "f-$1"
    ip link set "o-$1" netns "fwopt-$1"
    ip link set "f-$1" netns fwopt-fw
    in_ns "fwopt-$1" ip addr add "$2/24" dev "o-$1"
    in_ns fwopt-fw ip addr add "$3/24" dev "f-$1"
    in_ns "fwopt-$1" ip link set "o-$1" up
    in_ns fwopt-fw ip link set "f-$1" up
}
link c1 10.78.1.5 10.78.1.1 || fail "veth c1"
link c2 10.78.3.6 10.78.3.1 || fail "veth c2"
link be 10.78.2.10 10.78.2.1 || fail "veth be"

# apache2: mod_remoteip takes the client from the PROXY header (v1 or v2) and logs it as %a.
mkdir -p "$work/www"
echo ok >"$work/www/index.html"
mods=/usr/lib/apache2/modules
cat >"$work/apache.conf" <<CONF
ServerName fwopt-be
LoadModule mpm_event_module $mods/mod_mpm_event.so
LoadModule authz_core_module $mods/mod_authz_core.so
LoadModule remoteip_module $mods/mod_remoteip.so
User www-data
Group www-data
Listen 10.78.2.10:8080
PidFile $work/apache.pid
DefaultRuntimeDir $work
Mutex file:$work default
ErrorLog $work/apache-error.log
DocumentRoot $work/www
RemoteIPProxyProtocol On
LogFormat "%a %q" client
CustomLog $work/apache-access.log client
<Directory $work/www>
    Require all granted
</Directory>
CONF
in_ns fwopt-be apache2 -f "$work/apache.conf" -DFOREGROUND >"$work/apache.log" 2>&1 &
pids+=($!)

# nginx: the address from the PROXY header is \$proxy_protocol_addr.
mkdir -p "$work/nginx-tmp"
cat >"$work/nginx.conf" <<CONF
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events {}
http {
    client_body_temp_path $work/nginx-tmp;
    log_format pp '\$proxy_protocol_addr \$args';
    server {
        listen 10.78.2.10:8090 proxy_protocol;
        access_log $work/nginx-access.log pp;
        location / { return 200 "ok\n"; }
    }
}
CONF
in_ns fwopt-be nginx -c "$work/nginx.conf" -g 'daemon off;' >"$work/nginx.log" 2>&1 &
pids+=($!)

cat >"$work/rules.csv" <<CSV
v1,8001,10.78.2.10,8080,send_proxy=v1
v2,8002,10.78.2.10,8080,send_proxy=v2
behind-haproxy,127.0.0.1:8003,10.78.2.10,8080,"accept_proxy send_proxy=v2 deny=10.78.3.6"
acl,8004,10.78.2.10,8080,"allow=10.78.1.0/24 send_proxy=v1"
nginx-v1,8005,10.78.2.10,8090,send_proxy=v1
nginx-v2,8006,10.78.2.10,8090,send_proxy=v2
CSV
in_ns fwopt-fw "$bin" --rules "$work/rules.csv" --no-web --workers 2 >"$work/forwarder.log" 2>&1 &
pids+=($!)

cat >"$work/haproxy.cfg" <<CFG
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 10.78.1.1:8100
    bind 10.78.3.1:8100
    default_backend fwd
backend fwd
    server forwarder 127.0.0.1:8003 send-proxy-v2
CFG
in_ns fwopt-fw haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)

ready() { # ready NS ADDR PORT
    for _ in $(seq 100); do
        in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
ready fwopt-be 10.78.2.10 8080 || fail "apache2 never listened"
ready fwopt-be 10.78.2.10 8090 || fail "nginx never listened"
ready fwopt-fw 10.78.1.1 8100 || fail "haproxy never listened"
# The forwarder's ports: probing 8001 would put a line in apache's log, so look at the sockets.
for _ in $(seq 100); do
    n=$(in_ns fwopt-fw ss -Htln | grep -cE ':(8001|8002|8003|8004|8005|8006) ')
    [ "$n" -ge 6 ] && break
    sleep 0.1
done
[ "$n" -ge 6 ] || fail "the forwarder never listened on its six ports"

get() { # get NS URL -> body (curl's exit status)
    in_ns "$1" curl -s --max-time 5 "$2"
}
logged() { # logged LINE [LOG]: the access log (apache's by default) has it, once written
    for _ in $(seq 50); do
        grep -qxF "$1" "${2:-$work/apache-access.log}" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

[ "$(get fwopt-c1 http://10.78.1.1:8001/index.html?v1)" = ok ] || fail "v1 request"
logged "10.78.1.5 ?v1" || fail "apache did not log 10.78.1.5 behind send_proxy=v1"
[ "$(get fwopt-c2 http://10.78.3.1:8002/index.html?v2)" = ok ] || fail "v2 request"
logged "10.78.3.6 ?v2" || fail "apache did not log 10.78.3.6 behind send_proxy=v2"
echo "options: apache2 mod_remoteip logged the clients' own addresses via PROXY v1 and v2"
[ "$(get fwopt-c1 http://10.78.1.1:8005/?nv1)" = ok ] || fail "nginx v1 request"
logged "10.78.1.5 nv1" "$work/nginx-access.log" || fail "nginx did not see 10.78.1.5 via PROXY v1"
[ "$(get fwopt-c2 http://10.78.3.1:8006/?nv2)" = ok ] || fail "nginx v2 request"
logged "10.78.3.6 nv2" "$work/nginx-access.log" || fail "nginx did not see 10.78.3.6 via PROXY v2"
echo "options: nginx's \$proxy_protocol_addr is the client's own address via PROXY v1 and v2"

[ "$(get fwopt-c1 http://10.78.1.1:8100/index.html?haproxy)" = ok ] || fail "request through haproxy"
logged "10.78.1.5 ?haproxy" || fail "the client HAProxy named did not reach apache"
if get fwopt-c2 http://10.78.3.1:8100/index.html?haproxy-denied >/dev/null; then
    fail "10.78.3.6 through haproxy was served despite deny=10.78.3.6"
fi
grep -q "refused by the access list.*client=10.78.3.6" "$work/forwarder.log" \
    || fail "the refusal of 10.78.3.6 was not logged"
echo "options: behind HAProxy send-proxy-v2, accept_proxy passed 10.78.1.5 on and refused 10.78.3.6"

[ "$(get fwopt-c1 http://10.78.1.1:8004/index.html?acl)" = ok ] || fail "allowed client refused"
logged "10.78.1.5 ?acl" || fail "allowed client not logged"
if get fwopt-c2 http://10.78.3.1:8004/index.html?acl-denied >/dev/null; then
    fail "10.78.3.6 was served though only 10.78.1.0/24 is allowed"
fi
if grep -q "acl-denied\|haproxy-denied" "$work/apache-access.log"; then
    fail "a refused client reached apache"
fi
echo "options: allow=10.78.1.0/24 served 10.78.1.5 and refused 10.78.3.6 before any backend connect"
echo "options: OK"
