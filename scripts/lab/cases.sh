# shellcheck shell=bash
# The five cases of the original lab. Each case checks what it needs, does its traffic (bounded in
# count and time, only to lab addresses), and records one row: expectation, observed, PASS/FAIL/SKIP
# and the original lab's figure. Evidence (captures, client JSON, stats, logs) goes to its folder.

CASE_TITLES=([1]="Encryption" [2]="Multiple inbound" [3]="Two-way traffic (ssh)" [4]="Load balancing, low load" [5]="Load balancing, heavy load")

# record CASE EXPECTATION OBSERVED STATUS ORIGINAL
record() {
    local clean=()
    local f
    for f in "$@"; do clean+=("$(printf '%s' "$f" | tr '\t\n' '  ')"); done
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "${clean[0]}" "${CASE_TITLES[${clean[0]}]}" "${clean[1]}" "${clean[2]}" "${clean[3]}" "${clean[4]}" >>"$LAB_RESULTS/results.tsv"
    printf '\ncase %s  %s\n  expectation: %s\n  observed:    %s\n  result:      %s\n  original:    %s\n' \
        "${clean[0]}" "${CASE_TITLES[${clean[0]}]}" "${clean[1]}" "${clean[2]}" "${clean[3]}" "${clean[4]}" >&2
}

# need_bins CASE EXPECTATION ORIGINAL BIN... — records a SKIP and fails when a program is missing.
need_bins() {
    local case=$1 expect=$2 original=$3 missing
    shift 3
    if ! missing=$(first_missing_bin "$@"); then
        record "$case" "$expect" "$missing not found or not working in $BIN_DIR" "SKIP: $missing not built yet" "$original"
        return 1
    fi
    if ! proc_alive forwarder; then
        record "$case" "$expect" "the forwarder did not start (see $LAB_DIR/logs/forwarder.log)" "FAIL" "$original"
        return 1
    fi
}

client() { # NS ARGS... — the load client, fd limit raised
    local ns=$1
    shift
    # shellcheck disable=SC2016
    in_ns "$ns" bash -c 'ulimit -n "$(ulimit -Hn)"; exec "$@"' _ "$(bin ssl-echo-client)" "$@" </dev/null
}

# capture_start NAME FILTER FILE — tshark on both gateway legs; returns once it is capturing.
capture_start() {
    local name=$1 filter=$2 file=$3
    # -f before the -i options applies the filter to both interfaces; -P -l also lists each packet
    # on stdout as soon as dumpcap has written it to the file, which capture_stop waits for.
    lab_spawn "$name" "$NS_GW" gateway tshark -n -l -P -f "($filter) or udp port $CANARY_PORT" \
        -i eth0 -i eth1 -w "$file"
    # "Capturing on" can come before the capture really sees packets: send canary datagrams until
    # one shows up in the capture, so the case's own traffic cannot be missed.
    wait_until 30 "$name to see a canary packet" capture_canary "$name"
}

CANARY_PORT=9999

capture_canary() {
    in_ns "$NS_C1" bash -c "echo lab-capture-canary >/dev/udp/$GW_FRONT/$CANARY_PORT" 2>/dev/null
    sleep 0.1
    grep -q "→ $CANARY_PORT " "$LAB_DIR/logs/$1.out"
}

# capture_stop NAME [CLOSING] — waits until the capture holds CLOSING (default 4) closing packets
# (client->gateway and gateway->server each end with two FINs, or a RST; a web request to the
# gateway itself has only the first leg: 2), then stops tshark. Stopping at once would lose the
# packets dumpcap has not yet read from the kernel.
capture_stop() {
    local name=$1 closing=${2:-4}
    wait_until 10 "$name to see its connections close" \
        bash -c "[ \$(grep -cE 'FIN|RST' '$LAB_DIR/logs/$name.out') -ge $closing ]" || true
    # SIGINT to tshark alone: it stops dumpcap itself (signalling the whole group loses packets).
    stop_proc "$name" INT leader
    cp "$LAB_DIR/logs/$name.out" "$LAB_RESULTS/case1/$name-packets.txt"
}

