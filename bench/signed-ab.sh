#!/usr/bin/env bash
# Whole-server signed/unsigned comparison of several ddpushd builds, as in docs/BENCHMARKS.md
# ("Session 8"): runs `ddpush-bench signed` once per LABEL=BINARY argument, in the order given
# (repeat and interleave labels to alternate builds), keeps each run's JSON in OUT, then pools
# the rounds of each label with bench/signed-pool.py. Run it on a machine with nothing else
# running: the bench pins ddpushd and its load generator to cores 0 and 1.
# Usage: bash bench/signed-ab.sh OUT LABEL=BINARY [LABEL=BINARY ...]
# Flags for the bench: ARGS (default the 5,000-client closed loop of the doc's table).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,8p "$0"; exit 2; }
out=$1; shift
ARGS=${ARGS:---clients 5000 --rounds 24 --warmup 1 --secs 0.5 --server-cpu 0 --client-cpu 1}
cargo build --release --locked -p ddpush-bench
bench="${CARGO_TARGET_DIR:-target}/release/ddpush-bench"
mkdir -p "$out"
declare -A files
n=0
for spec in "$@"; do
  label=${spec%%=*}; bin=${spec#*=}
  [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
  n=$((n + 1))
  f="$out/$n-$label.json"
  echo "$(date -u +%T) run $n $label, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  # shellcheck disable=SC2086 # ARGS is a list of flags
  "$bench" signed --server "$bin" $ARGS > "$f"
  files[$label]="${files[$label]:+${files[$label]},}$f"
done
pool=()
for label in "${!files[@]}"; do pool+=("$label=${files[$label]}"); done
python3 bench/signed-pool.py "${pool[@]}"
