#!/usr/bin/env bash
# Sidecar data path benchmark: one explicit mTLS tunnel pair on loopback, built with kith, HAProxy,
# stunnel (and ghostunnel where installed), next to a plain TCP relay, in one run:
#
#   wrk / curl / conn-hold -> client tunnel (plaintext in, mTLS out)
#                          -> server tunnel (mTLS in, plaintext out) -> nginx
#
#   bench/sidecar.sh            3 rounds; each round runs every candidate once (about 9 minutes)
#   QUICK=1 bench/sidecar.sh    1 round of 5 s loads, for development
#   SAVE=1 bench/sidecar.sh     also write bench/results/sidecar-<date>.md
#
# Environment: ROUNDS (3), DURATION (15s), WARMUP (2s), CONNECTIONS (64), THREADS (2),
# BULK_MIB (256), BULK_COUNT (4 downloads per round), HOLD_CONNS (1000),
# CANDIDATES ("kith kith_pool haproxy stunnel ghostunnel plain"; kith is `--pool off`, one full
# handshake per connection like the peers, kith_pool the pooled hop), RESUMPTION (1: also measure new connections
# with TLS session resumption on, for kith and each TLS peer, in a table of their own), KEEP=1 (keep the temp dir with the
# configurations and logs), QUICK, SAVE. See bench/README.md.
# KITH_BASE=/path/to/an/older/kith adds kith_base and kith_pool_base (that binary, run exactly like
# kith and kith_pool) to the same rounds, and a table of this build ÷ that one: an A/B comparison
# of two builds on one machine at one time, where comparing against a saved run would mix in how
# busy the machine was then.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    ROUNDS=${ROUNDS:-1}
    DURATION=${DURATION:-5s}
    BULK_COUNT=${BULK_COUNT:-2}
else
    ROUNDS=${ROUNDS:-3}
    DURATION=${DURATION:-15s}
    BULK_COUNT=${BULK_COUNT:-4}
fi
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
BULK_MIB=${BULK_MIB:-256}
HOLD_CONNS=${HOLD_CONNS:-1000}
CANDIDATES=${CANDIDATES:-kith kith_pool haproxy stunnel ghostunnel plain}
ASKED=$CANDIDATES
SAVE=${SAVE:-0}
KEEP=${KEEP:-0}
RESUMPTION=${RESUMPTION:-1}
TD=example.org
CLIENT_ID=spiffe://$TD/bench/client
SERVER_ID=spiffe://$TD/bench/server

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The script installs nothing: it says what is missing and where it comes from (Debian 12).
need() { # tool how-to-install
    command -v "$1" >/dev/null || die "$1 is not installed: $2"
}
need cargo "install Rust with rustup"
need nginx "apt-get install nginx"
need wrk "apt-get install wrk"
need curl "apt-get install curl"
need openssl "apt-get install openssl"
need python3 "apt-get install python3"
need jq "apt-get install jq"
for c in $CANDIDATES; do
    case $c in
    haproxy | plain) need haproxy "apt-get install haproxy" ;;
    stunnel) need stunnel4 "apt-get install stunnel4" ;;
    kith | kith_pool | kith_base | kith_pool_base | ghostunnel) ;;
    *) die "unknown candidate $c (kith kith_pool haproxy stunnel ghostunnel plain)" ;;
    esac
done
# 1,000 held connections need ~2,000 descriptors in each tunnel and ~1,000 in nginx.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= 3 * HOLD_CONNS + 500)) || die "open file limit $(ulimit -n) is too low for HOLD_CONNS=$HOLD_CONNS"

# ---- build once --------------------------------------------------------------------------
log "building (cargo build --release -j2 -p kith -p kith-bench)"
(cd "$ROOT" && cargo build --release -j2 -p kith -p kith-bench)
BUILT_FROM=$(built_from proxy sidecar src identity)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
KITH=$TARGET_DIR/release/kith
HOLD=$TARGET_DIR/release/conn-hold
[[ -x $KITH && -x $HOLD ]] || die "binaries not found in $TARGET_DIR/release"
KITH_BASE=${KITH_BASE:-}
if [[ -n $KITH_BASE ]]; then
    [[ -x $KITH_BASE ]] || die "KITH_BASE=$KITH_BASE is not an executable"
    KITH_BASE=$(realpath "$KITH_BASE")
    WITH_BASE=()
    for c in $CANDIDATES; do
        WITH_BASE+=("$c")
        [[ $c == kith || $c == kith_pool ]] && WITH_BASE+=("${c}_base")
    done
    CANDIDATES=${WITH_BASE[*]}
    log "A/B: kith_base and kith_pool_base run $KITH_BASE ($("$KITH_BASE" --version 2>/dev/null || echo 'no --version'))"
fi