frames_containing() { # FILE TEXT
    tshark -n -r "$1" -Y "frame contains \"$2\"" 2>/dev/null | wc -l
}

# The web page's own check in case 1: a forwarder of its own on the gateway (its page reachable
# from the clients, changes need a token), and client1 adding a rule through it with curl while
# the client segment is captured. Over plain HTTP the capture shows the token and the rule's
# name; over HTTPS (the lab's certificate) it must show neither.
CASE1_WEB_PLAIN_PORT=8080
CASE1_WEB_TLS_PORT=8443

# case1_web_change NAME SCHEME PORT TOKEN RULE OUT [FORWARDER ARGS...] — starts the forwarder NAME
# with its page on the gateway's client side, captures client1 adding RULE with TOKEN, stops both;
# sets WEB_STATUS to the HTTP status of the change (000 when there was none). Not run in a command
# substitution: what it starts must stay visible to the lab's cleanup.
case1_web_change() {
    local name=$1 scheme=$2 port=$3 token=$4 rule=$5 out=$6
    shift 6
    WEB_STATUS=000
    : >"$LAB_DIR/$name.csv"
    lab_spawn "$name" "$NS_GW" gateway "$(bin forwarder)" --rules "$LAB_DIR/$name.csv" \
        --web "$GW_FRONT:$port" --web-token "$token" --workers 1 --max-connections 100 "$@"
    if ! wait_listen "$NS_GW" "$port" 20 "$name"; then
        stop_proc "$name"
        return 0
    fi
    local curl_tls=() status=000
    [ "$scheme" = https ] && curl_tls=(--cacert "$LAB_DIR/certs/ca.crt")
    if capture_start "cap-$name" "tcp port $port" "$out/$name.pcapng"; then
        # The new rule listens on the gateway's loopback: only the page's traffic crosses the segment.
        status=$(in_ns "$NS_C1" curl -sS --max-time 10 "${curl_tls[@]}" -o "$out/$name-answer.json" \
            -w '%{http_code}' -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
            --data "{\"name\":\"$rule\",\"listen_port\":\"127.0.0.1:$((port + 10000))\",\"dest_ip\":\"$S1_ADDR\",\"dest_port\":\"80\"}" \
            "$scheme://$GW_FRONT:$port/api/rules" 2>"$out/$name-curl.log") || true
        capture_stop "cap-$name" 2
    fi
    cp "$LAB_DIR/$name.csv" "$out/$name-rules.csv"
    stop_proc "$name"
    WEB_STATUS=${status:-000}
}

