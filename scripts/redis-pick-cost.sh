#!/usr/bin/env bash
# redis-pick-cost.sh: instructions one recording route_pick costs inside
# redis-server, counted by callgrind: a count that a busy, shared host
# does not move, where CPU time does (docs/BENCHMARKS.md).
#
#   scripts/redis-pick-cost.sh [SCRIPT]   (default: this tree's lua/route_pick.lua)
#
# Starts redis-server under `valgrind --tool=callgrind` on a unix socket
# in a scratch directory, gives a pair ten nodes with room, and runs
# recording picks (`open`, a fresh job id each) with redis-benchmark,
# 4,000 then 20,000 of them on two servers: the difference over 16,000
# is the cost of one pick, start-up and set-up left out. No lease lapses,
# so the picks sample without deadlines. Needs redis-server, redis-cli,
# redis-benchmark (redis-tools) and valgrind. Give it another version of
# the script (`git show REV:lua/route_pick.lua > FILE`) to compare; a
# version whose arguments differ from these is refused, not measured.
set -eu
shopt -s inherit_errexit

SCRIPT=${1:-$(dirname "$0")/../lua/route_pick.lua}
NODES=10
for tool in redis-server redis-cli redis-benchmark valgrind callgrind_annotate; do
  command -v "$tool" >/dev/null || { echo "redis-pick-cost: $tool is not installed" >&2; exit 1; }
done
[ -r "$SCRIPT" ] || { echo "redis-pick-cost: cannot read $SCRIPT" >&2; exit 1; }

# Instructions redis-server executes for start-up, set-up and $1 picks
# (in a subshell: its server and scratch directory go with it, however
# it ends).
run() (
  local n=$1 dir sock pid p sha free jobs
  dir=$(mktemp -d)
  pid=
  trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; [ -n "$pid" ] && wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
  sock=$dir/redis.sock
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
    redis-server --unixsocket "$sock" --port 0 --save '' --appendonly no --dir "$dir" \
    >"$dir/valgrind.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do
    redis-cli -s "$sock" ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  redis-cli -s "$sock" ping >/dev/null 2>&1 || {
    echo "redis-pick-cost: redis-server did not start under valgrind ($dir/valgrind.log):" >&2
    tail -5 "$dir/valgrind.log" >&2
    exit 1
  }
  p='lingua:v1:pair:{zh:en}'
  for i in $(seq 1 "$NODES"); do
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
  # Each job recorded took one slot (a random id drawn twice finds its
  # job instead, rarely): a run of errors, or of picks that chose
  # nothing, would be measured otherwise.
  free=$(redis-cli -s "$sock" eval "local s = 0 for _, v in ipairs(redis.call('HVALS', KEYS[1])) do s = s + v end return s" 1 "$p:free:translate")
  # Every key but the pair's four is a job's (O(1): the count must not
  # cost with the number of picks).
  jobs=$(( $(redis-cli -s "$sock" dbsize) - 4 ))
  if [ "$((NODES * 100000000 - free))" != "$jobs" ] || [ "$((jobs * 100))" -lt "$((n * 99))" ]; then
    echo "redis-pick-cost: $n calls recorded $jobs jobs and took $((NODES * 100000000 - free)) slots: $SCRIPT does not pick with these arguments" >&2
    exit 1
  fi
  redis-cli -s "$sock" shutdown nosave >/dev/null 2>&1 || true
  wait "$pid" || true
  pid=
  callgrind_annotate "$dir/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
)

few=$(run 4000)
many=$(run 20000)
if ! [[ "$few" =~ ^[0-9]+$ && "$many" =~ ^[0-9]+$ ]] || [ "$many" -le "$few" ]; then
  echo "redis-pick-cost: no instruction counts from callgrind (got '$few' and '$many')" >&2
  exit 1
fi
echo "$SCRIPT: $(( (many - few) / 16000 )) instructions per recording pick in redis-server"
