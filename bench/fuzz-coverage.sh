#!/usr/bin/env bash
# Source coverage the committed fuzz corpus reaches, per target: `cargo fuzz coverage` replays
# fuzz/corpus/<target>/ through a coverage-instrumented build, then `llvm-cov report` sums the
# regions, functions and lines of kith's own code (the workspace's crates, not dependencies).
#
#   bench/fuzz-coverage.sh                  # every target
#   TARGETS="csr policy" bench/fuzz-coverage.sh
#
# Needs cargo-fuzz, a nightly toolchain and its llvm-tools component (`rustup component add
# llvm-tools-preview --toolchain nightly`). The first build instruments the whole dependency
# graph (about 10 minutes on 2 cores); later targets reuse it. Prints one line per target and a
# per-file report to fuzz/coverage/<target>/report.txt (not committed).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT/fuzz"

HOST=$(rustc +nightly -vV | sed -n 's/^host: //p')
SYSROOT=$(rustc +nightly --print sysroot)
LLVM_COV=$SYSROOT/lib/rustlib/$HOST/bin/llvm-cov
[[ -x $LLVM_COV ]] || {
    echo "error: $LLVM_COV missing: rustup component add llvm-tools-preview --toolchain nightly" >&2
    exit 1
}
if [[ -n ${TARGETS:-} ]]; then
    read -r -a LIST <<<"$TARGETS"
else
    mapfile -t LIST < <(cargo +nightly fuzz list)
fi

# Only the workspace's own sources count: dependencies, the standard library and the fuzz
# targets' own harness code are left out of the sums.
IGNORE='(\.cargo/registry|/rustc/|\.rustup/|/fuzz/fuzz_targets/|/fuzz/src/)'

# The file(s) holding the parser each target is aimed at: their line coverage is printed on its
# own, since the totals also count every other function linked into the target. Some of these
# files hold more than the parser (capture.rs also runs iptables, tls.rs builds every TLS
# config, k8s.rs also fetches keys from the API server), so 100% is not the goal there.
declare -A FOCUS=(
    [admission_review]=inject/src/review.rs
    [authority_shim]="agent/src/workload_api/authority_shim.rs agent/src/workload_api/hpack.rs"
    [authority_structured]="agent/src/workload_api/authority_shim.rs agent/src/workload_api/hpack.rs"
    [bundle]=identity/src/bundle.rs
    [csr]=ca/src/csr.rs
    [csr_structured]=ca/src/csr.rs
    [first_bytes]=proxy/src/tls.rs
    [iptables_save]=sidecar/src/capture.rs
    [jwt_structured]=identity/src/jwt.rs
    [jwt_svid]=identity/src/jwt.rs
    [k8s_jwks]=ca/src/k8s.rs
    [k8s_token]=ca/src/k8s.rs
    [policy]=proxy/src/authz.rs
    [spiffe_id]=identity/src/spiffe_id.rs
    [tunnel_config]=sidecar/src/tunnel_config.rs
)

printf '%-22s %8s %17s %17s %17s   %s\n' target inputs regions functions lines "lines of the parser's file"
for t in "${LIST[@]}"; do
    inputs=$(find "corpus/$t" -type f | wc -l)
    nice -n 10 cargo +nightly fuzz coverage --sanitizer none "$t" "corpus/$t" \
        >"/tmp/kith-fuzz-coverage-$t.log" 2>&1 || {
        echo "error: cargo fuzz coverage $t failed; last lines:" >&2
        tail -20 "/tmp/kith-fuzz-coverage-$t.log" >&2
        exit 1
    }
    bin=target/$HOST/coverage/$HOST/release/$t
    profdata=coverage/$t/coverage.profdata
    mkdir -p "coverage/$t"
    "$LLVM_COV" report "$bin" -instr-profile="$profdata" -ignore-filename-regex="$IGNORE" \
        >"coverage/$t/report.txt"
    # TOTAL  regions missed cover  functions missed executed  lines missed cover ...
    focus=${FOCUS[$t]:-}
    awk -v t="$t" -v n="$inputs" -v f="$focus" '
        BEGIN { nf = split(f, files, " ") }
        { for (i = 1; i <= nf; i++) if (index($1, files[i])) {
            fl = fl (fl == "" ? "" : ", ") ($8 - $9) "/" $8 " " $10 " " files[i] } }
        /^TOTAL/ { total = sprintf("%-22s %8d %17s %17s %17s", t, n, \
            ($2 - $3) "/" $2 " " $4, ($5 - $6) "/" $5 " " $7, ($8 - $9) "/" $8 " " $10) }
        END { printf "%s   %s\n", total, fl }' "coverage/$t/report.txt"
done