WORK=$(mktemp -d /tmp/kith-bench-sidecar.XXXXXX)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_tcp() { # port
    local i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# CPU ticks (user + system, all threads) of processes; 0 for one that is gone.
cpu_ticks() {
    local total=0 p t
    for p in "$@"; do
        t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)

mem_kib() { # field pids: sum of a /proc/<pid>/status field (VmRSS, RssAnon)
    local field=$1 total=0 p
    shift
    for p in "$@"; do
        total=$((total + $(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$p/status")))
    done
    echo "$total"
}

# CPU ticks of the whole machine in user, nice and system mode.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 }' /proc/stat; }

# ---- certificates: one dev CA, one client and one server SVID (P-256) --------------------
PKI=$WORK/pki
mkdir -p "$PKI"
export KITH_HOME=$PKI/ca
"$KITH" certs issue "$CLIENT_ID" --out "$PKI" --name client --ttl 24h >/dev/null
# The server's SVID also names 127.0.0.1 for clients that check the address they dialled
# (ghostunnel); the others ignore it.
"$KITH" certs issue "$SERVER_ID" --out "$PKI" --name server --ttl 24h --ip 127.0.0.1 >/dev/null
CRT_C=$PKI/client.crt KEY_C=$PKI/client.key CRT_S=$PKI/server.crt KEY_S=$PKI/server.key BUNDLE=$PKI/bundle.crt
[[ -s $CRT_C && -s $KEY_C && -s $CRT_S && -s $KEY_S && -s $BUNDLE ]] || die "kith certs issue wrote no files in $PKI"
# HAProxy wants the chain and the key in one file.
cat "$CRT_C" "$KEY_C" >"$PKI/client.pem"
cat "$CRT_S" "$KEY_S" >"$PKI/server.pem"

# ---- the backend: nginx with a small answer and a large file ------------------------------
NGX=$WORK/nginx
mkdir -p "$NGX/www" "$NGX/tmp"
log "writing a ${BULK_MIB} MiB file for the bulk downloads"
head -c "$((BULK_MIB * 1024 * 1024))" /dev/urandom >"$NGX/www/big"
BACKEND_PORT=$(free_port)
SMALL_BODY='kith sidecar bench: a small answer, about the size of a health check or an API error.'
cat >"$NGX/nginx.conf" <<EOF
daemon off;
user root;
worker_processes 2;
pid $NGX/nginx.pid;
error_log $NGX/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    # Keep-alive connections live through the whole run: a closed one would cost a new
    # handshake and blur the keep-alive figure.
    keepalive_timeout 3600s;
    keepalive_requests 1000000000;
    client_body_temp_path $NGX/tmp/body;
    proxy_temp_path $NGX/tmp/proxy;
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        location = /small { default_type text/plain; return 200 "$SMALL_BODY\n"; }
        location / { root $NGX/www; }
    }
}
EOF
nginx -p "$NGX" -c "$NGX/nginx.conf" -e "$NGX/error.log" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_tcp "$BACKEND_PORT" || die "nginx did not start; see $NGX/error.log"
NGINX_PIDS=("$NGINX_PID" $(cat /proc/"$NGINX_PID"/task/*/children))

# ---- the candidates ----------------------------------------------------------------------
# Each start_<name> starts a client tunnel on CPORT[name] and a server tunnel on SPORT[name]
# forwarding to nginx, and records their pids. Session resumption is off in the main
# comparison (kith --tls-resumption off), so every new connection is a full TLS 1.3 handshake
# with a client certificate. A candidate named <name>_resume is the same pair with resumption
# on (kith's default), measured for new connections only.
declare -A CPORT SPORT CPID SPID LABEL SETUP STATUS

start_kith() { # [resume | pqoff | pool | base | pool_base]
    local c=kith${1:+_$1} resumption=off pool=off extra=() bin=$KITH
    local d=$WORK/$c
    [[ ${1:-} == resume ]] && resumption=on
    [[ ${1:-} == pool* ]] && pool=on
    [[ ${1:-} == pqoff ]] && extra=(--pq off)
    [[ ${1:-} == *base ]] && bin=$KITH_BASE
    mkdir -p "$d"
    LABEL[$c]="kith"
    [[ $pool == on ]] && LABEL[$c]="kith pooled"
    [[ $bin != "$KITH" ]] && LABEL[$c]+=" (base)"
    SETUP[$c]="two kith sidecar run processes (default --workers: 2 here, single-threaded event loops on SO_REUSEPORT listeners), explicit tunnels (--connect --expect-id; --forward --allow), identity from files; TLS 1.3 only (rustls + ring), --tls-resumption $resumption, --pool $pool${extra[*]:+, ${extra[*]}}; checks the peer's SPIFFE ID"
    [[ $pool == on ]] && SETUP[$c]+="; the pooled hop: each application connection is an HTTP/2 CONNECT stream of a few long-lived mTLS connections between the sidecars (kith/2), authorized per stream"
    "$bin" sidecar run --cert "$CRT_S" --key "$KEY_S" --bundle "$BUNDLE" --tls-resumption $resumption \
        --pool $pool "${extra[@]}" \
        --listen "127.0.0.1:${SPORT[$c]}" --forward "127.0.0.1:$BACKEND_PORT" --allow "$CLIENT_ID" \
        --admin-listen "127.0.0.1:$(free_port)" >"$d/server.log" 2>&1 &
    SPID[$c]=$!
    PIDS+=("${SPID[$c]}")
    "$bin" sidecar run --cert "$CRT_C" --key "$KEY_C" --bundle "$BUNDLE" --tls-resumption $resumption \
        --pool $pool "${extra[@]}" \
        --listen "127.0.0.1:${CPORT[$c]}" --connect "127.0.0.1:${SPORT[$c]}" --expect-id "$SERVER_ID" \
        --admin-listen "127.0.0.1:$(free_port)" >"$d/client.log" 2>&1 &
    CPID[$c]=$!
    PIDS+=("${CPID[$c]}")
}

haproxy_global() { # config file [resume]
    local cache="    # No session cache, no tickets: no resumption.
    tune.ssl.cachesize 0"
    [[ -n ${2:-} ]] && cache="    # Session cache and tickets on (the defaults): resumption."
    cat >"$1" <<EOF
global
    maxconn 8192
$cache
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
EOF
}

start_kith_pool() { start_kith pool; }
start_kith_base() { start_kith base; }
start_kith_pool_base() { start_kith pool_base; }

start_haproxy() { # [resume]
    local c=haproxy${1:+_resume} d server_opts=" no-tls-tickets" client_opts=" no-ssl-reuse no-tls-tickets"
    d=$WORK/$c
    mkdir -p "$d"
    LABEL[$c]="HAProxy $(haproxy -v | awk 'NR == 1 { sub(/-.*/, "", $3); print $3 }')"
    SETUP[$c]="two haproxy processes (default 2 threads each), tcp mode; server: bind ssl crt, ca-file, verify required, ssl-min-ver TLSv1.3, no-tls-tickets; client: server ssl crt, ca-file, verify required, no-ssl-reuse; no session cache; verifies the chain only (no SPIFFE ID check)"
    if [[ -n ${1:-} ]]; then
        server_opts="" client_opts=""
        SETUP[$c]="as above, with HAProxy's defaults for resumption: session cache, TLS tickets, ssl-reuse"
    fi
    haproxy_global "$d/server.cfg" "${1:-}"
    cat >>"$d/server.cfg" <<EOF
frontend mtls_in
    bind 127.0.0.1:${SPORT[$c]} ssl crt $PKI/server.pem ca-file $BUNDLE verify required ssl-min-ver TLSv1.3$server_opts
    default_backend app
backend app
    server nginx 127.0.0.1:$BACKEND_PORT
EOF
    haproxy_global "$d/client.cfg" "${1:-}"
    cat >>"$d/client.cfg" <<EOF
frontend plain_in
    bind 127.0.0.1:${CPORT[$c]}
    default_backend mtls_out
backend mtls_out
    server tunnel 127.0.0.1:${SPORT[$c]} ssl crt $PKI/client.pem ca-file $BUNDLE verify required ssl-min-ver TLSv1.3$client_opts
EOF
    haproxy -db -f "$d/server.cfg" >"$d/server.log" 2>&1 &
    SPID[$c]=$!
    PIDS+=("${SPID[$c]}")
    haproxy -db -f "$d/client.cfg" >"$d/client.log" 2>&1 &
    CPID[$c]=$!
    PIDS+=("${CPID[$c]}")
}

start_plain() {
    local d=$WORK/plain
    mkdir -p "$d"
    LABEL[plain]="plain relay"
    SETUP[plain]="baseline without TLS: two haproxy processes in tcp mode, no ssl on either hop"
    haproxy_global "$d/server.cfg"
    cat >>"$d/server.cfg" <<EOF
frontend tcp_in
    bind 127.0.0.1:${SPORT[plain]}
    default_backend app
backend app
    server nginx 127.0.0.1:$BACKEND_PORT
EOF
    haproxy_global "$d/client.cfg"
    cat >>"$d/client.cfg" <<EOF
frontend tcp_in
    bind 127.0.0.1:${CPORT[plain]}
    default_backend next
backend next
    server tunnel 127.0.0.1:${SPORT[plain]}
EOF
    haproxy -db -f "$d/server.cfg" >"$d/server.log" 2>&1 &
    SPID[plain]=$!
    PIDS+=("${SPID[plain]}")
    haproxy -db -f "$d/client.cfg" >"$d/client.log" 2>&1 &
    CPID[plain]=$!
    PIDS+=("${CPID[plain]}")
}

start_stunnel() { # [resume]
    local c=stunnel${1:+_resume} d resume=no
    d=$WORK/$c
    [[ -n ${1:-} ]] && resume=yes
    mkdir -p "$d"
    LABEL[$c]="stunnel $(stunnel4 -version 2>&1 | awk '/^stunnel/ { print $2; exit }')"
    SETUP[$c]="two stunnel4 processes (a thread per connection); sslVersion = TLSv1.3, verifyChain with CAfile (the server requires a client certificate), sessionResume = $resume, TCP_NODELAY, debug = 3; verifies the chain only (no SPIFFE ID check)"
    local side
    for side in server client; do
        {
            echo "foreground = yes"
            echo "pid ="
            echo "debug = 3"
            echo "output = $d/$side.log"
            echo "[tunnel]"
            if [[ $side == server ]]; then
                echo "accept = 127.0.0.1:${SPORT[$c]}"
                echo "connect = 127.0.0.1:$BACKEND_PORT"
                echo "cert = $CRT_S"
                echo "key = $KEY_S"
            else
                echo "client = yes"
                echo "accept = 127.0.0.1:${CPORT[$c]}"
                echo "connect = 127.0.0.1:${SPORT[$c]}"
                echo "cert = $CRT_C"
                echo "key = $KEY_C"
            fi
            echo "CAfile = $BUNDLE"
            echo "verifyChain = yes"
            echo "sslVersion = TLSv1.3"
            echo "sessionResume = $resume"
            echo "socket = l:TCP_NODELAY=1"
            echo "socket = r:TCP_NODELAY=1"
        } >"$d/$side.conf"
    done
    stunnel4 "$d/server.conf" >>"$d/server.out" 2>&1 &
    SPID[$c]=$!
    PIDS+=("${SPID[$c]}")
    stunnel4 "$d/client.conf" >>"$d/client.out" 2>&1 &
    CPID[$c]=$!
    PIDS+=("${CPID[$c]}")
}

# ghostunnel is not packaged in Debian 12 and needs Go to build; it runs when installed.
start_ghostunnel() {
    local d=$WORK/ghostunnel
    mkdir -p "$d"
    LABEL[ghostunnel]="ghostunnel"
    SETUP[ghostunnel]="ghostunnel server --allow-uri and client --verify-uri, --cert/--key/--cacert, --quiet=conns"
    ghostunnel server --listen "127.0.0.1:${SPORT[ghostunnel]}" --target "127.0.0.1:$BACKEND_PORT" \
        --cert "$CRT_S" --key "$KEY_S" --cacert "$BUNDLE" --allow-uri "$CLIENT_ID" --quiet=conns \
        >"$d/server.log" 2>&1 &
    SPID[ghostunnel]=$!
    PIDS+=("${SPID[ghostunnel]}")
    ghostunnel client --listen "127.0.0.1:${CPORT[ghostunnel]}" --target "127.0.0.1:${SPORT[ghostunnel]}" \
        --cert "$CRT_C" --key "$KEY_C" --cacert "$BUNDLE" --verify-uri "$SERVER_ID" --quiet=conns \
        >"$d/client.log" 2>&1 &
    CPID[ghostunnel]=$!
    PIDS+=("${CPID[ghostunnel]}")
}

ghostunnel_missing() {
    local why=()
    command -v ghostunnel >/dev/null && return 1
    if ! apt-cache policy ghostunnel 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        why+=("not packaged in this distribution (apt-cache policy ghostunnel: no candidate)")
    else
        why+=("not installed (apt-get install ghostunnel)")
    fi
    command -v go >/dev/null || why+=("no Go toolchain to build it")
    local IFS=';'
    echo "${why[*]}" | sed 's/;/; /g'
}

# One request through the pair, checked end to end.
through() { # port
    curl -sf --max-time 5 "http://127.0.0.1:$1/small" 2>/dev/null | grep -q 'kith sidecar bench'
}

# What the server tunnel accepts, checked with a client no one here wrote (openssl s_client):
# TLS 1.3 with the client SVID, no client certificate, a TLS 1.2-only client.
posture() { # candidate
    local port=${SPORT[$1]} out ok_cert no_cert tls12
    out=$(printf 'GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' |
        timeout 5 openssl s_client -connect "127.0.0.1:$port" -cert "$CRT_C" -cert_chain "$CRT_C" \
            -key "$KEY_C" -CAfile "$BUNDLE" -verify_return_error -brief -ign_eof 2>&1 || true)
    if grep -q 'Protocol version: TLSv1.3' <<<"$out" && grep -q '^HTTP/1.1 200' <<<"$out"; then
        ok_cert="TLS 1.3 with the client SVID: served"
    else
        ok_cert="TLS 1.3 with the client SVID: NOT served"
    fi
    out=$(printf 'GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' |
        timeout 5 openssl s_client -connect "127.0.0.1:$port" -CAfile "$BUNDLE" -brief -ign_eof 2>&1 || true)
    if grep -q '^HTTP/1.1 200' <<<"$out"; then no_cert="no client certificate: SERVED"; else no_cert="no client certificate: refused"; fi
    out=$(printf 'GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' |
        timeout 5 openssl s_client -connect "127.0.0.1:$port" -tls1_2 -cert "$CRT_C" \
            -cert_chain "$CRT_C" -key "$KEY_C" -CAfile "$BUNDLE" -brief -ign_eof 2>&1 || true)
    if grep -q '^HTTP/1.1 200' <<<"$out"; then tls12="TLS 1.2: SERVED"; else tls12="TLS 1.2: refused"; fi
    echo "$ok_cert; $no_cert; $tls12"
}

# The resumption variants of the TLS candidates that have a switch for it.
ALL=()
for c in $CANDIDATES; do ALL+=("$c"); done
if [[ $RESUMPTION == 1 ]]; then
    for c in $CANDIDATES; do
        case $c in kith | haproxy | stunnel) ALL+=("${c}_resume") ;; esac
    done
