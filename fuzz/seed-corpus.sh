#!/usr/bin/env bash
# Writes the seed corpora of every fuzz target from the golden vectors.
#   bash fuzz/seed-corpus.sh [path/to/golden-vectors.json]
# Default vectors: proto-core/tests/data/golden-vectors.json in this repository; the signed
# (version 2) vectors come from signed-vectors.json beside it.
# fuzz/corpus/ is gitignored; this script recreates the seed files (it never deletes what
# the fuzzer added, so it is safe to run before every session).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
gv="${1:-$root/proto-core/tests/data/golden-vectors.json}"
sv="$(dirname "$gv")/signed-vectors.json"
[ -f "$gv" ] || { echo "seed-corpus: $gv not found" >&2; exit 1; }
[ -f "$sv" ] || { echo "seed-corpus: $sv not found" >&2; exit 1; }
command -v jq >/dev/null || { echo "seed-corpus: jq is required" >&2; exit 1; }
command -v xxd >/dev/null || { echo "seed-corpus: xxd is required" >&2; exit 1; }

c="$here/corpus"
mkdir -p "$c"/{device_packet,push_request,stream_decoder,node_ops,node_status,snapshot,journal,signed_ops}

# put TARGET NAME HEX: writes one seed file.
put() { printf '%s' "$3" | xxd -r -p > "$c/$1/seed-$2"; }

dev=$(jq -r '.device_to_server[] | "\(.name) \(.hex)"' "$gv")
push=$(jq -r '.push_requests[] | "\(.name) \(.hex)"' "$gv")
down=$(jq -r '(.server_to_device_immediate[], .server_to_device_on_heartbeat_app_1[]) | "\(.name) \(.hex)"' "$gv")
tcp=$(jq -r '.tcp_stream_on_heartbeat_app_1' "$gv")
ns=$(jq -r '.node_status_record_example.hex' "$gv")

all_dev=""; all_push=""
while read -r name hex; do
  put device_packet "dev-$name" "$hex"
  put node_ops "dev-$name" "$hex"
  all_dev+="$hex"
done <<< "$dev"
while read -r name hex; do
  put device_packet "push-$name" "$hex"
  put push_request "$name" "00$hex"          # selector 00: max content 500
  put push_request "small-max-$name" "c8$hex" # selector 200: max content 1
  put node_ops "push-$name" "$hex"
  all_push+="$hex"
done <<< "$push"
while read -r name hex; do
  put device_packet "down-$name" "$hex"
done <<< "$down"
put device_packet down-tcp-stream "$tcp"

# Pipelined requests on one connection (the 501-byte header last closes it).
put push_request pipelined "00$all_push"
# stream_decoder: [max selector][split count][split lengths...][stream]
put stream_decoder device-whole "0000$all_dev"
put stream_decoder device-split "0003051501$all_dev"
put stream_decoder push-whole "0000$all_push"
put stream_decoder push-split "8004011408ff$all_push"
put node_ops all-device "$all_dev"
put node_ops all-push "$all_push"

# Signed devices (PROTOCOL.md 9): every signed vector, valid and dropped, both directions;
# device streams mixing v1 and v2 frames, whole and split inside a trailer.
sdev=$(jq -r '(.device_to_server[], .device_to_server_dropped_at_ts[], .device_to_server_accepted_drift[]) | "\(.name) \(.hex)"' "$sv")
sdown=$(jq -r '.server_to_device[] | "\(.name) \(.hex)"' "$sv")
while read -r name hex; do
  put device_packet "signed-$name" "$hex"
  put node_ops "signed-$name" "$hex"
  put signed_ops "signed-$name" "$hex"
  put stream_decoder "signed-$name" "0000$hex"
done <<< "$sdev"
while read -r name hex; do
  put device_packet "signed-down-$name" "$hex"
done <<< "$sdown"
all_signed=$(jq -r '[.device_to_server[].hex] | join("")' "$sv")
put stream_decoder signed-whole "0000$all_signed"
put stream_decoder signed-mixed "0000${all_signed:0:92}$all_dev${all_signed:92}"
put stream_decoder signed-split "00042e1a0119$all_signed$all_dev"

# nodeStatus.dat: the example record, the same with a 5-byte payload, both back to back,
# and a truncated tail.
with_payload="${ns:0:130}00000005${ns:138:16}68656c6c6f"
put node_status example "$ns"
put node_status with-payload "$with_payload"
put node_status two-records "$ns$with_payload"
put node_status truncated "$ns${with_payload:0:100}"

# snapshot / journal: mode byte 00 = raw file, 01 = arbitrary records/changes written by the
# server's own writer and then damaged. Raw seeds: bare headers (an empty journal is valid);
# structured seeds: golden-vector bytes read as arbitrary input.
put snapshot raw-header-only "00$(printf DDPUSHSN | xxd -p)00000001"
put journal raw-empty "00$(printf DDPUSHJN | xxd -p)000000010000000000000007"
put journal raw-short-header "00$(printf DDPUSHJN | xxd -p)0000"
while read -r name hex; do
  put snapshot "structured-$name" "01$hex"
  put journal "structured-$name" "01$hex"
done <<< "$dev"
put snapshot structured-push "01$all_push"
put journal structured-push "01$all_push"
put snapshot structured-node-status "01$ns"
put journal structured-node-status "01$ns"

echo "seed-corpus: wrote $(find "$c" -name 'seed-*' | wc -l) seed files under $c"
