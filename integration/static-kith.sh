#!/usr/bin/env bash
# The static `kith` that the Docker tests put in their `FROM scratch` images, built the way the
# README builds it (`RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target
# <host>`) but with the release profile's optimisation turned off through cargo's own
# CARGO_PROFILE_RELEASE_* variables, into a target directory of its own (target/static-test).
#
# What the tests need from this binary is that it is static and runs in an image with no libc,
# which the profile does not change; what they avoid is the release profile's fat LTO with one
# codegen unit (about 5.5 minutes of a 2-core machine, against 2 for this build). The directory
# of its own keeps an operator's optimised target/<host>/release/kith from being replaced.
#
# integration::static_build runs this script (the one place the build is written down), so a
# run of it beforehand, as .ci/run does beside the tests, leaves the tests a fresh build.
# Arguments go to `cargo build` (the tests add --message-format). Lowest CPU priority: the tests
# that run beside this build wait on child processes and deadlines, and get the cores first.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HOST=$(rustc -vV | sed -n 's/^host: //p')
# Static glibc needs the explicit --target: without it the flag also hits proc-macros and build
# scripts, which cannot be static.
unset CARGO_ENCODED_RUSTFLAGS
export RUSTFLAGS="-C target-feature=+crt-static"
export CARGO_TARGET_DIR=$ROOT/target/static-test
export CARGO_PROFILE_RELEASE_OPT_LEVEL=0
export CARGO_PROFILE_RELEASE_LTO=off
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256
export CARGO_PROFILE_RELEASE_DEBUG=false
exec nice -n 19 "${CARGO:-cargo}" build --release --bin kith --target "$HOST" "$@"
