#!/usr/bin/env bash
# CA issuance benchmark: kith CA vs cfssl, in one run on the same machine.
#
#   bench/ca.sh                 3 rounds of 20 s per target
#   QUICK=1 bench/ca.sh         1 round of 10 s per target
#   SAVE=1 bench/ca.sh          also write bench/results/ca-<date>.md
#
# Environment: ROUNDS (3), DURATION (20s), WARMUP (3s), CONNECTIONS (16), QUICK, SAVE,
# CFSSL_LOGLEVEL (2 = warnings; cfssl's default 1 logs three lines per issuance),
# QUIET_WAIT (seconds to wait for other work on the machine to stop before each round, 120),
# KEEP=1 (keep the temp dir with logs and databases), PG_ROWS (1: also kith on PostgreSQL, one
# replica and two sharing one database; 0: skip), KITH_BASE (an older kith binary: also run it on
# SQLite right after this build, as the series kith-base, and report this build ÷ that one; an
# A/B comparison at one time on one machine). See bench/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    ROUNDS=${ROUNDS:-1}
    DURATION=${DURATION:-10s}
    WARMUP=${WARMUP:-2s}
else
    ROUNDS=${ROUNDS:-3}
    DURATION=${DURATION:-20s}
    WARMUP=${WARMUP:-3s}
fi
CONNECTIONS=${CONNECTIONS:-16}
CFSSL_LOGLEVEL=${CFSSL_LOGLEVEL:-2}
QUIET_WAIT=${QUIET_WAIT:-120}
SAVE=${SAVE:-0}
KEEP=${KEEP:-0}
TD=example.org
WORKLOAD_ID=spiffe://$TD/bench/w

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for tool in cargo openssl cfssl jq; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

# ---- build once --------------------------------------------------------------------------
log "building (cargo build --release -j2 -p kith -p kith-bench)"
(cd "$ROOT" && cargo build --release -j2 -p kith -p kith-bench)
BUILT_FROM=$(built_from ca src identity)
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
KITH=$TARGET_DIR/release/kith
LOAD=$TARGET_DIR/release/ca-load
[[ -x $KITH && -x $LOAD ]] || die "binaries not found in $TARGET_DIR/release"
KITH_BASE=${KITH_BASE:-}
if [[ -n $KITH_BASE ]]; then
    [[ -x $KITH_BASE ]] || die "KITH_BASE=$KITH_BASE is not an executable"
    KITH_BASE=$(realpath "$KITH_BASE")
fi