fi
# Full handshakes without the post-quantum hybrid key exchange, where kith has the switch
# (`--pq on|off`): the hybrid's cost on its own, new connections only.
if [[ " $CANDIDATES " == *" kith "* ]] && "$KITH" sidecar run --help | grep -q -- --pq; then
    ALL+=(kith_pqoff)
fi

RUN=()
for c in "${ALL[@]}"; do
    if [[ $c == ghostunnel ]] && why=$(ghostunnel_missing); then
        LABEL[ghostunnel]="ghostunnel"
        STATUS[ghostunnel]="not available here ($why)"
        log "ghostunnel: ${STATUS[ghostunnel]}"
        continue
    fi
    CPORT[$c]=$(free_port)
    SPORT[$c]=$(free_port)
    log "starting $c (client tunnel 127.0.0.1:${CPORT[$c]}, server tunnel 127.0.0.1:${SPORT[$c]})"
    if [[ $c == *_resume ]]; then "start_${c%_resume}" resume
    elif [[ $c == kith_pqoff ]]; then start_kith pqoff
    else "start_$c"; fi
    ready=0
    for _ in $(seq 1 100); do
        if through "${CPORT[$c]}"; then ready=1; break; fi
        sleep 0.1
    done
    if ((ready == 0)); then
        [[ $c == kith ]] && die "kith's tunnel pair does not carry a request; see $WORK/kith/*.log (KEEP=1)"
        STATUS[$c]="failed to carry a request here (see its logs with KEEP=1)"
        log "$c: ${STATUS[$c]}"
        kill "${CPID[$c]}" "${SPID[$c]}" 2>/dev/null || true
        continue
    fi
    if [[ $c == plain ]]; then
        STATUS[$c]="ran (no TLS)"
    elif [[ $c == *_resume || $c == kith_pqoff ]]; then
        STATUS[$c]="ran"
    else
        STATUS[$c]="ran; server tunnel checked with openssl s_client: $(posture "$c")"
    fi
    RUN+=("$c")
