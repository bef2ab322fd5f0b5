#!/usr/bin/env bash
# Reproduces docs/BENCHMARKS.md: builds release binaries, runs the whole suite against the real
# ddpushd (1,000,000 clients at the largest step; about 3 minutes) and rewrites the generated
# part of the doc and its charts. Usage: bash bench/run.sh [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p ddpushd -p ddpush-bench
target="${CARGO_TARGET_DIR:-target}/release"
mkdir -p docs/bench
stamp="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
out="docs/bench/results.json"
cmd="bash bench/run.sh $*"
"$target/ddpush-bench" suite --server "$target/ddpushd" "$@" | tee "$out.tmp"
"$target/ddpush-bench" check --in "$out.tmp"
mv "$out.tmp" "$out"
"$target/ddpush-bench" report --in "$out" --doc docs/BENCHMARKS.md --charts docs/bench \
  --command "$cmd" --date "$stamp"
echo "wrote docs/BENCHMARKS.md and docs/bench/{latency,memory}.svg"
