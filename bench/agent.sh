#!/usr/bin/env bash
# kith agent: first FetchX509SVID latency for new callers, and memory idle and with 1,000 open
# Workload API streams, against the targets of the agent issue (p99 < 50 ms with the CA on the
# same machine; RSS < 64 MiB with 1,000 streams; idle RSS < 16 MiB). One run:
#   bench/agent.sh            # SAVE=1 also writes bench/results/agent-<date>.md
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
echo "== building (cargo build --release -j2 -p kith -p kith-bench)" >&2
cargo build --release -j2 -p kith -p kith-bench >&2
KITH=$TARGET_DIR/release/kith
LOAD=$TARGET_DIR/release/wapi-load
WORK=$(mktemp -d /tmp/kith-bench-agent.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ ${KEEP:-0} == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

export KITH_CA_KEK=$(openssl rand -base64 32)
CPORT=$(free_port)
"$KITH" ca serve --data-dir "$WORK/ca" --listen "127.0.0.1:$CPORT" --metrics-listen "127.0.0.1:$(free_port)" >"$WORK/ca.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do [[ -S $WORK/ca/admin.sock ]] && break; sleep 0.1; done
TOKEN_JSON=$("$KITH" ca token create --name bench-host --data-dir "$WORK/ca" --json)
"$KITH" ca entry create --id spiffe://example.org/bench/w --parent spiffe://example.org/kith/node/bench-host \
    --selector "unix:uid:$(id -u)" --data-dir "$WORK/ca" >/dev/null
SOCK=$WORK/run/agent.sock
# The join token in the environment, never in argv (kith agent refuses --join-token).
KITH_JOIN_TOKEN="$(jq -r .token <<<"$TOKEN_JSON")" \
    "$KITH" agent run --ca "https://127.0.0.1:$CPORT" --data-dir "$WORK/agent" --socket "$SOCK" \
    --admin-listen "127.0.0.1:$(free_port)" \
    --bundle-sha256 "$(jq -r .bundle_sha256 <<<"$TOKEN_JSON")" \
    >"$WORK/agent.log" 2>&1 &
APID=$!
PIDS+=("$APID")
# Ready when a caller gets its SVID.
"$LOAD" --mode first-fetch --socket "$SOCK" --count 1 >/dev/null 2>&1 || sleep 1
for _ in $(seq 1 100); do
    out=$("$LOAD" --mode first-fetch --socket "$SOCK" --count 1 2>/dev/null || true)
    [[ $(jq -r .errors <<<"${out:-{\}}" 2>/dev/null) == 0 ]] && break
    sleep 0.2
done
sleep 3
IDLE_KIB=$(rss "$APID")
echo "== first FetchX509SVID for new callers" >&2
SEQ=$("$LOAD" --mode first-fetch --socket "$SOCK" --count 500 --concurrency 1)
CONC=$("$LOAD" --mode first-fetch --socket "$SOCK" --count 500 --concurrency 16)
echo "== 1,000 open streams" >&2
STREAMS=$("$LOAD" --mode streams --socket "$SOCK" --streams 1000 --per-connection 50 --hold 5s --agent-pid "$APID")
echo "$SEQ"; echo "$CONC"; echo "$STREAMS"
python3 - "$IDLE_KIB" "$SEQ" "$CONC" "$STREAMS" <<'PY' | tee "$WORK/summary.md"
import json, sys
idle = int(sys.argv[1]); seq, conc, st = (json.loads(a) for a in sys.argv[2:5])
with_streams = st["agent_rss_kib_with_streams"]
def ok(v, lim): return "yes" if v < lim else "NO"
print("## kith agent: Workload API latency and memory\n")
print("| measure | result | target | met |")
print("|---|---:|---:|---|")
print(f"| first FetchX509SVID, new caller, one at a time: p50 / p99 / max | {seq['p50_ms']:.2f} / {seq['p99_ms']:.2f} / {seq['max_ms']:.2f} ms ({seq['callers']} callers, {seq['errors']} errors) | p99 < 50 ms | {ok(seq['p99_ms'], 50)} |")
print(f"| same, 16 callers at once: p50 / p99 / max | {conc['p50_ms']:.2f} / {conc['p99_ms']:.2f} / {conc['max_ms']:.2f} ms ({conc['errors']} errors) | p99 < 50 ms | {ok(conc['p99_ms'], 50)} |")
print(f"| agent RSS idle (1 entry, node + workload SVID held) | {idle/1024:.1f} MiB | < 16 MiB | {ok(idle/1024, 16)} |")
print(f"| agent RSS with {st['streams']} open FetchX509SVID streams ({st['connections']} connections) | {with_streams/1024:.1f} MiB | < 64 MiB | {ok(with_streams/1024, 64)} |")
print(f"\nStreams opened in {st['open_s']:.2f} s. CA and agent on the same 2 cores.")
PY
if [[ ${SAVE:-0} == 1 ]]; then
    mkdir -p bench/results
    cp "$WORK/summary.md" "bench/results/agent-$(date +%F).md"
fi
