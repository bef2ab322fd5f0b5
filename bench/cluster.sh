#!/usr/bin/env bash
# Cluster rows of docs/BENCHMARKS.md: ddpushd in cluster mode on a throw-away 3 + 3 Redis
# Cluster (.ci/redis-cluster.sh), measured with `ddpush-bench push`, and the single node in the
# same run for comparison. Release build; loopback only; prints one JSON object per row on
# stdout (progress on stderr).
#   usage: bench/cluster.sh [SECS]     (default 5 s per push row)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
if [ -z "${DDPUSH_TEST_REDIS_CLUSTER:-}" ]; then
  exec bash .ci/redis-cluster.sh run bash "$0" "$@"
fi
cargo build --release --locked -p ddpushd -p ddpush-bench >&2
bin=target/release/ddpushd
bench=target/release/ddpush-bench
work="$(mktemp -d -t ddpush-cbench.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
run_id="b$$"
# start NAME ARGS... : starts ddpushd, waits for its listening line, sets UDP_x PUSH_x PID_x.
start() {
  local name="$1"; shift
  "$bin" --listen 127.0.0.1:0 --push-listen 127.0.0.1:0 --admin-listen none \
    --data-dir "$work/$name" --limits false "$@" 2>"$work/$name.log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do grep -q "listening" "$work/$name.log" && break; sleep 0.1; done
  local line; line="$(grep -m1 listening "$work/$name.log")"
  eval "UDP_$name=$(sed -n 's/.* udp=\([0-9.:]*\).*/\1/p' <<<"$line")"
  eval "PUSH_$name=$(sed -n 's/.* push=\([0-9.:]*\).*/\1/p' <<<"$line")"
  eval "PID_$name=$pid"
}
cluster_args() {
  echo --cluster-redis "$DDPUSH_TEST_REDIS_CLUSTER" --node-id "$run_id-$1" --peer-listen 127.0.0.1:0
}
row() { # LABEL ddpush-bench-args...
  local label="$1"; shift
  local out; out="$("$bench" push "$@")"
  printf '{"row":"%s","result":%s}\n' "$label" "$out"
}
start single
# shellcheck disable=SC2046
start a $(cluster_args a)
# shellcheck disable=SC2046
start b $(cluster_args b)
# shellcheck disable=SC2046
start c $(cluster_args c)
for mode in "16 16 pipelined" "1 1 one-at-a-time"; do
  set -- $mode
  row "single node, $3" --udp "$UDP_single" --push "$PUSH_single" --clients 4096 --conns "$1" --window "$2" --secs "$secs" --server-pid "$PID_single"
  row "cluster, 1 node (push at the owner), $3" --udp "$UDP_a" --push "$PUSH_a" --clients 4096 --conns "$1" --window "$2" --secs "$secs" --first 100000 --server-pid "$PID_a"
  row "cluster, push at a non-owner, $3" --udp "$UDP_a" --push "$PUSH_b" --clients 4096 --conns "$1" --window "$2" --secs "$secs" --first 200000 --server-pid "$PID_b"
  # Three nodes at once, each with its own devices and pushers.
  i=0
  for n in a b c; do
    u="UDP_$n"; p="PUSH_$n"
    "$bench" push --udp "${!u}" --push "${!p}" --clients 4096 --conns "$1" --window "$2" --secs "$secs" --first $((300000 + i * 10000)) >"$work/three-$n.json" &
    i=$((i + 1))
  done
  wait_all=0
  for n in a b c; do while ! [ -s "$work/three-$n.json" ]; do sleep 0.2; wait_all=$((wait_all + 1)); [ $wait_all -lt 600 ] || break; done; done
  sleep 1
  printf '{"row":"cluster, 3 nodes at once, %s","result":[%s,%s,%s]}\n' "$3" \
    "$(cat "$work/three-a.json")" "$(cat "$work/three-b.json")" "$(cat "$work/three-c.json")"
done
# Mass re-home: 100,000 devices bound at A, then all heartbeating B (each a bind at B).
row "bind 100000 at a" --udp "$UDP_a" --push "$PUSH_a" --clients 100000 --conns 1 --window 1 --secs 0.2 --first 1000000
row "re-home 100000 from a to b" --udp "$UDP_b" --push "$PUSH_b" --clients 100000 --conns 1 --window 1 --secs 0.2 --first 1000000
# Redis memory per pending record: 0x20 pushes (24-byte payload) to 50,000 new uuids.
python3 - "$PUSH_c" "$DDPUSH_TEST_REDIS_CLUSTER" <<'PY'
import json, os, socket, subprocess, sys, time
push = sys.argv[1].rsplit(":", 1)
seeds = [s.replace("redis://", "") for s in sys.argv[2].split(",")]
def used():
    total = 0
    for s in seeds:
        h, p = s.rsplit(":", 1)
        info = subprocess.run(["redis-cli", "-h", h, "-p", p, "info"], capture_output=True, text=True).stdout
        if "role:master" in info:
            total += int([l for l in info.splitlines() if l.startswith("used_memory:")][0].split(":")[1])
    return total
n = 50000
before = used()
s = socket.create_connection((push[0], int(push[1])))
batch = 500
ok = 0
for i in range(0, n, batch):
    reqs = b"".join(bytes([1, 1, 0x20]) + os.urandom(16) + (24).to_bytes(2, "big") + os.urandom(24) for _ in range(batch))
    s.sendall(reqs)
    got = b""
    while len(got) < batch:
        got += s.recv(batch - len(got))
    ok += got.count(0)
time.sleep(1)
after = used()
print(json.dumps({"row": "redis memory per pending record", "result": {"records": n, "accepted": ok, "bytes_per_record_masters": (after - before) / n, "bytes_per_record_with_replicas": 2 * (after - before) / n}}))
PY
