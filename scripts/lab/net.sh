# shellcheck shell=bash
# The topology: one switch namespace with two bridges (front: gateway + clients, back: gateway +
# servers) and one namespace per machine of the original lab, each with a veth onto its bridge.
# The gateway has one leg on each bridge and no IP forwarding.

# ns_add NS — a namespace with loopback up and socket limits sized for 20,000 connections
# (these sysctls are per network namespace; the host's own values are not changed).
ns_add() {
    local ns=$1
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    in_ns "$ns" sysctl -qw net.ipv4.ip_local_port_range="10000 65000" \
        net.ipv4.tcp_tw_reuse=1 net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535
}

# plug NS IFACE ADDR/PREFIX BRIDGE PEER — a veth pair: IFACE inside NS, PEER on BRIDGE in the switch.
plug() {
    local ns=$1 ifname=$2 addr=$3 bridge=$4 peer=$5
    ip -n "$NS_SW" link add "$peer" type veth peer name "$ifname" netns "$ns"
    ip -n "$NS_SW" link set "$peer" master "$bridge" up
    ip -n "$ns" addr add "$addr" dev "$ifname"
    ip -n "$ns" link set "$ifname" up
}

link_up() { # NS IFACE
    ip -n "$1" -br link show dev "$2" | grep -q ' UP '
}

net_up() {
    local ns
    for ns in "${LAB_NAMESPACES[@]}"; do ns_add "$ns"; done
    ip -n "$NS_SW" link add br-front type bridge
    ip -n "$NS_SW" link add br-back type bridge
    ip -n "$NS_SW" link set br-front up
    ip -n "$NS_SW" link set br-back up

    plug "$NS_GW" eth0 "$GW_FRONT/24" br-front gw-front
    plug "$NS_GW" eth1 "$GW_BACK/24" br-back gw-back
    in_ns "$NS_GW" sysctl -qw net.ipv4.ip_forward=0
    plug "$NS_C1" eth0 "$C1_ADDR/24" br-front client1
    plug "$NS_C2" eth0 "$C2_ADDR/24" br-front client2
    plug "$NS_S1" eth0 "$S1_ADDR/24" br-back server1
    plug "$NS_S2" eth0 "$S2_ADDR/24" br-back server2
    plug "$NS_S3" eth0 "$S3_ADDR/24" br-back server3

    # The bridges run without STP, so a port forwards as soon as its link is up.
    local pair
    for pair in "$NS_GW eth0" "$NS_GW eth1" "$NS_C1 eth0" "$NS_C2 eth0" "$NS_S1 eth0" "$NS_S2 eth0" "$NS_S3 eth0"; do
        # shellcheck disable=SC2086
        wait_until 10 "link $pair up" link_up $pair || return 1
    done
    log "topology up: front $FRONT_NET (gateway $GW_FRONT, clients $C1_ADDR $C2_ADDR)," \
        "back $BACK_NET (gateway $GW_BACK, servers $S1_ADDR $S2_ADDR $S3_ADDR)"
}

# Kills whatever still runs inside our namespaces, then deletes them (which removes the veths).
net_down() {
    local ns pids
    for ns in $(ip netns list | awk '{print $1}' | grep "^$LAB_PREFIX-" || true); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"
    done
}
