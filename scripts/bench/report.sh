# shellcheck shell=bash
# The result table of scripts/bench/bench-forwarder.sh: medians over rounds, ratios, and the targets'
# verdicts, from the JSON results and meta.env in a work directory. Sourced; needs lib.sh.

# report WORKDIR: prints the markdown table and verdicts.
report() {
    local dir=$1
    # shellcheck disable=SC1091
    source "$dir/meta.env"
    local -A V
    local t load errs targets=(direct ours haproxy nginx)

    # Median over rounds of one figure: m LOAD TARGET JQ-EXPR.
    m() {
        local f
        for f in "$dir"/res/"$1"-"$2"-*.json; do
            [ -e "$f" ] || continue
            jq -r "($3) // null" "$f" 2>/dev/null || echo null
        done | median
    }
    # Failed runs and wrong echoes of one load, summed over rounds. A load with no result at all,
    # or a result without its error count, is one failure: a run that produced nothing never passes.
    errors_of() {
        local f total=0 e found=0
        for f in "$dir"/res/"$1"-"$2"-*.json; do
            [ -e "$f" ] || continue
            found=1
            e=$(jq -r 'if .error then 1 elif (.errors | type) == "number" then .errors elif .errors == null and (keys | length) > 0 then 0 else 1 end' "$f" 2>/dev/null) || e=1
            [[ $e =~ ^[0-9]+$ ]] || e=1
            total=$((total + e))
        done
        [ "$found" -eq 1 ] || total=$((total + 1))
        echo "$total"
    }

    for t in "${targets[@]}"; do
        V[bulk1,$t]=$(m bulk1 "$t" .gbps)
        V[bulk1cpu,$t]=$(m bulk1 "$t" .cpu_us_per_mb)
        V[bulk1ends,$t]=$(m bulk1 "$t" .endpoints_cpu_us_per_mb)
        # Cores kept busy by the stream: (endpoints' + proxy's CPU per MB) × MB per second.
        V[bulk1busy,$t]=$(awk -v e="${V[bulk1ends,$t]}" -v p="${V[bulk1cpu,$t]}" -v g="${V[bulk1,$t]}" \
            'BEGIN { if (e == "null" || g == "null") { print "null"; exit }
                     printf "%.2f", (e + (p == "null" ? 0 : p)) * g * 1e3 / 8 / 1e6 }')
        V[bulk8,$t]=$(m bulk8 "$t" .gbps)
        V[bulk8cpu,$t]=$(m bulk8 "$t" .cpu_us_per_mb)
        V[p50,$t]=$(m ping "$t" .p50_us)
        V[p99,$t]=$(m ping "$t" .p99_us)
        V[pingcpu,$t]=$(m ping "$t" '.proxy_cpu_ns_per_message / 1000')
        V[sp50,$t]=$(m sockperf "$t" .p50_us)
        V[sp99,$t]=$(m sockperf "$t" .p99_us)
        V[conn,$t]=$(m conn "$t" .per_second)
        V[conncpu,$t]=$(m conn "$t" '.proxy_cpu_ns_per_connection / 1000')
        V[rr,$t]=$(m rr "$t" .per_second)
        V[rrcpu,$t]=$(m rr "$t" '.proxy_cpu_ns_per_message / 1000')
        V[idle,$t]=$(m idle "$t" .bytes_per_connection)
        V[idlen,$t]=$(m idle "$t" .connections)
        errs=0
        for load in bulk1 bulk8 ping sockperf conn rr idle; do
            errs=$((errs + $(errors_of "$load" "$t")))
        done
        V[errors,$t]=$errs
    done
    # a - b, or null when either figure is missing (awk would take "null" as 0 and report no
    # added latency at all for a run that measured nothing).
    minus() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "null" || b == "null") print "null"; else print a - b }'; }
    for t in "${targets[@]}"; do
        V[a50,$t]=$(minus "${V[p50,$t]}" "${V[p50,direct]}")
        V[a99,$t]=$(minus "${V[p99,$t]}" "${V[p99,direct]}")
    done
    # Proxy-only figures have no direct value.
    for k in idle idlen bulk1cpu bulk8cpu pingcpu conncpu rrcpu a50 a99; do V[$k,direct]=""; done

    row() { # label key decimals
        local k=$2 d=$3
        printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" \
            "$(fmt "${V[$k,direct]}" "$d")" "$(fmt "${V[$k,ours]}" "$d")" "$(fmt "${V[$k,haproxy]}" "$d")" \
            "$(fmt "${V[$k,nginx]}" "$d")" "$(ratio "${V[$k,ours]}" "${V[$k,direct]}")" \
            "$(ratio "${V[$k,ours]}" "${V[$k,haproxy]}")" "$(ratio "${V[$k,ours]}" "${V[$k,nginx]}")"
    }
    verdict() { if "$@"; then echo PASS; else echo FAIL; fi; }
    # A target is judged only on measured figures: a missing one makes it FAIL, and says which.
    absent() { # "TARGET KEY"... -> "; no figure for ..." naming the missing ones, or nothing
        local tk missing=()
        for tk in "$@"; do
            local v=${V[${tk#* },${tk% *}]}
            if [ -z "$v" ] || [ "$v" = null ]; then missing+=("$tk"); fi
        done
        [ ${#missing[@]} -eq 0 ] || echo "; no figure for: ${missing[*]}"
    }
    # shellcheck disable=SC2317  # called by name, through `versus` below
    cheaper() { less_than "${V[$1,ours]}" "${V[$1,haproxy]}" && less_than "${V[$1,ours]}" "${V[$1,nginx]}"; }
    # shellcheck disable=SC2317  # called by name, through `versus` below
    no_more() { at_most "${V[$1,ours]}" "${V[$1,haproxy]}" && at_most "${V[$1,ours]}" "${V[$1,nginx]}"; }
    # "PASS (ours 1.0 vs HAProxy 2.0, nginx 3.0)"; a FAIL by less than 5 % is marked as within noise.
    versus() { # test key decimals
        local v near=""
        v=$(verdict "$1" "$2")
        local gone
        gone=$(absent "ours $2" "haproxy $2" "nginx $2")
        if [ -z "$gone" ] && [ "$v" = FAIL ] && awk -v a="${V[$2,ours]}" -v h="${V[$2,haproxy]}" -v n="${V[$2,nginx]}" \
            'BEGIN { t = 0.05; exit !(a <= h + t * (h < 0 ? -h : h) && a <= n + t * (n < 0 ? -n : n)) }'; then
            near="; within 5 %, the noise of a shared machine"
        fi
        echo "$v (ours $(fmt "${V[$2,ours]}" "$3") vs HAProxy $(fmt "${V[$2,haproxy]}" "$3"), nginx $(fmt "${V[$2,nginx]}" "$3")$near$gone)"
    }
    local tenth
    tenth=$(awk -v d="${V[bulk1,direct]}" 'BEGIN { if (d == "" || d == "null") print "null"; else print 0.9 * d }')
    echo "Run $START: ${ELAPSED} s, $ROUNDS round(s) of ${SECS} s loads (median kept), $CORES cores, kernel $KERNEL,"
    echo "load average before/after: $LOAD_BEFORE / $LOAD_AFTER. $VERSIONS; forwarder at $COMMIT ($CAPACITY)."
    echo
    echo "| load | direct | forwarder | HAProxy | nginx | ours/direct | ours/HAProxy | ours/nginx |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    row "bulk 1 stream, Gbit/s (iperf3)" bulk1 2
    row "  proxy CPU µs per MB" bulk1cpu 1
    row "  iperf3 client + server CPU µs per MB" bulk1ends 1
    row "  cores busy (iperf3 + proxy)" bulk1busy 2
    row "bulk 8 streams, Gbit/s (iperf3)" bulk8 2
    row "  proxy CPU µs per MB" bulk8cpu 1
    row "ping-pong 64 B round trip p50, µs" p50 1
    row "ping-pong 64 B round trip p99, µs" p99 1
    row "  added p50 over direct, µs" a50 1
    row "  added p99 over direct, µs" a99 1
    row "  proxy CPU µs per round trip" pingcpu 1
    row "sockperf ping-pong p50 (half round trip), µs" sp50 1
    row "sockperf ping-pong p99 (half round trip), µs" sp99 1
    row "new connections/s (64 B echo, 32 in flight)" conn 0
    row "  proxy CPU µs per connection" conncpu 1
    row "request/response msg/s ($RR_CONNS conns, 64 B)" rr 0
    row "  proxy CPU µs per message" rrcpu 1
    row "RSS per idle connection, bytes" idle 0
    row "  idle connections held" idlen 0
    row "failed loads + wrong echoes" errors 0
    echo
    echo "Targets (forwarder):"
    echo "- single-stream throughput ≥ 0.9× direct: $(verdict at_most "$tenth" "${V[bulk1,ours]}") ($(ratio "${V[bulk1,ours]}" "${V[bulk1,direct]}")$(absent "ours bulk1" "direct bulk1"))"
    echo "- less CPU per MB than HAProxy and nginx, 1 stream: $(versus cheaper bulk1cpu 1)"
    echo "- less CPU per MB than HAProxy and nginx, 8 streams: $(versus cheaper bulk8cpu 1)"
    echo "- less CPU per connection than HAProxy and nginx: $(versus cheaper conncpu 1)"
    echo "- less CPU per message than HAProxy and nginx, request/response: $(versus cheaper rrcpu 1)"
    echo "- less CPU per message than HAProxy and nginx, ping-pong: $(versus cheaper pingcpu 1)"
    echo "- latency added no more than theirs, p50 µs: $(versus no_more a50 1)"
    echo "- latency added no more than theirs, p99 µs: $(versus no_more a99 1)"
    echo "- ≤ 8 KiB RSS per idle connection: $(verdict at_most "${V[idle,ours]}" 8192) ($(fmt "${V[idle,ours]}" 0) B at $(fmt "${V[idlen,ours]}" 0) connections$(absent "ours idle"))"
    echo "- no failed load, every echo exact: $(verdict test "${V[errors,ours]}" -eq 0)"
    echo
    echo "HAProxy: maxconn $HA_MAXCONN, maxpipes $HA_MAXPIPES (the most its descriptor check allows under the 20,000"
    echo "limit), so it held $(fmt "${V[idlen,haproxy]}" 0) idle connections; nginx: 2 workers × 19,000 worker_connections, reuseport;"
    echo "forwarder: --workers 2. Proxy CPU = all its processes and threads (/proc/PID/task/*/schedstat), per unit of work."
    local h
    for h in "${HEALTH[@]}"; do echo "- WARNING: $h"; done
}