case_1() {
    local expect="the message is readable in the plaintext capture and absent from the TLS capture; a web change shows the token and the rule's name over HTTP, neither over HTTPS"
    local original="same check; no figure"
    need_bins 1 "$expect" "$original" forwarder ssl-echo-server ssl-echo-client certs || return 0
    local out=$LAB_RESULTS/case1
    mkdir -p "$out"
    local text
    text="lab-case1-secret-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"

    capture_start cap-plain "tcp port $PORT_PLAIN_ECHO" "$out/plaintext.pcapng" || {
        record 1 "$expect" "tshark did not start" FAIL "$original"
        return 0
    }
    client "$NS_C1" --host "$GW_FRONT" --port "$PORT_PLAIN_ECHO" --plain --message "$text" --count 1 \
        --connections 1 --report "$out/plaintext-client.xlsx" --json >"$out/plaintext-client.json" 2>"$out/plaintext-client.log"
    local plain_rc=$?
    capture_stop cap-plain

    capture_start cap-tls "tcp port $PORT_TLS_ECHO" "$out/tls.pcapng" || {
        record 1 "$expect" "tshark did not start" FAIL "$original"
        return 0
    }
    client "$NS_C1" --host "$GW_FRONT" --port "$PORT_TLS_ECHO" --ca "$LAB_DIR/certs/ca.crt" --message "$text" \
        --count 1 --connections 1 --report "$out/tls-client.xlsx" --json >"$out/tls-client.json" 2>"$out/tls-client.log"
    local tls_rc=$?
    capture_stop cap-tls

    local plain_hits tls_hits tls_raw tls_hellos tls_records plain_msgs tls_msgs
    plain_hits=$(frames_containing "$out/plaintext.pcapng" "$text")
    tls_hits=$(frames_containing "$out/tls.pcapng" "$text")
    tls_raw=$(grep -c -a -F "$text" "$out/tls.pcapng" || true)
    tls_hellos=$(tshark -n -r "$out/tls.pcapng" -d "tcp.port==$PORT_TLS_ECHO,tls" -Y "tls.handshake.type == 1" 2>/dev/null | wc -l)
    tls_records=$(tshark -n -r "$out/tls.pcapng" -d "tcp.port==$PORT_TLS_ECHO,tls" -Y "tls.app_data" 2>/dev/null | wc -l)
    plain_msgs=$(json_get "$out/plaintext-client.json" messages)
    tls_msgs=$(json_get "$out/tls-client.json" messages)
    local observed="plaintext: $plain_hits frames contain the message (client exit $plain_rc, echoed ${plain_msgs:-?}); TLS: $tls_hits frames contain it (raw bytes: $tls_raw), $tls_hellos ClientHellos and $tls_records encrypted records seen (client exit $tls_rc, echoed ${tls_msgs:-?}); message \"$text\""

    local token rule web_plain web_tls
    token="lab-case1-token-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    rule="lab-case1-rule-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
    case1_web_change web-plain http "$CASE1_WEB_PLAIN_PORT" "$token" "$rule-http" "$out"
    web_plain=$WEB_STATUS
    case1_web_change web-https https "$CASE1_WEB_TLS_PORT" "$token" "$rule-https" "$out" \
        --web-cert "$LAB_DIR/certs/server.crt" --web-key "$LAB_DIR/certs/server.key"
    web_tls=$WEB_STATUS
    local wp_token wp_rule wt_token wt_rule wt_raw wt_hellos wp_file wt_file
    wp_token=$(frames_containing "$out/web-plain.pcapng" "$token")
    wp_rule=$(frames_containing "$out/web-plain.pcapng" "$rule-http")
    wt_token=$(frames_containing "$out/web-https.pcapng" "$token")
    wt_rule=$(frames_containing "$out/web-https.pcapng" "$rule-https")
    wt_raw=$(grep -c -a -e "$token" -e "$rule" "$out/web-https.pcapng" || true)
    wt_hellos=$(tshark -n -r "$out/web-https.pcapng" -d "tcp.port==$CASE1_WEB_TLS_PORT,tls" -Y "tls.handshake.type == 1" 2>/dev/null | wc -l)
    wp_file=$(grep -c -F "$rule-http," "$out/web-plain-rules.csv" || true)
    wt_file=$(grep -c -F "$rule-https," "$out/web-https-rules.csv" || true)
    observed+="; web change over HTTP (HTTP $web_plain, in the rules file: $wp_file): token in $wp_token frames, rule name in $wp_rule; over HTTPS (HTTP $web_tls, in the rules file: $wt_file): token in $wt_token frames, rule name in $wt_rule (raw bytes: $wt_raw), $wt_hellos ClientHellos"

    # Both legs (client->gateway, gateway->server) carry the message and its echo: 4 frames at least;
    # the TLS capture must really hold the TLS conversation (hellos and encrypted records on both legs).
    # The web changes must both have been made (201, in the file) for their captures to mean anything.
    if [ "$plain_rc" -eq 0 ] && [ "$tls_rc" -eq 0 ] && [ "${plain_msgs:-0}" -ge 1 ] && [ "${tls_msgs:-0}" -ge 1 ] &&
        [ "$plain_hits" -ge 4 ] && [ "$tls_hits" -eq 0 ] && [ "$tls_raw" -eq 0 ] && [ "$tls_hellos" -ge 2 ] && [ "$tls_records" -ge 4 ] &&
        [ "$web_plain" = 201 ] && [ "$web_tls" = 201 ] && [ "$wp_file" -eq 1 ] && [ "$wt_file" -eq 1 ] &&
        [ "$wp_token" -ge 1 ] && [ "$wp_rule" -ge 1 ] && [ "$wt_token" -eq 0 ] && [ "$wt_rule" -eq 0 ] &&
        [ "$wt_raw" -eq 0 ] && [ "$wt_hellos" -ge 1 ]; then
        record 1 "$expect" "$observed" PASS "$original"
    else
        record 1 "$expect" "$observed" FAIL "$original"
    fi
}

