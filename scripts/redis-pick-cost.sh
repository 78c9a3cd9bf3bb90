#!/usr/bin/env bash
# redis-pick-cost.sh: instructions one recording route_pick costs inside
# redis-server, counted by callgrind: a count that a busy, shared host
# does not move, where CPU time does (docs/BENCHMARKS.md).
#
#   scripts/redis-pick-cost.sh [SCRIPT]   (default: lua/route_pick.lua)
#
# Starts redis-server under `valgrind --tool=callgrind` on a unix socket
# in a scratch directory, gives a pair ten nodes with room, and runs
# recording picks (`open`, a fresh job id each) with redis-benchmark,
# 4,000 then 20,000 of them on two servers: the difference over 16,000
# is the cost of one pick, start-up and set-up left out. Needs
# redis-server, redis-cli, redis-benchmark (redis-tools) and valgrind.
# Give it another version of the script (`git show REV:lua/route_pick.lua
# > FILE`) to compare.
set -eu

SCRIPT=${1:-lua/route_pick.lua}
for tool in redis-server redis-cli redis-benchmark valgrind callgrind_annotate; do
  command -v "$tool" >/dev/null || { echo "redis-pick-cost: $tool is not installed" >&2; exit 1; }
done
[ -r "$SCRIPT" ] || { echo "redis-pick-cost: cannot read $SCRIPT" >&2; exit 1; }

# Instructions redis-server executes for start-up, set-up and N picks.
run() {
  local n=$1 dir sock pid p sha
  dir=$(mktemp -d)
  sock=$dir/redis.sock
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
    redis-server --unixsocket "$sock" --port 0 --save '' --appendonly no --dir "$dir" \
    >"$dir/valgrind.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do
    redis-cli -s "$sock" ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  p='lingua:v1:pair:{zh:en}'
  for i in $(seq 1 10); do
    redis-cli -s "$sock" zadd "$p:route:translate" 99999999999999 "node-$i" >/dev/null
    redis-cli -s "$sock" zadd "$p:leases" 99999999999999 "node-$i" >/dev/null
    redis-cli -s "$sock" zadd "$p:served:translate" 99999999999999 "node-$i" >/dev/null
    redis-cli -s "$sock" hset "$p:free:translate" "node-$i" 100000000 >/dev/null
  done
  sha=$(redis-cli -s "$sock" script load "$(cat "$SCRIPT")")
  redis-benchmark -s "$sock" -n "$n" -c 4 -r 100000000 evalsha "$sha" 7 \
    "$p:route:translate" "$p:free:translate" "$p:leases" "$p:session:none" \
    "$p:memory" "$p:served:translate" "$p:job:__rand_int__" \
    0 60000 capacity translate '' open '{"kind":"translate"}' 60000 c1 60000 1 7 >/dev/null
  redis-cli -s "$sock" shutdown nosave >/dev/null 2>&1 || true
  wait "$pid" || true
  callgrind_annotate "$dir/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
  rm -rf "$dir"
}

few=$(run 4000)
many=$(run 20000)
echo "$SCRIPT: $(( (many - few) / 16000 )) instructions per recording pick in redis-server"
