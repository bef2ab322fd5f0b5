#!/usr/bin/env bash
# Short fuzzing smoke run for CI: every target for ${FUZZ_SECONDS:-20} s.
#   bash fuzz/smoke.sh            (from anywhere)
# Installs cargo-fuzz if missing, seeds the corpora from the golden vectors, builds, replays
# every saved regression input, then fuzzes each target. Exits non-zero if any target fails.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
secs="${FUZZ_SECONDS:-20}"
targets=(device_packet push_request stream_decoder node_status snapshot journal node_ops signed_ops)
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "smoke: installing cargo-fuzz"
  cargo install cargo-fuzz --locked || exit 1
fi
bash "$here/seed-corpus.sh" || exit 1
cargo fuzz build --sanitizer none || { echo "smoke: build failed" >&2; exit 1; }

failed=()
for t in "${targets[@]}"; do
  # Saved crash inputs first: a fixed bug must stay fixed.
  # (`<name>.ops` files are the readable operation lists the inputs are built from.)
  mapfile -t saved < <(find "regressions/$t" -type f ! -name '*.ops' 2>/dev/null | sort)
  if [ ${#saved[@]} -gt 0 ]; then
    if ! cargo fuzz run --sanitizer none "$t" "${saved[@]}" >"/tmp/fuzz-smoke-$t-regr.log" 2>&1; then
      echo "smoke: $t: a saved regression input fails again" >&2
      tail -n 30 "/tmp/fuzz-smoke-$t-regr.log" >&2
      failed+=("$t(regression)")
      continue
    fi
  fi
  echo "smoke: fuzzing $t for $secs s"
  if ! cargo fuzz run --sanitizer none "$t" -- -max_total_time="$secs" >"/tmp/fuzz-smoke-$t.log" 2>&1; then
    echo "smoke: $t FAILED; input saved under fuzz/artifacts/$t/" >&2
    grep -E "panicked|ERROR|Test unit" "/tmp/fuzz-smoke-$t.log" >&2
    tail -n 30 "/tmp/fuzz-smoke-$t.log" >&2
    failed+=("$t")
  else
    grep -E "^Done|#[0-9]+.*(DONE|pulse)" "/tmp/fuzz-smoke-$t.log" | tail -n 1
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "smoke: failed targets: ${failed[*]}" >&2
  exit 1
fi
echo "smoke: all ${#targets[@]} targets passed (${secs} s each)"
