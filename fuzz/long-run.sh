#!/usr/bin/env bash
# Long runs, one target after another, niced (used for the figures in docs/FUZZING.md).
#   bash fuzz/long-run.sh "node_ops:600 stream_decoder:600 ..."
set -u
cd "$(dirname "${BASH_SOURCE[0]}")"
export RUSTC_BOOTSTRAP=1
mkdir -p logs
for spec in ${1:-node_ops:600 stream_decoder:600 push_request:600 node_status:600 device_packet:600}; do
  t="${spec%%:*}"; s="${spec##*:}"
  echo "$(date -u +%FT%TZ) start $t ${s}s" >> logs/long-run.log
  nice -n 10 cargo fuzz run --sanitizer none "$t" -- -max_total_time="$s" -print_final_stats=1 > "logs/$t.log" 2>&1
  echo "$(date -u +%FT%TZ) end $t rc=$?" >> logs/long-run.log
done