done
[[ " ${RUN[*]} " == *" kith "* ]] || die "kith is not among the candidates that ran"

# ---- measurements ------------------------------------------------------------------------
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
cat >"$WORK/report.lua" <<'EOF'
-- One JSON line with what bench/sidecar.sh reads (latencies in microseconds).
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '{"requests":%d,"duration_s":%.3f,"errors":%d,"connect_errors":%d,"read_errors":%d,' ..
        '"timeouts":%d,"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
        summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.status + e.timeout,
        e.connect, e.read, e.timeout, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
        latency.max / 1e3))
end
EOF

# A measured window: CPU of the candidate's two tunnels, and how much of the machine others used
# (machine CPU less the tunnels, nginx and this script's finished children, the load generators).
window_start() { # candidate
    times >"$WORK/times"
    W_CHILD=$(awk -v hz="$HZ" 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } printf "%d", t * hz }' "$WORK/times")
    W_TUN=$(cpu_ticks "${CPID[$1]}" "${SPID[$1]}")
    W_NGX=$(cpu_ticks "${NGINX_PIDS[@]}")
    W_MACH=$(machine_ticks)
    W_T0=$(date +%s.%N)
}
# Sets WIN (JSON fields). Both run in this shell, never in $(...): `times` must see its children.
window_end() { # candidate
    local tun ngx mach child t1
    times >"$WORK/times"
    child=$(awk -v hz="$HZ" 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } printf "%d", t * hz }' "$WORK/times")
    tun=$(cpu_ticks "${CPID[$1]}" "${SPID[$1]}")
    ngx=$(cpu_ticks "${NGINX_PIDS[@]}")
    mach=$(machine_ticks)
    t1=$(date +%s.%N)
    WIN=$(jq -nc --argjson hz "$HZ" --argjson tun $((tun - W_TUN)) --argjson ngx $((ngx - W_NGX)) \
        --argjson child $((child - W_CHILD)) --argjson mach $((mach - W_MACH)) \
        --argjson wall "$(awk -v a="$W_T0" -v b="$t1" 'BEGIN { print b - a }')" \
        --argjson load "$(cut -d' ' -f1 /proc/loadavg)" '{
        tunnel_cpu_s: ($tun / $hz), nginx_cpu_s: ($ngx / $hz), loadgen_cpu_s: ($child / $hz),
        other_cores: ((([$mach - $tun - $ngx - $child, 0] | max) / $hz / $wall) * 100 | round / 100),
        loadavg: $load }')
}

