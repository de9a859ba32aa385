#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a given time and prints, per target, the executions, the
# coverage libFuzzer reached (cov: edges, ft: features) and the findings (crash, leak, timeout
# or OOM inputs written to fuzz/artifacts/<target>/).
#
#   bench/fuzz.sh [SECONDS-PER-TARGET]      # default 60
#
# Environment:
#   TARGETS="a b"  only these targets (default: all of `cargo fuzz list`)
#   JOBS=2         targets run at a time (default 1; the machine is shared: at most 2)
#   SMOKE=1        CI mode: an unoptimised build (--dev), a short run from the committed corpus
#                  only, nothing written back
#   RSS_LIMIT_MB   libFuzzer's -rss_limit_mb (default 2048); TIMEOUT libFuzzer's -timeout (10 s)
#   BUILD_ONLY=1   install cargo-fuzz if missing and build, then stop (CI builds while tests run)
#
# Each target starts from fuzz/corpus/<target>/ (committed, minimized) and, outside SMOKE, adds
# what it finds to fuzz/work/<target>/ (not committed; `cargo fuzz cmin` it into the corpus).
# Builds once with `cargo fuzz build --sanitizer none` (the workspace forbids unsafe code, so
# AddressSanitizer would find nothing that a Rust panic does not already report, at half the
# speed). Needs cargo-fuzz (installed if missing) and a nightly toolchain; without one it uses
# the stable toolchain with RUSTC_BOOTSTRAP=1 and says so. Exit status 1 if anything was found.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT/fuzz"
SECONDS_PER_TARGET=${1:-60}
JOBS=${JOBS:-1}
SMOKE=${SMOKE:-0}
RSS_LIMIT_MB=${RSS_LIMIT_MB:-2048}
TIMEOUT=${TIMEOUT:-10}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== cargo-fuzz missing: cargo install cargo-fuzz --locked" >&2
    cargo install cargo-fuzz --locked >&2
fi
TOOLCHAIN=()
if cargo +nightly --version >/dev/null 2>&1; then
    TOOLCHAIN=(+nightly)
    echo "== toolchain: $(cargo +nightly --version)" >&2
else
    # cargo-fuzz passes nightly-only rustc flags; RUSTC_BOOTSTRAP=1 lets stable accept them.
    export RUSTC_BOOTSTRAP=1
    echo "== toolchain: no nightly installed; using $(cargo --version) with RUSTC_BOOTSTRAP=1" >&2
fi
fuzz() { cargo "${TOOLCHAIN[@]}" fuzz "$@"; }

if [[ -n ${TARGETS:-} ]]; then
    read -r -a LIST <<<"$TARGETS"
else
    mapfile -t LIST < <(fuzz list)
fi
# SMOKE builds without optimisation (--dev): a few seconds per target only prove that each
# builds and runs its corpus, and an optimised build of the whole dependency tree costs CI minutes.
PROFILE=release
BUILD=(--sanitizer none)
if [[ $SMOKE == 1 ]]; then
    PROFILE=debug
    BUILD+=(--dev)
fi
echo "== building ${#LIST[@]} targets (cargo fuzz build ${BUILD[*]})" >&2
START=$(date +%s)
fuzz build "${BUILD[@]}" >&2
echo "== built in $(($(date +%s) - START)) s" >&2
if [[ ${BUILD_ONLY:-0} == 1 ]]; then
    exit 0
fi
BIN_DIR=target/$(rustc "${TOOLCHAIN[@]}" -vV | sed -n 's/^host: //p')/$PROFILE

LOGS=$(mktemp -d /tmp/kith-fuzz.XXXXXX)
trap 'rm -rf "$LOGS"' EXIT
run_one() {
    local t=$1 corpus=()
    mkdir -p "corpus/$t" "artifacts/$t"
    if [[ $SMOKE == 1 ]]; then
        # Read-only: a scratch dir first (where libFuzzer writes), the committed corpus second.
        mkdir -p "$LOGS/$t.new"
        corpus=("$LOGS/$t.new" "corpus/$t")
    else
        mkdir -p "work/$t"
        corpus=("work/$t" "corpus/$t")
    fi
    local before
    before=$(find "artifacts/$t" -type f | wc -l)
    set +e
    nice -n 10 "$BIN_DIR/$t" "${corpus[@]}" -max_total_time="$SECONDS_PER_TARGET" \
        -rss_limit_mb="$RSS_LIMIT_MB" -timeout="$TIMEOUT" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$LOGS/$t.log" 2>&1
    echo $? >"$LOGS/$t.rc"
    set -e
    echo $(($(find "artifacts/$t" -type f | wc -l) - before)) >"$LOGS/$t.found"
}

running=0
for t in "${LIST[@]}"; do
    echo "== $t: ${SECONDS_PER_TARGET} s" >&2
    run_one "$t" &
    running=$((running + 1))
    if ((running >= JOBS)); then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

STATUS=0
printf '\n%-22s %12s %9s %9s %9s %s\n' target executions exec/s cov ft findings
for t in "${LIST[@]}"; do
    log=$LOGS/$t.log
    execs=$(awk '/stat::number_of_executed_units/ { print $2 }' "$log" | tail -1)
    rate=$(awk '/stat::average_exec_per_sec/ { print $2 }' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{ print $2 }')
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | awk '{ print $2 }')
    found=$(cat "$LOGS/$t.found")
    rc=$(cat "$LOGS/$t.rc")
    what=$found
    if [[ $rc != 0 || $found != 0 ]]; then
        STATUS=1
        what="$found (exit $rc; $(grep -m1 -oE 'ERROR: libFuzzer: [a-z-]+|panicked at [^,]*' "$log" || echo "see log"))"
        echo "---- $t: last lines of the libFuzzer log" >&2
        tail -25 "$log" >&2
    fi
    printf '%-22s %12s %9s %9s %9s %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$what"
done
exit $STATUS
