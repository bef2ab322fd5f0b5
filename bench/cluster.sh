#!/usr/bin/env bash
# Cluster rows of docs/BENCHMARKS.md: ddpushd in cluster mode on a throw-away 3 + 3 Redis
# Cluster (.ci/redis-cluster.sh), measured with `ddpush-bench push`, and the single node in the
# same run for comparison. Release build; loopback only; prints one JSON object per row on
# stdout (progress on stderr). Push rows carry "ff": the nodes' own split of their 0xFF
# answers during the row (WAIT missed its replicas / store time-out or error); the bench's
# "failed" is their sum as the pushers saw it.
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
# start NAME ARGS... : starts ddpushd, waits for its listening line, sets UDP_x PUSH_x ADMIN_x
# PID_x.
start() {
  local name="$1"; shift
  "$bin" --listen 127.0.0.1:0 --push-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --data-dir "$work/$name" --limits false "$@" 2>"$work/$name.log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do grep -q "listening" "$work/$name.log" && break; sleep 0.1; done
  local line; line="$(grep -m1 listening "$work/$name.log")"
  eval "UDP_$name=$(sed -n 's/.* udp=\([0-9.:]*\).*/\1/p' <<<"$line")"
  eval "PUSH_$name=$(sed -n 's/.* push=\([0-9.:]*\).*/\1/p' <<<"$line")"
  eval "ADMIN_$name=$(sed -n 's/.* admin=\([0-9.:]*\).*/\1/p' <<<"$line")"
  eval "PID_$name=$pid"
}
cluster_args() {
  echo --cluster-redis "$DDPUSH_TEST_REDIS_CLUSTER" --node-id "$run_id-$1" --peer-listen 127.0.0.1:0
}
# ff_of ADMIN... : the 0xFF answers the cluster nodes gave so far, summed, as JSON: those whose
# WAIT missed its replicas and those the store failed (time-out or error); /status splits them.
ff_of() {
  local a
  for a in "$@"; do curl -s "http://$a/status"; echo; done | python3 -c '
import json, sys
w = s = 0
for line in sys.stdin:
    if line.strip():
        p = json.loads(line)["pushes"]
        w += p["failed_wait"]; s += p["failed_store"]
print(json.dumps({"wait_replicas": w, "store": s}))'
}
# ff_delta BEFORE AFTER : AFTER - BEFORE of two ff_of objects.
ff_delta() {
  python3 -c 'import json, sys; b, a = (json.loads(x) for x in sys.argv[1:3]); print(json.dumps({k: a[k] - b[k] for k in a}))' "$1" "$2"
}
row() { # LABEL "ADMIN..." ddpush-bench-args... (ADMIN: the cluster nodes pushed at; "" for none)
  local label="$1" at="$2"; shift 2
  local before out ff='null'
  # shellcheck disable=SC2086
  [ -z "$at" ] || before="$(ff_of $at)"
  out="$("$bench" push "$@")"
  # shellcheck disable=SC2086
  [ -z "$at" ] || ff="$(ff_delta "$before" "$(ff_of $at)")"
  printf '{"row":"%s","ff":%s,"result":%s}\n' "$label" "$ff" "$out"
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
  row "single node, $3" "" --udp "$UDP_single" --push "$PUSH_single" --clients 4096 --conns "$1" --window "$2" --secs "$secs" --server-pid "$PID_single"
  row "cluster, 1 node (push at the owner), $3" "$ADMIN_a" --udp "$UDP_a" --push "$PUSH_a" --clients 4096 --conns "$1" --window "$2" --secs "$secs" --first 100000 --server-pid "$PID_a"
  row "cluster, push at a non-owner, $3" "$ADMIN_b" --udp "$UDP_a" --push "$PUSH_b" --clients 4096 --conns "$1" --window "$2" --secs "$secs" --first 200000 --server-pid "$PID_b"
  # Three nodes at once, each with its own devices and pushers.
  i=0
  gens=()
  ff0="$(ff_of "$ADMIN_a" "$ADMIN_b" "$ADMIN_c")"
  for n in a b c; do
    u="UDP_$n"; p="PUSH_$n"
    "$bench" push --udp "${!u}" --push "${!p}" --clients 4096 --conns "$1" --window "$2" --secs "$secs" --first $((300000 + i * 10000)) >"$work/three-$n.json" &
    gens+=("$!")
    i=$((i + 1))
  done
  wait "${gens[@]}"
  ff="$(ff_delta "$ff0" "$(ff_of "$ADMIN_a" "$ADMIN_b" "$ADMIN_c")")"
  printf '{"row":"cluster, 3 nodes at once, %s","ff":%s,"result":[%s,%s,%s]}\n' "$3" "$ff" \
    "$(cat "$work/three-a.json")" "$(cat "$work/three-b.json")" "$(cat "$work/three-c.json")"
done
# Redis memory: INFO used_memory summed over the masters (replicas hold as much again).
used_memory() {
  local total=0 a h p info
  for a in ${DDPUSH_TEST_REDIS_CLUSTER//,/ }; do
    a="${a#redis://}"; h="${a%:*}"; p="${a##*:}"
    info="$(redis-cli -h "$h" -p "$p" info)"
    if grep -q '^role:master' <<<"$info"; then
      total=$((total + $(sed -n 's/^used_memory:\([0-9]*\).*/\1/p' <<<"$info")))
    fi
  done
  echo "$total"
}
binds_of() { curl -s "http://$1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["binds"])'; }
rss_of() { awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$1/status"; }
owned_of() { curl -s "http://$1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["owned"])'; }

# Mass re-home: REHOME_DEVICES (100,000) devices bound at node r1 (first contact: a bind each,
# a new record each), r1 killed with -9, then every device heartbeats a survivor (half r2,
# half r3: a bind each, moving the owner and marking the uuid dirty for r1). Fresh nodes that
# answer every heartbeat (--heartbeat-reply always), so the load generator sees each bind
# come back; each device sends one heartbeat (ddpush-bench --register: at most 1,024
# unanswered per generator). binds/s is the nodes' own `binds` counter over the wall time.
rehome_n="${REHOME_DEVICES:-100000}"
half=$((rehome_n / 2))
for n in r1 r2 r3; do
  # shellcheck disable=SC2046
  start "$n" $(cluster_args "$n") --heartbeat-reply always
done
m0="$(used_memory)"
rss0="$(rss_of "$PID_r1")"
"$bench" heartbeat --target "$UDP_r1" --clients "$rehome_n" --first 1000000 --register --secs 0.1 >"$work/bind.json"
b1="$(binds_of "$ADMIN_r1")"
sleep 1
m1="$(used_memory)"
# A node's own memory per client it serves: r1's RSS growth over the devices it now owns.
rss1="$(rss_of "$PID_r1")"
o1="$(owned_of "$ADMIN_r1")"
printf '{"row":"node memory per owned client (RSS growth)","result":{"owned":%s,"rss_before":%s,"rss_after":%s,"bytes_per_client":%s}}\n' \
  "$o1" "$rss0" "$rss1" "$(python3 -c "print(($rss1 - $rss0) / max($o1, 1))")"
kill -9 "$PID_r1"
b2="$(binds_of "$ADMIN_r2")"; b3="$(binds_of "$ADMIN_r3")"
t0="$(date +%s.%N)"
"$bench" heartbeat --target "$UDP_r2" --clients "$half" --first 1000000 --register --secs 0.1 >"$work/rehome-r2.json" &
g2=$!
"$bench" heartbeat --target "$UDP_r3" --clients "$((rehome_n - half))" --first $((1000000 + half)) --register --secs 0.1 >"$work/rehome-r3.json" &
g3=$!
wait "$g2" "$g3"
t1="$(date +%s.%N)"
a2="$(binds_of "$ADMIN_r2")"; a3="$(binds_of "$ADMIN_r3")"
sleep 1
m2="$(used_memory)"
curl -s "http://$ADMIN_r2/status" >"$work/r2-status.json"
python3 - "$work" "$b1" "$b2" "$b3" "$a2" "$a3" "$t0" "$t1" "$m0" "$m1" "$m2" <<'PY'
import json, sys
w = sys.argv[1]
b1, b2, b3, a2, a3 = (int(x) for x in sys.argv[2:7])
t0, t1 = float(sys.argv[7]), float(sys.argv[8])
m0, m1, m2 = (int(x) for x in sys.argv[9:12])
bind = json.load(open(f"{w}/bind.json"))["register"]
gens = [json.load(open(f"{w}/rehome-{n}.json"))["register"] for n in ("r2", "r3")]
st = json.load(open(f"{w}/r2-status.json"))
print(json.dumps({"row": "bind, first contact at one node", "result": {
    "devices": bind["sent"], "binds": b1, "secs": bind["secs"], "binds_per_s": b1 / bind["secs"]}}))
rehomed = (a2 - b2) + (a3 - b3)
print(json.dumps({"row": "mass re-home after kill -9, two survivors", "result": {
    "devices": sum(g["sent"] for g in gens), "answered": sum(g["answered"] for g in gens),
    "binds": rehomed, "secs": t1 - t0, "binds_per_s": rehomed / (t1 - t0),
    "per_generator": gens, "store_at_r2": st["store"]}}))
print(json.dumps({"row": "redis memory per bound record, nothing pending", "result": {
    "records": b1, "bytes_per_record_masters": (m1 - m0) / max(b1, 1)}}))
print(json.dumps({"row": "redis memory per dirty mark (re-home marks for the dead node)", "result": {
    "marks": rehomed, "bytes_per_mark_masters": (m2 - m1) / max(rehomed, 1)}}))
PY
# Redis memory per pending record: 0x20 pushes (24-byte payload) to MEMORY_RECORDS new uuids
# with no owner (so no dirty mark), 500 pipelined at a time; only accepted pushes count.
mem_n="${MEMORY_RECORDS:-100000}"
m3="$(used_memory)"
accepted="$(python3 - "$PUSH_c" "$mem_n" <<'PY'
import os, socket, sys
push = sys.argv[1].rsplit(":", 1)
n = int(sys.argv[2])
s = socket.create_connection((push[0], int(push[1])))
batch, ok = 500, 0
for i in range(0, n, batch):
    reqs = b"".join(bytes([1, 1, 0x20]) + os.urandom(16) + (24).to_bytes(2, "big") + os.urandom(24) for _ in range(batch))
    s.sendall(reqs)
    got = b""
    while len(got) < batch:
        got += s.recv(batch - len(got))
    ok += got.count(0)
print(ok)
PY
)"
sleep 1
m4="$(used_memory)"
printf '{"row":"redis memory per pending record","result":{"pushed":%s,"accepted":%s,"bytes_per_record_masters":%s}}\n' \
  "$mem_n" "$accepted" "$(python3 -c "print(($m4 - $m3) / max($accepted, 1))")"