wrk_run() { # port duration [header]
    local extra=()
    [[ -n ${3:-} ]] && extra=(-H "$3")
    wrk -t "$THREADS" -c "$CONNECTIONS" -d "$2" --latency -s "$WORK/report.lua" "${extra[@]}" \
        "http://127.0.0.1:$1/small" >"$WORK/wrk.out" 2>&1 || true
    grep '^{' "$WORK/wrk.out" | tail -1 || echo '{"requests":0,"errors":-1}'
}

log "memory: each pair idle, then with $HOLD_CONNS idle connections held through it"
for c in "${RUN[@]}"; do
    [[ $c == *_resume || $c == kith_pqoff ]] && continue
    sleep 1
    idle=$(mem_kib VmRSS "${CPID[$c]}" "${SPID[$c]}")
    idle_anon=$(mem_kib RssAnon "${CPID[$c]}" "${SPID[$c]}")
    if held=$("$HOLD" --addr "127.0.0.1:${CPORT[$c]}" --connections "$HOLD_CONNS" \
        --pid "${CPID[$c]}" --pid "${SPID[$c]}" 2>"$WORK/$c-hold.err"); then
        :
    else
        held=$(jq -nc --arg e "$(tail -1 "$WORK/$c-hold.err")" '{hold_error: $e}')
    fi
    jq -c --arg c "$c" --argjson idle "$idle" --argjson anon "$idle_anon" \
        '{cand: $c, kind: "memory", rss_idle_kib: $idle, anon_idle_kib: $anon} + .' \
        <<<"$held" | tee -a "$RESULTS" >&2
    sleep 1
done

# Rounds: every candidate once per round, the order rotated so that none always goes first.
for r in $(seq 1 "$ROUNDS"); do
    order=("${RUN[@]:$(((r - 1) % ${#RUN[@]}))}" "${RUN[@]:0:$(((r - 1) % ${#RUN[@]}))}")
    for c in "${order[@]}"; do
        port=${CPORT[$c]}
        if [[ $c == *_resume || $c == kith_pqoff ]]; then
            log "round $r/$ROUNDS: $c: warm-up, new connections only"
            wrk_run "$port" "$WARMUP" "Connection: close" >/dev/null
            window_start "$c"
            w=$(wrk_run "$port" "$DURATION" "Connection: close")
            window_end "$c"
            jq -c --arg c "$c" --argjson r "$r" --argjson win "$WIN" \
                '{cand: $c, round: $r, kind: "newconn"} + . + $win' <<<"$w" | tee -a "$RESULTS" >&2
            continue
        fi
        log "round $r/$ROUNDS: $c: warm-up, keep-alive, new connections, bulk"
        wrk_run "$port" "$WARMUP" >/dev/null

        window_start "$c"
        w=$(wrk_run "$port" "$DURATION")
        window_end "$c"
        jq -c --arg c "$c" --argjson r "$r" --argjson win "$WIN" \
            '{cand: $c, round: $r, kind: "keepalive"} + . + $win' <<<"$w" | tee -a "$RESULTS" >&2

        window_start "$c"
        w=$(wrk_run "$port" "$DURATION" "Connection: close")
        window_end "$c"
        jq -c --arg c "$c" --argjson r "$r" --argjson win "$WIN" \
            '{cand: $c, round: $r, kind: "newconn"} + . + $win' <<<"$w" | tee -a "$RESULTS" >&2

        window_start "$c"
        : >"$WORK/bulk"
        for _ in $(seq 1 "$BULK_COUNT"); do
            curl -sf --max-time 120 -o /dev/null -w '%{size_download} %{time_total}\n' \
                "http://127.0.0.1:$port/big" >>"$WORK/bulk" || echo "0 0" >>"$WORK/bulk"
        done
        window_end "$c"
        awk '{ b += $1; t += $2; if ($1 == 0) f++ } END { printf "{\"bytes\":%d,\"seconds\":%.3f,\"failed\":%d}\n", b, t, f }' \
            "$WORK/bulk" | jq -c --arg c "$c" --argjson r "$r" --argjson win "$WIN" \
            '{cand: $c, round: $r, kind: "bulk"} + . + $win' | tee -a "$RESULTS" >&2
    done