# chat_pair PREFIX COUNT [SUFFIX] — client1 and client2 (each in its namespace) chat through the
# forwarder as nicknames client1SUFFIX and client2SUFFIX, COUNT timestamped messages each way;
# PREFIX-clientN.json holds each side's delays.
chat_pair() {
    local prefix=$1 count=$2 suffix=${3:-} peer=$REPO/scripts/lab/chat_peer.py session
    session=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
    in_ns "$NS_C1" "$PYTHON" "$peer" --host "$GW_FRONT" --port "$PORT_CHAT" --nick "client1$suffix" --peer "client2$suffix" \
        --session "$session" --count "$count" --timeout 60 --transcript "$prefix-client1.txt" >"$prefix-client1.json" 2>"$prefix-client1.log" &
    local p1=$!
    in_ns "$NS_C2" "$PYTHON" "$peer" --host "$GW_FRONT" --port "$PORT_CHAT" --nick "client2$suffix" --peer "client1$suffix" \
        --session "$session" --count "$count" --timeout 60 --transcript "$prefix-client2.txt" >"$prefix-client2.json" 2>"$prefix-client2.log" &
    local p2=$! rc=0
    wait "$p1" || rc=1
    wait "$p2" || rc=1
    return "$rc"
}

# load_ready NAME NS PORT N — true once N connections are established on PORT in NS, or once the
# load client NAME has exited (nothing more will come).
load_ready() {
    [ "$(established_count "$2" "$3")" -ge "$4" ] || ! proc_alive "$1"
}

# load_errors JSON — the load client's losses and failures as one phrase for the table:
# "0 lost, 0 errors" or "3 lost, 5 errors (reset: 3, timeout: 2)"; "no summary" when the client wrote
# none. A connection reset mid-run is counted in connections_lost and errors, never in
# connections_failed, so a case that checks only opened connections would miss it.
load_errors() {
    "$PYTHON" - "$1" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    lost, total = int(s["connections_lost"]), int(s["errors_total"])
except Exception as e:
    print(f"no summary ({type(e).__name__})")
    sys.exit()
causes = ", ".join(f"{k}: {v}" for k, v in sorted(s.get("errors", {}).items()) if v)
print(f"{lost} lost, {total} errors" + (f" ({causes})" if causes else ""))
PY
}

# load_clean JSON — true only when the summary exists and says 0 lost and 0 errors.
load_clean() {
    local lost total
    lost=$(json_get "$1" connections_lost)
    total=$(json_get "$1" errors_total)
    [ "${lost:-x}" = 0 ] && [ "${total:-x}" = 0 ]
}