WORK=$(mktemp -d /tmp/kith-bench-ca.XXXXXX)
PIDS=()
PG_STOP=()
cleanup() {
    local pid
    if ((${#PG_STOP[@]} > 0)); then
        (cd "$PGDIR" && "${PG_STOP[@]}" >/dev/null 2>&1) || true
    fi
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

# Stops one process we started and forgets it.
stop() {
    local pid=$1 p keep=()
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_tcp() { # host port what
    local i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$3 did not start listening on $1:$2"
}

# Cores busy over one second on the whole machine (nothing of ours runs while this samples).
busy_cores() {
    local a b
    a=$(head -1 /proc/stat)
    sleep 1
    b=$(head -1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x); split(b, y); busy = 0
        for (i = 2; i <= 9; i++) if (i != 5 && i != 6) busy += y[i] - x[i]
        printf "%.2f", busy / 100 }'
}

# Waits (up to QUIET_WAIT s) until other work leaves the shared cores, so it does not eat
# into one target's round more than the other's.
wait_quiet() {
    local waited=0 b
    while :; do
        b=$(busy_cores)
        if awk -v b="$b" 'BEGIN { exit !(b < 0.25) }'; then return 0; fi
        if ((waited >= QUIET_WAIT)); then
            log "warning: the machine is still busy (${b} cores) after ${QUIET_WAIT}s; measuring anyway"
            return 0
        fi
        ((waited == 0)) && log "waiting for other work to stop (${b} cores busy)"
        waited=$((waited + 1))
    done
}

db_bytes() { # data dir: the database with its WAL
    local total=0 f
    for f in "$1"/kith-ca.db "$1"/kith-ca.db-wal; do
        [[ -f $f ]] && total=$((total + $(stat -c %s "$f")))
    done
    echo "$total"
}

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
log "work dir $WORK; $ROUNDS round(s) of $DURATION (+$WARMUP warm-up), $CONNECTIONS connections"

# ---- (a) the crypto limit ---------------------------------------------------------------
wait_quiet
log "openssl speed -seconds 3 ecdsap256"
SPEED=$(openssl speed -seconds 3 ecdsap256 2>/dev/null | awk '/nistp256/ { print $(NF-1), $NF }' | tail -1)
read -r SIGN_S VERIFY_S <<<"$SPEED"
[[ -n ${VERIFY_S:-} ]] || die "could not read openssl speed's output"
OPENSSL_VERSION=$(openssl version)

# ---- (b) kith ----------------------------------------------------------------------------
# ROUNDS rounds of the load against the CAs at ADDRS (comma-separated, pids PIDS) of one
# series; DIR holds the first CA's data dir and bundle. Sets SERIES_ISSUED.
kith_rounds() { # name binary dir addrs pids
    local name=$1 bin=$2 dir=$3 addrs=$4 pids=$5 r line
    SERIES_ISSUED=0
    for r in $(seq 1 "$ROUNDS"); do
        TOKEN=$("$bin" ca token create --name bench --data-dir "$dir/data" --json | jq -r .token)
        wait_quiet
        log "$name round $r/$ROUNDS ($addrs)"
        line=$("$LOAD" --target kith --series "$name" --addr "$addrs" \
            --bundle "$dir/bundle.pem" --token "$TOKEN" --id "$WORKLOAD_ID" \
            --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
            --server-pid "$pids" --label "round $r")
        echo "$line" | tee -a "$RESULTS" >&2
        # The node SVID of the attestation is an issuance too.
        SERIES_ISSUED=$((SERIES_ISSUED + $(jq .total_ok <<<"$line") + 1))
    done
}

# One CA on SQLite, ROUNDS rounds; the series is NAME. Sets SERIES_PID to the stopped CA's pid
# and leaves its data dir in $WORK/NAME.
kith_sqlite_series() { # name binary
    local name=$1 bin=$2 dir=$WORK/$1 port mport pid
    mkdir -p "$dir"
    port=$(free_port)
    mport=$(free_port)
    log "starting $name ca on 127.0.0.1:$port ($bin)"
    "$bin" ca serve --data-dir "$dir/data" --listen "127.0.0.1:$port" \
        --metrics-listen "127.0.0.1:$mport" --trust-domain "$TD" >"$dir/ca.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_tcp 127.0.0.1 "$port" "$name ca"
    for _ in $(seq 1 50); do
        "$bin" ca bundle --data-dir "$dir/data" >"$dir/bundle.pem" 2>/dev/null && break
        sleep 0.1
    done
    [[ -s $dir/bundle.pem ]] || die "$name ca bundle failed; see $dir/ca.log"
    "$bin" ca entry create --id "$WORKLOAD_ID" --parent "spiffe://$TD/kith/node/bench" \
        --selector unix:uid:0 --data-dir "$dir/data" >/dev/null
    SERIES_DB_BEFORE=$(db_bytes "$dir/data")
    kith_rounds "$name" "$bin" "$dir" "127.0.0.1:$port" "$pid"
    SERIES_RSS_KB=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status")
    stop "$pid"
}
KITH_CA_KEK=$(openssl rand -base64 32)
export KITH_CA_KEK
kith_sqlite_series kith "$KITH"
KDIR=$WORK/kith
KDB_BEFORE=$SERIES_DB_BEFORE
KITH_ISSUED=$SERIES_ISSUED
KITH_RSS_KB=$SERIES_RSS_KB
KDB_STOPPED=$(db_bytes "$KDIR/data")
# What the issuances really take: fold the WAL into the database (the CA is stopped).
python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute("PRAGMA wal_checkpoint(TRUNCATE)"); c.close()' \
    "$KDIR/data/kith-ca.db"
KDB_AFTER=$(db_bytes "$KDIR/data")
if [[ -n $KITH_BASE ]]; then
    kith_sqlite_series kith-base "$KITH_BASE"
fi

# ---- (b2) kith on PostgreSQL: one replica, then two replicas sharing one database ---------
# A throwaway cluster (Debian's postgresql), durable like the SQLite store (fsync and
# synchronous_commit on), as the postgres user (PostgreSQL refuses to run as root).
PG_ROWS=${PG_ROWS:-1}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [[ $PG_ROWS == 1 && -x $PGBIN/initdb ]]; then
    PGDIR=$WORK/pg
    mkdir -p "$PGDIR"
    as_pg=()
    if [[ $(id -u) == 0 ]]; then
        # The server user must reach its directory inside the private work dir.
        chmod 711 "$WORK"
        chown postgres: "$PGDIR"
        as_pg=(runuser -u postgres --)
    fi
    PGPORT=$(free_port)
    (cd "$PGDIR" && "${as_pg[@]}" "$PGBIN/initdb" -D "$PGDIR/data" -U postgres -A trust >/dev/null)
    (cd "$PGDIR" && "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w \
        -o "-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=100" start >/dev/null)
    PG_STOP=("${as_pg[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast -w stop)

    # Runs ROUNDS rounds against REPLICAS replicas on database DB; the series is NAME.
    kith_pg_series() { # name db replicas
        local name=$1 db=$2 n=$3 i addrs="" pids="" dirs=() url
        "$PGBIN/psql" -X -q -h "$PGDIR" -p "$PGPORT" -U postgres -c "CREATE DATABASE $db" postgres
        url="postgres://postgres@127.0.0.1:$PGPORT/$db?sslmode=disable"
        for i in $(seq 1 "$n"); do
            local dir=$WORK/$name-$i port mport pid
            mkdir -p "$dir"
            port=$(free_port)
            mport=$(free_port)
            "$KITH" ca serve --data-dir "$dir/data" --listen "127.0.0.1:$port" --store "$url" \
                --metrics-listen "127.0.0.1:$mport" --trust-domain "$TD" >"$dir/ca.log" 2>&1 &
            pid=$!
            PIDS+=("$pid")
            wait_tcp 127.0.0.1 "$port" "kith ca ($name $i)"
            addrs+="${addrs:+,}127.0.0.1:$port"
            pids+="${pids:+,}$pid"
            dirs+=("$dir")
        done
        "$KITH" ca bundle --data-dir "${dirs[0]}/data" >"${dirs[0]}/bundle.pem"
        "$KITH" ca entry create --id "$WORKLOAD_ID" --parent "spiffe://$TD/kith/node/bench" \
            --selector unix:uid:0 --data-dir "${dirs[0]}/data" >/dev/null
        # Replicas pick up entries made on another within 2 s.
        sleep 3
        kith_rounds "$name" "$KITH" "${dirs[0]}" "$addrs" "$pids"
        "$KITH" ca audit verify --data-dir "${dirs[0]}/data" >&2
        for pid in ${pids//,/ }; do stop "$pid"; done
    }
    kith_pg_series kith-pg bench1 1
    kith_pg_series kith-pg2 bench2 2
    (cd "$PGDIR" && "${PG_STOP[@]}" >/dev/null)
    PG_STOP=()
else
    log "skipping the PostgreSQL rows (PG_ROWS=$PG_ROWS, server binaries: ${PGBIN:-none})"
fi

# ---- (c) cfssl ---------------------------------------------------------------------------
CDIR=$WORK/cfssl
mkdir -p "$CDIR"
cat >"$CDIR/ca-csr.json" <<'EOF'
{"CN": "kith bench cfssl CA", "key": {"algo": "ecdsa", "size": 256}, "names": [{"O": "kith-bench"}]}
EOF
cat >"$CDIR/config.json" <<'EOF'
{"signing": {"default": {"expiry": "1h", "usages": ["digital signature", "server auth", "client auth"]}}}
EOF
cfssl gencert -initca "$CDIR/ca-csr.json" 2>"$CDIR/gencert.log" >"$CDIR/ca.json"
jq -r .cert "$CDIR/ca.json" >"$CDIR/ca.pem"
jq -r .key "$CDIR/ca.json" >"$CDIR/ca-key.pem"
CPORT=$(free_port)
log "starting cfssl serve on 127.0.0.1:$CPORT ($(cfssl version | head -1), -loglevel $CFSSL_LOGLEVEL)"
cfssl serve -address 127.0.0.1 -port "$CPORT" -ca "$CDIR/ca.pem" -ca-key "$CDIR/ca-key.pem" \
    -config "$CDIR/config.json" -loglevel "$CFSSL_LOGLEVEL" >"$CDIR/serve.log" 2>&1 &
CPID=$!
PIDS+=("$CPID")
wait_tcp 127.0.0.1 "$CPORT" "cfssl serve"
for r in $(seq 1 "$ROUNDS"); do
    wait_quiet
    log "cfssl round $r/$ROUNDS"
    line=$("$LOAD" --target cfssl --addr "127.0.0.1:$CPORT" --connections "$CONNECTIONS" \
        --duration "$DURATION" --warmup "$WARMUP" --server-pid "$CPID" --label "round $r")
    echo "$line" | tee -a "$RESULTS" >&2
done
CFSSL_RSS_KB=$(awk '/^VmHWM/ { print $2 }' "/proc/$CPID/status")
stop "$CPID"

# ---- (d) the table -----------------------------------------------------------------------
REPORT=$WORK/report.md
jq -rs \
    --argjson sign "$SIGN_S" --argjson verify "$VERIFY_S" \
    --argjson dbb "$KDB_BEFORE" --argjson dba "$KDB_AFTER" --argjson dbs "$KDB_STOPPED" --argjson issued "$KITH_ISSUED" \
    --argjson krss "$KITH_RSS_KB" --argjson crss "$CFSSL_RSS_KB" \
    --arg ossl "$OPENSSL_VERSION" --argjson ncpu "$(nproc)" \
    --arg rounds "$ROUNDS" --arg dur "$DURATION" --arg warm "$WARMUP" --arg conns "$CONNECTIONS" '
  def r1: (. * 10 | round) / 10;
  def r2: (. * 100 | round) / 100;
  def median: sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor]
                      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def mean: if length == 0 then null else add / length end;
  def summary($t): map(select(.target == $t)) | {
      rate: (map(.rate) | mean), rmin: (map(.rate) | min), rmax: (map(.rate) | max),
      p50: (map(.p50_ms) | median), p99: (map(.p99_ms) | median), max: (map(.max_ms) | max),
      errors: (map(.errors) | add), cpu: (map(.server_cpu_us_per_req // 0) | mean),
      client: (map((.client_cpu_s // 0) / .duration_s) | mean),
      other: (map(.other_busy_cores // 0) | max), inline: (map(.csr_inline) | add) };
  (summary("kith")) as $k | (summary("cfssl")) as $c |
  (summary("kith-pg")) as $p1 | (summary("kith-pg2")) as $p2 | (summary("kith-base")) as $b |
  (1 / (1 / $sign + 1 / $verify)) as $core |
  (1e6 / $sign + 1e6 / $verify) as $cryptous |
  "## CA issuance: kith vs cfssl\n",
  "\($rounds) round(s) x \($dur) (+\($warm) warm-up), \($conns) keep-alive connections, one request in flight each; client and server on the same \($ncpu) cores.\n",
  "| round | target | issued/s | p50 ms | p90 ms | p99 ms | max ms | errors | server CPU us/issuance | other load (cores) |",
  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  (.[] | "| \(.label) | \(.target) | \(.rate | r1) | \(.p50_ms) | \(.p90_ms) | \(.p99_ms) | \(.max_ms) | \(.errors) | \(.server_cpu_us_per_req // "?" ) | \(.other_busy_cores // "?") |"),
  "",
  "| | kith (mTLS, durable + audited) | cfssl (plain HTTP, stores nothing) | kith / cfssl |",
  "|---|---:|---:|---:|",
  "| issued/s (mean of rounds) | \($k.rate | r1) (\($k.rmin | r1)-\($k.rmax | r1)) | \($c.rate | r1) (\($c.rmin | r1)-\($c.rmax | r1)) | **\($k.rate / $c.rate | r2)x** |",
  "| p50 latency ms (median of rounds) | \($k.p50) | \($c.p50) | \($k.p50 / $c.p50 | r2)x |",
  "| p99 latency ms (median of rounds) | \($k.p99) | \($c.p99) | \($k.p99 / $c.p99 | r2)x |",
  "| max latency ms | \($k.max) | \($c.max) | |",
  "| errors | \($k.errors) | \($c.errors) | |",
  "| server CPU per issuance, us | \($k.cpu | r1) | \($c.cpu | r1) | \($k.cpu / $c.cpu | r2)x |",
  "| load generator CPU, cores | \($k.client | r2) | \($c.client | r2) | |",
  "| server peak RSS, MB | \($krss / 1024 | r1) | \($crss / 1024 | r1) | |",
  "",
  (if (map(select(.target == "kith-pg")) | length) > 0 then
    "By store (same run; PostgreSQL 15 on the same 2 cores, fsync and synchronous_commit on; server CPU counts the CA processes, not PostgreSQL):\n",
    "| store | replicas | issued/s (mean) | p50 ms | p99 ms | errors | issued/s vs cfssl | p99 < 20 ms |",
    "|---|---:|---:|---:|---:|---:|---:|---|",
    "| SQLite (embedded) | 1 | \($k.rate | r1) | \($k.p50) | \($k.p99) | \($k.errors) | \($k.rate / $c.rate | r2)x | \(if $k.p99 < 20 then "yes" else "NO" end) |",
    "| PostgreSQL | 1 | \($p1.rate | r1) | \($p1.p50) | \($p1.p99) | \($p1.errors) | \($p1.rate / $c.rate | r2)x | \(if $p1.p99 < 20 then "yes" else "NO" end) |",
    "| PostgreSQL, load split over both | 2 | \($p2.rate | r1) | \($p2.p50) | \($p2.p99) | \($p2.errors) | **\($p2.rate / $c.rate | r2)x** | \(if $p2.p99 < 20 then "yes" else "NO" end) |",
    "| cfssl (plain HTTP, stores nothing) | 1 | \($c.rate | r1) | \($c.p50) | \($c.p99) | \($c.errors) | 1x | \(if $c.p99 < 20 then "yes" else "NO" end) |",
    ""
  else empty end),
  (if (map(select(.target == "kith-base")) | length) > 0 then
    "A/B on SQLite (KITH_BASE: an older build, its rounds right after this build'"'"'s):\n",
    "| | this build | base build | this ÷ base |",
    "|---|---:|---:|---:|",
    "| issued/s (mean of rounds) | \($k.rate | r1) | \($b.rate | r1) | **\($k.rate / $b.rate | r2)x** |",
    "| p99 latency ms (median of rounds) | \($k.p99) | \($b.p99) | \($k.p99 / $b.p99 | r2)x |",
    "| server CPU per issuance, us | \($k.cpu | r1) | \($b.cpu | r1) | \($k.cpu / $b.cpu | r2)x |",
    "| errors | \($k.errors) | \($b.errors) | |",
    ""
  else empty end),
  "Crypto limit (\($ossl), `openssl speed -seconds 3 ecdsap256`, one core): sign \($sign | r1)/s, verify \($verify | r1)/s.",
  "One issuance costs about one verify (the CSR) and one sign (the certificate): \($cryptous | r1) us of crypto, so \($core | r1)/s per core, \($ncpu * $core | r1)/s on \($ncpu) cores with nothing else running (no TLS, no HTTP, no client).",
  "kith reached **\(100 * $k.rate / ($ncpu * $core) | r1) %** of that \($ncpu)-core crypto limit (cfssl \(100 * $c.rate / ($ncpu * $core) | r1) %); kith spent \($k.cpu | r1) us of server CPU per issuance, \($k.cpu / $cryptous | r2)x the crypto cost.",
  "",
  "kith database: \($dbb) B before the load, \($dba) B after it (checkpointed; \($dbs) B with the WAL as the CA left it) for \($issued) issuances: **\(($dba - $dbb) / $issued | round) B per issuance**.",
  (if $k.inline + $c.inline > 0 then "\nNote: the CSR pool ran out: \($k.inline + $c.inline) CSRs were made inside the timed loop (raise --pool-rate)." else empty end),
  (if ([$k.other, $c.other] | max) > 0.25 then "\nWarning: other work used up to \([$k.other, $c.other] | max) cores during a round: the numbers are disturbed." else empty end)
' "$RESULTS" | tee "$REPORT"

if [[ $SAVE == 1 ]]; then
    save_results ca "CA issuance benchmark" \
        "$(printf '%s ' QUICK="$QUICK" ROUNDS="$ROUNDS" DURATION="$DURATION" CONNECTIONS="$CONNECTIONS")bench/ca.sh" \
        "$(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo); kith $BUILT_FROM" \
        "$REPORT" "Raw lines (ca-load)" "$RESULTS"
fi