done

# ---- the table ---------------------------------------------------------------------------
META=$WORK/candidates.json
for c in "${ALL[@]}"; do
    jq -nc --arg c "$c" --arg lab "${LABEL[$c]:-$c}" --arg setup "${SETUP[$c]:-}" --arg status "${STATUS[$c]:-}" \
        '{cand: $c, label: $lab, setup: $setup, status: $status}'
done | jq -s . >"$META"
REPORT=$WORK/report.md
python3 - "$RESULTS" "$META" "$ROUNDS" "$DURATION" "$WARMUP" "$CONNECTIONS" "$THREADS" "$BULK_MIB" \
    "$BULK_COUNT" "$HOLD_CONNS" "$(nproc)" "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)" \
    "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)" "$((${#SMALL_BODY} + 1))" <<'PY' | tee "$REPORT"
import json, statistics, sys

(results, meta, rounds, duration, warmup, conns, threads, bulk_mib, bulk_count, hold,
 ncpu, cpu, load_start, load_end, small) = sys.argv[1:]
rows = [json.loads(l) for l in open(results) if l.strip()]
cands = json.load(open(meta))
ran_all = [c["cand"] for c in cands if c["status"].startswith("ran")]
ran = [c for c in ran_all if not c.endswith("_resume") and c != "kith_pqoff"]
resumed = [c for c in ran_all if c.endswith("_resume")]
label = {c["cand"]: c["label"] for c in cands}
KITHS = ("kith", "kith_pool", "kith_base", "kith_pool_base")
peers = [c for c in ran if c not in KITHS + ("plain",)]

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def of(cand, kind):
    return [r for r in rows if r["cand"] == cand and r["kind"] == kind]

fig = {}
for c in ran_all:
    ka, nc, bu = of(c, "keepalive"), of(c, "newconn"), of(c, "bulk")
    mem = (of(c, "memory") or [{}])[0]
    f = {
        "rps": med(r["requests"] / r["duration_s"] for r in ka if r["requests"]),
        "p50": med(r["p50_ms"] for r in ka if r["requests"]),
        "p99": med(r["p99_ms"] for r in ka if r["requests"]),
        "cps": med(r["requests"] / r["duration_s"] for r in nc if r["requests"]),
        "bulk": med(r["bytes"] / r["seconds"] / 2**20 for r in bu if r["seconds"] > 0 and not r["failed"]),
        "rss_idle": mem.get("rss_idle_kib", 0) / 1024 or None,
        "rss_held": (mem.get("rss_kib_with_total", 0) / 1024 or None)
        if mem.get("still_open_after_hold") == mem.get("connections") else None,
        "anon_idle": mem.get("anon_idle_kib", 0) / 1024 or None,
        "anon_held": (mem.get("anon_kib_with_total", 0) / 1024 or None)
        if mem.get("still_open_after_hold") == mem.get("connections") else None,
        "cpu_10k": med(r["tunnel_cpu_s"] / r["requests"] * 1e4 for r in ka if r["requests"]),
        "cpu_1k_conn": med(r["tunnel_cpu_s"] / r["requests"] * 1e3 for r in nc if r["requests"]),
        "cpu_gib": med(r["tunnel_cpu_s"] / (r["bytes"] / 2**30) for r in bu if r["bytes"]),
    }
    if f["rss_held"] and f["rss_idle"]:
        f["per_conn"] = (mem["rss_kib_with_total"] - mem["rss_idle_kib"]) / int(mem["connections"])
    else:
        f["per_conn"] = None
    fig[c] = f

# (key, name, digits, better, target): target(kith, best peer) -> (text, met)
def more(factor):
    return (f"≥ {factor}x the best TLS peer" if factor != 1 else "≥ the best TLS peer",
            lambda k, vals: k >= factor * max(vals))
def less(factor):
    return (f"≤ {factor}x the smallest TLS peer" if factor != 1 else "≤ the best TLS peer",
            lambda k, vals: k <= factor * min(vals))
FIGS = [
    ("rps", "keep-alive requests/s", 0, more(1.1)),
    ("p50", "keep-alive p50 latency, ms", 2, None),
    ("p99", "keep-alive p99 latency, ms", 2, less(1)),
    ("cps", "new connections/s (TCP + full TLS 1.3 mTLS handshake per request)", 0, more(1.2)),
    ("bulk", f"bulk download, MiB/s ({bulk_mib} MiB file)", 0, more(1.2)),
    ("rss_idle", "RSS idle, both tunnels, MiB", 1, less(1)),
    ("rss_held", f"RSS with {hold} idle connections, both tunnels, MiB", 1, less(0.75)),
    ("per_conn", "RSS per held connection, both tunnels, KiB", 1, None),
    ("anon_idle", "of the RSS idle: anonymous memory (not file pages), MiB", 1, None),
    ("anon_held", f"of the RSS with {hold} connections: anonymous memory, MiB", 1, None),
    ("cpu_10k", "CPU s per 10,000 keep-alive requests, both tunnels", 3, None),
    ("cpu_1k_conn", "CPU s per 1,000 new connections, both tunnels", 3, None),
    ("cpu_gib", "CPU s per GiB of bulk, both tunnels", 2, None),
]

