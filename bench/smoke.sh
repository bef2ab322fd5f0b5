#!/usr/bin/env bash
# CI smoke test of the load generator and the benchmark suite: a tiny configuration against a
# real ddpushd on ephemeral loopback ports. It checks that every figure comes out as JSON; it
# asserts nothing about speed (benchmarks are never timed tests).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${BENCH_PROFILE:-debug}"
flag=()
[ "$profile" = release ] && flag=(--release)
cargo build "${flag[@]}" --locked -p ddpushd -p ddpush-bench
target="${CARGO_TARGET_DIR:-target}/$profile"
out="$(mktemp)"
work="$(mktemp -d)"
trap 'rm -rf "$out" "$work"' EXIT
timeout 120 "$target/ddpush-bench" suite --smoke --server "$target/ddpushd" --work-dir "$work" >"$out"
"$target/ddpush-bench" check --in "$out"
echo "bench smoke: ok ($(wc -c <"$out") bytes of JSON)"