case_2() {
    local conns=${LAB_CASE2_CONNECTIONS:-1000} seconds=${LAB_CASE2_SECONDS:-20} msgs=${LAB_CHAT_MESSAGES:-50}
    local expect="$conns TLS connections all succeed while every chat message ($msgs each way) arrives"
    local original="1,000 TLS connections with chat; no delay figure"
    need_bins 2 "$expect" "$original" forwarder ssl-echo-server ssl-echo-client certs chat-server || return 0
    local out=$LAB_RESULTS/case2
    mkdir -p "$out"

    # The same exchange on an idle lab first, as the baseline for the delay under load.
    chat_pair "$out/idle-chat" 10 -idle
    local idle1 idle2
    idle1=$(json_get "$out/idle-chat-client1.json" delay_ms.avg)
    idle2=$(json_get "$out/idle-chat-client2.json" delay_ms.avg)

    lab_spawn case2-load "$NS_C1" client1 "$(bin ssl-echo-client)" --host "$GW_FRONT" --port "$PORT_TLS_ECHO" \
        --ca "$LAB_DIR/certs/ca.crt" --message "case 2 load from client1" --connections "$conns" \
        --duration "$seconds" --report "$out/load-report.xlsx" --json
    local loaded=0
    wait_until 60 "$conns TLS connections on server1" load_ready case2-load "$NS_S1" "$PORT_TLS_ECHO" "$conns"
    [ "$(established_count "$NS_S1" "$PORT_TLS_ECHO")" -ge "$conns" ] && loaded=1
    local during_before
    during_before=$(established_count "$NS_S1" "$PORT_TLS_ECHO")

    chat_pair "$out/chat" "$msgs"
    local chat_rc=$?
    local during_after
    during_after=$(established_count "$NS_S1" "$PORT_TLS_ECHO")

    wait_exit case2-load $((seconds + 120)) || stop_proc case2-load
    cp "$LAB_DIR/logs/case2-load.log" "$out/load-client.log"
    cp "$LAB_DIR/logs/case2-load.out" "$out/load-client.json"
    local ok failed
    ok=$(json_get "$out/load-client.json" connections_ok)
    failed=$(json_get "$out/load-client.json" connections_failed)

    local r1 r2 d1 d2 m1 m2
    r1=$(json_get "$out/chat-client1.json" received_from_peer)
    r2=$(json_get "$out/chat-client2.json" received_from_peer)
    d1=$(json_get "$out/chat-client1.json" delay_ms.avg)
    d2=$(json_get "$out/chat-client2.json" delay_ms.avg)
    m1=$(json_get "$out/chat-client1.json" delay_ms.max)
    m2=$(json_get "$out/chat-client2.json" delay_ms.max)
    local observed
    observed="TLS load: $(pretty "$ok") ok, $(pretty "$failed") failed, $(load_errors "$out/load-client.json"); $during_before then $during_after TLS connections open on server1 while chatting; chat: client2 got ${r2:-0}/$msgs of client1's messages, client1 got ${r1:-0}/$msgs of client2's; delay avg $(pretty "$d2") / $(pretty "$d1") ms, max $(pretty "$m2") / $(pretty "$m1") ms (client1->client2 / client2->client1; idle lab: $(pretty "$idle2") / $(pretty "$idle1") ms avg)"
    if [ "$loaded" -eq 1 ] && [ "$chat_rc" -eq 0 ] && [ "${ok:-0}" -eq "$conns" ] && [ "${failed:-1}" -eq 0 ] &&
        load_clean "$out/load-client.json" && [ "$during_after" -ge "$conns" ] && [ "${r1:-0}" -eq "$msgs" ] && [ "${r2:-0}" -eq "$msgs" ]; then
        record 2 "$expect" "$observed" PASS "$original"
    else
        record 2 "$expect" "$observed" FAIL "$original"
    fi
}

case_3() {
    local expect="ssh to gateway:$PORT_SSH runs on server3: hostname server3, address $S3_ADDR"
    local original="same check; no figure"
    need_bins 3 "$expect" "$original" forwarder || return 0
    local out=$LAB_RESULTS/case3
    mkdir -p "$out"
    # shellcheck disable=SC2016  # run by the remote shell
    local remote='echo "hostname=$(hostname)"; echo "address=$(ip -4 -o addr show dev eth0 | awk "{print \$4}")"; echo "ssh_connection=$SSH_CONNECTION"'
    in_ns "$NS_C1" timeout 30 ssh -F /dev/null -i "$LAB_DIR/ssh/client_key" -p "$PORT_SSH" \
        -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile="$LAB_DIR/ssh/known_hosts" \
        -o ConnectTimeout=10 -o LogLevel=ERROR "root@$GW_FRONT" "$remote" >"$out/ssh-output.txt" 2>"$out/ssh.log"
    local rc=$?
    local host addr conn
    host=$(sed -n 's/^hostname=//p' "$out/ssh-output.txt")
    addr=$(sed -n 's/^address=//p' "$out/ssh-output.txt")
    conn=$(sed -n 's/^ssh_connection=//p' "$out/ssh-output.txt")
    local observed="ssh exit $rc; remote hostname \"$host\", address \"$addr\" (gateway is \"gateway\", $GW_FRONT/$GW_BACK); server saw the connection as \"$conn\""
    if [ "$rc" -eq 0 ] && [ "$host" = server3 ] && [ "$addr" = "$S3_ADDR/24" ]; then
        record 3 "$expect" "$observed" PASS "$original"
    else
        record 3 "$expect" "$observed" FAIL "$original"
    fi
}

