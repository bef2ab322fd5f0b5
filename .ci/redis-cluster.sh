#!/usr/bin/env bash
# A throw-away Redis Cluster on loopback for the cluster tests, the benchmarks and local demos:
# 3 masters + 3 replicas, AOF everysec, cluster-node-timeout 2000, on free ports, in a
# temporary directory. Every process it starts is recorded by PID and stopped by that PID.
#
#   .ci/redis-cluster.sh run CMD ARGS...   start, run CMD with the cluster's addresses exported,
#                                          stop (also when CMD or the start fails); exits
#                                          with CMD's status
#   .ci/redis-cluster.sh start DIR         start in DIR (created), leave it running; DIR/env
#                                          holds the export lines, DIR/pids the PIDs
#   .ci/redis-cluster.sh stop DIR          stop what `start DIR` started
#
# Exported to CMD (and written to DIR/env):
#   DDPUSH_TEST_REDIS_CLUSTER  redis://127.0.0.1:P1,redis://127.0.0.1:P2,... (all six nodes)
#   DDPUSH_TEST_REDIS_DIR      the directory (logs, AOF, nodes.conf, pids)
#
# Needs redis-server and redis-cli (Debian: apt-get install redis-server); with
# DDPUSH_REDIS_INSTALL=1 it installs them when missing.
set -euo pipefail

NODES=6
NODE_TIMEOUT_MS=2000

die() { echo "redis-cluster.sh: $*" >&2; exit 1; }

need_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return
  fi
  if [ "${DDPUSH_REDIS_INSTALL:-0}" = 1 ]; then
    echo "redis-cluster.sh: installing redis-server from the distribution's packages" >&2
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq redis-server >&2
    # The package enables a system instance on 6379; it is not ours and not needed.
    if command -v systemctl >/dev/null; then "${sudo[@]}" systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
  fi
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
    die "redis-server and redis-cli are needed (apt-get install redis-server)"
}

# Prints NODES free loopback ports P such that P + 10000 (the cluster bus) is free too.
free_ports() {
  python3 - "$NODES" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
out = []
tries = 0
while len(out) < n:
    tries += 1
    if tries > 10000:
        sys.exit("no free ports")
    p = random.randint(20000, 40000)
    if p in out or p + 10000 in out or p - 10000 in out:
        continue
    if free(p) and free(p + 10000):
        out.append(p)
print(" ".join(map(str, out)))
EOF
}

stop_dir() {
  local dir="$1"
  [ -f "$dir/pids" ] || return 0
  local pid
  while read -r pid; do
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
  done <"$dir/pids"
  # Wait up to 5 s for each, then KILL the ones still there. Only our own PIDs, one by one.
  local i
  for i in $(seq 50); do
    local alive=0
    while read -r pid; do
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
    done <"$dir/pids"
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  while read -r pid; do
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  done <"$dir/pids"
  rm -f "$dir/pids"
}

start_dir() {
  local dir="$1"
  need_redis
  mkdir -p "$dir"
  : >"$dir/pids"
  local ports
  ports="$(free_ports)" || die "could not find free ports"
  local p addrs=() urls=()
  for p in $ports; do
    mkdir -p "$dir/$p"
    cat >"$dir/$p/redis.conf" <<EOF
port $p
bind 127.0.0.1
dir $dir/$p
daemonize no
logfile $dir/$p/redis.log
cluster-enabled yes
cluster-config-file $dir/$p/nodes.conf
cluster-node-timeout $NODE_TIMEOUT_MS
cluster-require-full-coverage no
appendonly yes
appendfsync everysec
save ""
EOF
    redis-server "$dir/$p/redis.conf" >/dev/null 2>&1 &
    echo $! >>"$dir/pids"
    addrs+=("127.0.0.1:$p")
    urls+=("redis://127.0.0.1:$p")
  done
  for p in $ports; do
    local ok=0 i
    for i in $(seq 100); do
      if redis-cli -p "$p" ping 2>/dev/null | grep -q PONG; then ok=1; break; fi
      sleep 0.1
    done
    [ "$ok" = 1 ] || die "redis-server on port $p did not start (see $dir/$p/redis.log)"
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
    >"$dir/create.log" 2>&1 || die "cluster create failed (see $dir/create.log)"
  # Every node must agree the cluster is ok and know all six members.
  local deadline=$((SECONDS + 60))
  for p in $ports; do
    until redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' &&
      [ "$(redis-cli -p "$p" cluster info | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')" = "$NODES" ]; do
      [ "$SECONDS" -lt "$deadline" ] || die "cluster_state did not become ok on $p"
      sleep 0.2
    done
  done
  # Replicas must have finished their first sync, or a kill of a master loses more than AOF
  # everysec allows.
  for p in $ports; do
    if redis-cli -p "$p" info replication | grep -q '^role:slave'; then
      until redis-cli -p "$p" info replication | grep -q '^master_link_status:up'; do
        [ "$SECONDS" -lt "$deadline" ] || die "replica $p did not sync"
        sleep 0.2
      done
    fi
  done
  local list
  list="$(IFS=,; echo "${urls[*]}")"
  cat >"$dir/env" <<EOF
export DDPUSH_TEST_REDIS_CLUSTER=$list
export DDPUSH_TEST_REDIS_DIR=$dir
EOF
  echo "redis cluster up: $list" >&2
}

case "${1:-}" in
  start)
    [ -n "${2:-}" ] || die "usage: $0 start DIR"
    dir="$(mkdir -p "$2" && cd "$2" && pwd)"
    started=0
    trap '[ "$started" = 1 ] || stop_dir "$dir"' EXIT
    start_dir "$dir"
    started=1
    ;;
  stop)
    [ -n "${2:-}" ] || die "usage: $0 stop DIR"
    stop_dir "$2"
    ;;
  run)
    shift
    [ "$#" -gt 0 ] || die "usage: $0 run CMD ARGS..."
    dir="$(mktemp -d -t ddpush-redis.XXXXXX)"
    trap 'stop_dir "$dir"; rm -rf "$dir"' EXIT
    trap 'exit 130' INT TERM
    start_dir "$dir"
    # shellcheck disable=SC1091
    . "$dir/env"
    set +e
    "$@"
    status=$?
    set -e
    exit "$status"
    ;;
  *)
    die "usage: $0 run CMD ARGS... | start DIR | stop DIR"
    ;;
esac