def fmt(v, d):
    if v is None:
        return "n/a"
    return f"{v:,.{d}f}"

others = [c for c in ran if c not in KITHS]
print(f"## Sidecar data path: kith vs {', '.join(label[c] for c in others)}\n")
print("Chain on loopback: load generator → client tunnel (plaintext in, mTLS out) → server tunnel "
      "(mTLS in, plaintext out) → nginx. Same nginx, same certificates (kith dev CA, P-256 ECDSA "
      "SVIDs) for every candidate; session resumption off everywhere (kith: `--tls-resumption off`), "
      "so every new connection is a full TLS 1.3 handshake with a client certificate. Resumption "
      "is measured apart, below.\n")
print(f"{rounds} round(s); in each, every candidate gets a {warmup} warm-up, then keep-alive load "
      f"(`wrk -t {threads} -c {conns} -d {duration}` over keep-alive connections, a {small}-byte "
      f"answer), new "
      f"connections (the same with `Connection: close`: every request is a new TCP connection to "
      f"the client tunnel, a new TCP + TLS handshake to the server tunnel and a new TCP connection "
      f"to nginx), and {bulk_count} downloads of a {bulk_mib} MiB file (curl). Figures are medians "
      f"of the rounds. Memory: each pair idle after start, then with {hold} connections held open "
      f"through it (`conn-hold`: one request on each, then silent).\n")
print(f"**Machine: {ncpu} cores ({cpu}), shared by the load generator, both tunnels and nginx**: "
      f"the figures are relative, compare only within one run. Load average (1, 5, 15 min) at the "
      f"start {load_start}, at the end {load_end}.")
other = [r["other_cores"] for r in rows if "other_cores" in r]
if other:
    print(f"Other work on the machine during the measured windows: median {statistics.median(other):.2f} "
          f"cores, max {max(other):.2f}" + (" — **busy: the figures are disturbed**." if max(other) > 0.25 else "."))
print()
print("| candidate | setup | status |")
print("|---|---|---|")
for c in cands:
    print(f"| {c['label']} | {c['setup'] or '—'} | {c['status']} |")
print()

head = ["figure"] + [label[c] for c in ran] + [f"kith ÷ {label[c]}" for c in others]
head += ["issue 6 target", "met"]
print("| " + " | ".join(head) + " |")
print("|---|" + "---:|" * (len(ran) + len(others)) + "---|---|")
for key, name, d, target in FIGS:
    k = fig["kith"][key]
    cells = [name] + [fmt(fig[c][key], d) for c in ran]
    for c in others:
        v = fig[c][key]
        cells.append(f"{k / v:.2f}" if k is not None and v else "n/a")
    if target is None:
        cells += ["", ""]
    else:
        text, ok = target
        vals = [fig[c][key] for c in peers if fig[c][key] is not None]
        if not vals or k is None:
            cells += [text, "n/a (no TLS peer)"]
        else:
            cells += [text, "yes" if ok(k, vals) else "**no**"]
    print("| " + " | ".join(cells) + " |")
print()
print("Ratios are kith ÷ peer: above 1 means kith's number is higher, which is better for "
      "requests/s, connections/s and MiB/s and worse for latency, memory and CPU. Targets are "
      "against the best TLS peer in this run (the plain relay is the ceiling, not a peer). RSS "
      "is VmRSS: it counts the pages of the executable and shared libraries a process touched "
      "(kith is one binary for every role; HAProxy and stunnel share libssl/libcrypto), the "
      "anonymous rows are the private heap and stacks.")
print()
if resumed and "kith_resume" in resumed:
    rpeers = [c for c in resumed if c != "kith_resume"]
    print("### New connections with TLS session resumption (a feature; not the like-for-like figure)\n")
    print("The same pairs started again with resumption on (kith's default; HAProxy's and "
          "stunnel's defaults), the same `Connection: close` load: after the first connection "
          "each new one resumes a TLS 1.3 session (PSK with a fresh X25519 exchange; no "
          "certificates, no signatures).\n")
    print("| figure | " + " | ".join(label[c] for c in resumed) + " | "
          + " | ".join(f"kith ÷ {label[c]}" for c in rpeers) + " |")
    print("|---|" + "---:|" * (len(resumed) + len(rpeers)))
    for key, name, d in [("cps", "new connections/s with resumption", 0),
                         ("cpu_1k_conn", "CPU s per 1,000 new connections, both tunnels", 3)]:
        k = fig["kith_resume"][key]
        cells = [name] + [fmt(fig[c][key], d) for c in resumed]
        cells += [f"{k / fig[c][key]:.2f}" if k and fig[c][key] else "n/a" for c in rpeers]
        print("| " + " | ".join(cells) + " |")
    full, res = fig.get("kith", {}).get("cps"), fig["kith_resume"]["cps"]
    if full and res:
        print(f"\nkith with resumption ÷ kith without: {res / full:.2f}.")
    print()