case_4() {
    local expect="two consecutive requests to gateway:$PORT_WEB get page 1 (server1) then page 2 (server2)"
    local original="same check (pages alternate); no figure"
    need_bins 4 "$expect" "$original" forwarder || return 0
    local out=$LAB_RESULTS/case4
    mkdir -p "$out"
    local first second before1 before2
    before1=$(wc -l <"$LAB_DIR/apache-server1/access.log")
    before2=$(wc -l <"$LAB_DIR/apache-server2/access.log")
    in_ns "$NS_C1" curl -sS --max-time 10 "http://$GW_FRONT:$PORT_WEB/" >"$out/request1.html" 2>"$out/curl.log"
    first=$(sed -n 's:.*<h1>\(Page [0-9]\).*:\1:p' "$out/request1.html")
    in_ns "$NS_C1" curl -sS --max-time 10 "http://$GW_FRONT:$PORT_WEB/" >"$out/request2.html" 2>>"$out/curl.log"
    second=$(sed -n 's:.*<h1>\(Page [0-9]\).*:\1:p' "$out/request2.html")
    # The clients have no route to the servers: only the forwarder connects the two segments.
    local direct="unreachable"
    if in_ns "$NS_C1" curl -sS --max-time 3 "http://$S1_ADDR/" >/dev/null 2>>"$out/curl.log"; then
        direct="REACHABLE (the topology leaks)"
    fi
    # Each Apache's own access log confirms it served exactly one of the two requests.
    local got1 got2
    got1=$(($(wc -l <"$LAB_DIR/apache-server1/access.log") - before1))
    got2=$(($(wc -l <"$LAB_DIR/apache-server2/access.log") - before2))
    cp "$LAB_DIR/apache-server1/access.log" "$out/server1-access.log"
    cp "$LAB_DIR/apache-server2/access.log" "$out/server2-access.log"
    local observed="request 1: ${first:-no page}; request 2: ${second:-no page}; access logs: server1 $got1, server2 $got2 request(s); server1 directly from client1: $direct"
    if [ "$first" = "Page 1" ] && [ "$second" = "Page 2" ] && [ "$got1" -eq 1 ] && [ "$got2" -eq 1 ] && [ "$direct" = unreachable ]; then
        record 4 "$expect" "$observed" PASS "$original"
    else
        record 4 "$expect" "$observed" FAIL "$original"
    fi
}

