#!/usr/bin/env bash
# bench-device.sh: the throughput scenario ten times in a row, then
# 10,000 connected agents, on a machine without cargo (the device
# machine lent for the GPU check has 16 cores).
#
#   scripts/bench-device.sh --prepare DIR   build stripped release binaries
#                                           into DIR/bench (here, with cargo)
#   scripts/bench-device.sh --bin-dir DIR   run from DIR (no cargo)
#
# DIR also holds redis-server and lib/ (its less common shared
# libraries), as `scripts/gpu-check.sh --prepare DIR` leaves them. With
# $OUT set, the tables and the tails of the bench's logs are written
# there. Tunables (environment): RUNS (10), SECONDS_EACH (5), FLEET
# (10000), WORKERS (the coordinator's worker threads: "default", or
# counts that each run goes through in turn, e.g. "2 16" with RUNS=5 to
# compare two counts in one sitting).
set -u

RUNS=${RUNS:-10}
SECONDS_EACH=${SECONDS_EACH:-5}
FLEET=${FLEET:-10000}
WORKERS=${WORKERS:-default}

usage() {
    echo "usage: $0 --prepare DIR | --bin-dir DIR" >&2
    exit 64
}

[ $# -eq 2 ] || usage
DIR=$2
case $1 in
    --prepare)
        ROOT=$(cd "$(dirname "$0")/.." && pwd)
        (cd "$ROOT" && cargo build --release --workspace --bins) || exit 1
        mkdir -p "$DIR/bench"
        for bin in lingua-bench lingua-coordinator lingua-agent; do
            strip -o "$DIR/bench/$bin" "$ROOT/target/release/$bin" || exit 1
        done
        [ -x "$DIR/redis-server" ] ||
            echo "note: $DIR has no redis-server yet: run scripts/gpu-check.sh --prepare $DIR" >&2
        exit 0
        ;;
    --bin-dir) ;;
    *) usage ;;
esac

DIR=$(cd "$DIR" && pwd)
export PATH="$DIR/bench:$DIR:$PATH" LD_LIBRARY_PATH="$DIR/lib"
ulimit -n 65536 2>/dev/null || ulimit -n 20000
OUT=${OUT:-$(mktemp -d /tmp/bench-device.XXXXXX)}
mkdir -p "$OUT"
{
    nproc
    grep -m1 'model name' /proc/cpuinfo
    free -g | head -2
    redis-server --version
} >"$OUT/machine.txt" 2>&1
workers_args() {
    [ "$1" = default ] || echo "--worker-threads $1"
}
for i in $(seq 1 "$RUNS"); do
    for workers in $WORKERS; do
        echo "== run $i, worker threads: $workers, $(date +%T)"
        # shellcheck disable=SC2046 # the flag and its count are two words
        timeout 90 lingua-bench --scenario throughput --seconds "$SECONDS_EACH" \
            $(workers_args "$workers") 2>>"$OUT/throughput.err" | grep '^|'
    done
done >"$OUT/throughput.md"
timeout 200 lingua-bench --scenario fleet-scale --fleet "$FLEET" --seconds "$SECONDS_EACH" \
    2>"$OUT/fleet.err" | grep '^|' >"$OUT/fleet.md"
for log in throughput fleet; do
    tail -c 3000 "$OUT/$log.err" >"$OUT/$log.err.tail"
    rm -f "$OUT/$log.err"
done
cat "$OUT/machine.txt" "$OUT/throughput.md" "$OUT/fleet.md"