if "kith_pool" in ran_all:
    # Issue 20: the pooled hop against the plain relay (the no-crypto ceiling) and HAProxy.
    kp, kf = fig["kith_pool"], fig.get("kith", {})
    pl = fig.get("plain", {})
    hp = fig.get("haproxy", {})
    best_cps = max([fig[c]["cps"] for c in peers if fig[c]["cps"]] or [0]) or None
    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "n/a"
    def met(a, b, f, ge=True):
        if not (a and b):
            return "n/a"
        return "yes" if (a >= f * b if ge else a <= f * b) else "**no**"
    print("### The pooled hop (kith pooled: `--pool on`, the default) against the plain relay\n")
    print("kith pooled: both sidecars pool (ALPN kith/2), each application connection is an HTTP/2 "
          "CONNECT stream of a few long-lived mTLS connections; every other row above is one mTLS "
          "connection per application connection (kith: `--pool off`).\n")
    print("| figure | kith pooled | plain relay | HAProxy | pooled ÷ relay | pooled ÷ HAProxy | issue 20 target | met |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for key, name, d, tgt, f, ge, against in [
        ("cps", "new connections/s through the pooled hop", 0, "≥ 0.8x the relay", 0.8, True, pl),
        ("rps", "keep-alive requests/s", 0, "≥ 0.95x the relay", 0.95, True, pl),
        ("p99", "keep-alive p99 latency, ms", 2, "≤ 1.2x the relay", 1.2, False, pl),
        ("bulk", f"bulk download, MiB/s ({bulk_mib} MiB file)", 0, "≥ the relay", 1.0, True, pl),
        ("per_conn", "RSS per held connection, both sidecars, KiB", 1, "≤ 0.5x HAProxy", 0.5, False, hp),
        ("anon_held", f"anonymous memory with {hold} connections, MiB", 1, None, None, None, None),
    ]:
        a = kp.get(key)
        cells = [name, fmt(a, d), fmt(pl.get(key), d), fmt(hp.get(key), d),
                 ratio(a, pl.get(key)), ratio(a, hp.get(key))]
        cells += [tgt or "", met(a, against.get(key), f, ge) if tgt else ""]
        print("| " + " | ".join(cells) + " |")
    print()
    if kf.get("cps") and best_cps:
        print(f"Full handshakes (kith `--pool off`, like for like): {fmt(kf['cps'], 0)} new connections/s, "
              f"{kf['cps'] / best_cps:.2f}x the best TLS peer (issue 20 target: ≥ 2.5x).")
    pq = fig.get("kith_pqoff", {}).get("cps")
    if pq and kf.get("cps"):
        print(f"Without the post-quantum hybrid (`--pool off --pq off`): {fmt(pq, 0)} new connections/s; "
              f"with it ÷ without: {kf['cps'] / pq:.2f}.")
    elif "kith_pqoff" not in ran_all:
        print("No `--pq off` row: this kith has no `--pq` switch.")
    print()
if "kith_base" in ran_all or "kith_pool_base" in ran_all:
    print("### A/B: this build against the base build (KITH_BASE), in the same rounds\n")
    print("Both builds run as the same candidates, one after the other in every round. Above 1 is "
          "more for rates, and worse for latency, memory and CPU.\n")
    pairs = [(c, c + "_base") for c in ("kith", "kith_pool") if c in ran_all and c + "_base" in ran_all]
    print("| figure | " + " | ".join(f"{label[a]} | {label[b]} | ÷" for a, b in pairs) + " |")
    print("|---|" + "---:|---:|---:|" * len(pairs))
    for key, name, d, _ in FIGS:
        cells = [name]
        for a, b in pairs:
            x, y = fig[a][key], fig[b][key]
            cells += [fmt(x, d), fmt(y, d), f"{x / y:.2f}" if x and y else "n/a"]
        print("| " + " | ".join(cells) + " |")
    print()
print("Per round (errors: wrk's connect/read/write/timeout/status errors):\n")
print("| round | candidate | keep-alive req/s | p50 / p99 ms | errors | new conn/s | errors | bulk MiB/s | other load (cores) | load avg |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in range(1, int(rounds) + 1):
    for c in ran:
        ka = [x for x in of(c, "keepalive") if x["round"] == r]
        nc = [x for x in of(c, "newconn") if x["round"] == r]
        bu = [x for x in of(c, "bulk") if x["round"] == r]
        if not (ka and nc and bu):
            continue
        ka, nc, bu = ka[0], nc[0], bu[0]
        rate = lambda x: x["requests"] / x["duration_s"] if x["requests"] else 0
        mib = bu["bytes"] / bu["seconds"] / 2**20 if bu["seconds"] else 0
        oth = max(ka["other_cores"], nc["other_cores"], bu["other_cores"])
        print(f"| {r} | {label[c]} | {rate(ka):,.0f} | {ka.get('p50_ms', 0):.2f} / {ka.get('p99_ms', 0):.2f} | "
              f"{ka['errors']} | {rate(nc):,.0f} | {nc['errors']} | {mib:,.0f} | {oth:.2f} | {ka['loadavg']} |")
PY

if [[ $SAVE == 1 ]]; then
    save_results sidecar "Sidecar data path benchmark" \
        "$(printf '%s ' QUICK="$QUICK" ROUNDS="$ROUNDS" DURATION="$DURATION" CONNECTIONS="$CONNECTIONS" \
            BULK_COUNT="$BULK_COUNT" RESUMPTION="$RESUMPTION" CANDIDATES="'$ASKED'" ${KITH_BASE:+KITH_BASE="$KITH_BASE"})bench/sidecar.sh" \
        "$(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(uname -r); kith $BUILT_FROM; nginx $(nginx -v 2>&1 | cut -d/ -f2), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')" \
        "$REPORT" "Raw lines" "$RESULTS"
fi