case_5() {
    local conns=${LAB_CONNECTIONS:-20000} seconds=${LAB_CASE5_SECONDS:-15}
    local half=$((conns / 2))
    local expect="$conns plaintext echo connections for ${seconds}s from two client PCs (agents on client1 and client2, one merged report), split $half / $half over two echo servers, none failed; the client's per-backend split equals the servers' own counts"
    local original="20,000 connections, 771,047 messages, 411 ms average response"
    need_bins 5 "$expect" "$original" forwarder ssl-echo-server ssl-echo-client || return 0
    local out=$LAB_RESULTS/case5
    mkdir -p "$out"
    # Fresh servers, so their connection counters hold exactly this case's connections.
    if ! echo_start heavy-server1 "$NS_S1" server1 "$S1_ADDR:$PORT_HEAVY" 2 plain ||
        ! echo_start heavy-server2 "$NS_S2" server2 "$S2_ADDR:$PORT_HEAVY" 2 plain; then
        record 5 "$expect" "echo servers did not start (see $LAB_DIR/logs/heavy-server*.log)" FAIL "$original"
        return 0
    fi
    # One agent per client PC; they listen off loopback, so they need the token (passed in the
    # environment, not on the command line).
    local token agents n
    token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    for n in 1 2; do
        local ns addr
        ns=$([ "$n" = 1 ] && echo "$NS_C1" || echo "$NS_C2")
        addr=$([ "$n" = 1 ] && echo "$C1_ADDR" || echo "$C2_ADDR")
        lab_spawn "case5-agent$n" "$ns" "client$n" env SSL_ECHO_CLIENT_TOKEN="$token" \
            "$(bin ssl-echo-client)" agent --listen "$addr:$PORT_AGENT"
        if ! wait_listen "$ns" "$PORT_AGENT" 20 "case5-agent$n"; then
            record 5 "$expect" "the agent on client$n did not start (see $LAB_DIR/logs/case5-agent$n.log)" FAIL "$original"
            return 0
        fi
    done
    agents="$C1_ADDR:$PORT_AGENT,$C2_ADDR:$PORT_AGENT"
    # --max-errors: failures are checked below against the servers' counts, with the report kept.
    lab_spawn case5-load "$NS_C1" client1 env SSL_ECHO_CLIENT_TOKEN="$token" "$(bin ssl-echo-client)" \
        --agents "$agents" --host "$GW_FRONT" --port "$PORT_HEAVY" --plain \
        --message "case 5 heavy load" --connections "$conns" --duration "$seconds" \
        --forwarder "http://$GW_FRONT:$PORT_FWD_WEB" --max-errors "$conns" \
        --report "$out/load-report.xlsx" --json
    wait_exit case5-load $((seconds + 300)) || stop_proc case5-load
    cp "$LAB_DIR/logs/case5-load.log" "$out/load-client.log"
    cp "$LAB_DIR/logs/case5-load.out" "$out/load-client.json"
    for n in 1 2; do
        stop_proc "case5-agent$n"
        cp "$LAB_DIR/logs/case5-agent$n.log" "$out/agent-client$n.log"
    done
    # SIGTERM makes each server write its final stats.
    stop_proc heavy-server1
    stop_proc heavy-server2
    cp "$LAB_DIR/stats/heavy-server1.json" "$out/server1-stats.json" 2>/dev/null
    cp "$LAB_DIR/stats/heavy-server2.json" "$out/server2-stats.json" 2>/dev/null
    local ok failed msgs rate avg p99 t1 t2 e1 e2
    ok=$(json_get "$out/load-client.json" connections_ok)
    failed=$(json_get "$out/load-client.json" connections_failed)
    msgs=$(json_get "$out/load-client.json" messages)
    rate=$(json_get "$out/load-client.json" messages_per_sec)
    avg=$(json_get "$out/load-client.json" response_ms.avg)
    p99=$(json_get "$out/load-client.json" response_ms.p99)
    t1=$(json_get "$out/server1-stats.json" connections_total)
    t2=$(json_get "$out/server2-stats.json" connections_total)
    e1=$(json_get "$out/server1-stats.json" messages_echoed)
    e2=$(json_get "$out/server2-stats.json" messages_echoed)
    # The client's view per PC and per backend, and whether the latter equals the servers' counts.
    local split split_ok
    split=$("$PYTHON" - "$out/load-client.json" "$S1_ADDR:$PORT_HEAVY" "$S2_ADDR:$PORT_HEAVY" \
        "${t1:-0}" "${e1:-0}" "${t2:-0}" "${e2:-0}" "$half" <<'PY'
import json, sys
path, b1, b2 = sys.argv[1:4]
t1, e1, t2, e2, half = (int(float(x)) for x in sys.argv[4:9])
try:
    j = json.load(open(path))
except Exception as e:
    print(f"no client summary ({e})\tno")
    sys.exit()
agents = j.get("agents", [])
backends = {b["name"]: b for b in j.get("backends", [])}
pcs = ", ".join(f"{a['name']} {a['connections']:,} connections / {a['messages']:,} messages"
                for a in agents)
seen = [(backends.get(b, {}).get("connections", 0), backends.get(b, {}).get("messages", 0)) for b in (b1, b2)]
unknown = backends.get("unknown", {}).get("connections", 0)
agree = seen == [(t1, e1), (t2, e2)] and unknown == 0
fair = len(agents) == 2 and all(a["connections"] == half and a["connections_ok"] == half for a in agents)
lost = "; lost: " + ", ".join(f"{l['who']}: {l['reason']}" for l in j["agents_lost"]) if j.get("agents_lost") else ""
print(f"agents: {pcs or 'none'}{lost}; per backend, client's view: server1 {seen[0][0]:,} connections / {seen[0][1]:,} messages, "
      f"server2 {seen[1][0]:,} / {seen[1][1]:,}, unknown {unknown:,}; servers' own: server1 {t1:,} / {e1:,}, server2 {t2:,} / {e2:,} "
      f"({'agree' if agree else 'DISAGREE'})\t{'yes' if agree and fair else 'no'}")
PY
)
    split_ok=${split##*$'\t'}
    split=${split%$'\t'*}
    local vs=""
    if [ -n "$msgs" ] && [ -n "$avg" ]; then
        vs=$("$PYTHON" -c 'import sys; m, a = float(sys.argv[1]), float(sys.argv[2]); print(f"{m / 771047:.2f}x the original messages, {a / 411:.2f}x its response time")' "$msgs" "$avg")
    fi
    local observed
    observed="client: $(pretty "$ok") ok, $(pretty "$failed") failed, $(load_errors "$out/load-client.json"), $(pretty "$msgs") messages ($(pretty "$rate" 0)/s), response avg $(pretty "$avg") ms, p99 $(pretty "$p99") ms ($vs); $split"
    if [ "${LAB_CASE5_DIRECT:-0}" = 1 ]; then
        observed="$observed; $(case5_direct "$out" "$half" "$seconds" "$msgs")"
    fi
    if [ "${ok:-0}" -eq "$conns" ] && [ "${failed:-1}" -eq 0 ] && load_clean "$out/load-client.json" && [ "${t1:-0}" -eq "$half" ] && [ "${t2:-0}" -eq "$half" ] &&
        [ "${msgs:-0}" -gt 0 ] && [ "$split_ok" = yes ]; then
        record 5 "$expect" "$observed" PASS "$original"
    else
        record 5 "$expect" "$observed" FAIL "$original"
    fi
}

# case5_direct OUT HALF SECONDS FORWARDED_MESSAGES — the same load without the forwarder, for scale:
# two clients on the gateway machine (the only one that reaches the servers) each open HALF
# connections straight to one fresh echo server. Prints one sentence for the table.
case5_direct() {
    local out=$1 half=$2 seconds=$3 forwarded=$4 n
    for n in 1 2; do
        local addr
        addr=$([ "$n" = 1 ] && echo "$S1_ADDR" || echo "$S2_ADDR")
        echo_start "direct-server$n" "$LAB_PREFIX-server$n" "server$n" "$addr:$PORT_HEAVY" 2 plain >&2 ||
            { echo "direct comparison: echo server $n did not start"; return 0; }
    done
    for n in 1 2; do
        local addr
        addr=$([ "$n" = 1 ] && echo "$S1_ADDR" || echo "$S2_ADDR")
        lab_spawn "direct-load$n" "$NS_GW" gateway "$(bin ssl-echo-client)" --host "$addr" --port "$PORT_HEAVY" \
            --plain --message "case 5 heavy load" --connections "$half" --duration "$seconds" \
            --report "$out/direct-report$n.xlsx" --json >&2
    done
    for n in 1 2; do
        wait_exit "direct-load$n" $((seconds + 300)) >&2 || stop_proc "direct-load$n" >&2
        cp "$LAB_DIR/logs/direct-load$n.out" "$out/direct-client$n.json"
        stop_proc "direct-server$n" >&2
    done
    "$PYTHON" - "$out/direct-client1.json" "$out/direct-client2.json" "${forwarded:-0}" <<'PY'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
except Exception as e:
    print(f"direct comparison: no client summary ({e})")
    sys.exit()
msgs = a["messages"] + b["messages"]
avg = (a["response_ms"]["avg"] * a["messages"] + b["response_ms"]["avg"] * b["messages"]) / max(msgs, 1)
fwd = float(sys.argv[3])
print(f"without the forwarder (clients on the gateway): {msgs:,} messages, response avg {avg:,.1f} ms; "
      f"forwarded/direct = {fwd / max(msgs, 1):.2f}")
PY
}
