#!/usr/bin/env bash
# A local 3-node ddpushd cluster on a throw-away Redis Cluster (3 masters + 3 replicas), for
# trying cluster mode on one machine. Everything listens on loopback:
#   node a: devices 127.0.0.1:9966 (UDP+TCP), pushes 127.0.0.1:9999, admin 127.0.0.1:9900
#   node b: 9976 / 10009 / 9910       node c: 9986 / 10019 / 9920
# Ctrl-C stops the three nodes and the Redis servers (each by its PID).
#   usage: deploy/cluster-demo.sh [path/to/ddpushd]   (default: target/release/ddpushd)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/ddpushd}"
[ -x "$bin" ] || { echo "build it first: cargo build --release -p ddpushd" >&2; exit 1; }
dir="$(mktemp -d -t ddpush-demo.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bash .ci/redis-cluster.sh stop "$dir/redis"
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
bash .ci/redis-cluster.sh start "$dir/redis"
. "$dir/redis/env"
i=0
for n in a b c; do
  off=$((i * 10))
  "$bin" --cluster-redis "$DDPUSH_TEST_REDIS_CLUSTER" --node-id "demo-$n" \
    --listen "127.0.0.1:$((9966 + off))" --push-listen "127.0.0.1:$((9999 + off))" \
    --admin-listen "127.0.0.1:$((9900 + off))" --peer-listen "127.0.0.1:$((9967 + off))" \
    2>"$dir/$n.log" &
  pids+=($!)
  i=$((i + 1))
done
sleep 1
grep -h "listening" "$dir"/?.log
echo "logs in $dir/{a,b,c}.log; status: curl -s 127.0.0.1:9900/status; Ctrl-C to stop" >&2
wait
