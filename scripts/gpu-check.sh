#!/usr/bin/env bash
# gpu-check.sh: the agent's NVML path on a machine with real NVIDIA GPUs.
#
#   scripts/gpu-check.sh --prepare DIR   build the artifacts below into DIR
#                                        (here, with cargo and cc)
#   scripts/gpu-check.sh --bin-dir DIR   run the check from DIR (no cargo)
#   scripts/gpu-check.sh                 build into a temporary DIR, then run
#
# DIR holds: lingua-agent, lingua-coordinator, nvml-tests (the agent's
# tests/nvml.rs test binary), hold_vram (scripts/gpu-check/hold_vram.c),
# redis-server and lib/ (its less common shared libraries).
#
# Steps, each reported and none stopping the others: 1. the GPUs as
# nvidia-smi sees them; 2. `lingua-agent probe` with backend = "nvml";
# 3. the host_* NVML tests against the real libnvidia-ml
# (LINGUA_NVML_REAL=1); 4. an admission run: coordinator (private
# redis-server) and agent in service mode with a `command` kind whose jobs
# hold real VRAM through libcuda, more jobs submitted than fit, VRAM watched
# with nvidia-smi. A summary ends the output; with $OUT set, the log and
# the raw outputs are written there. Runs in well under 4 minutes.
#
# Tunables (environment): JOB_MIB (VRAM each job allocates, 8192), HOLD_MS
# (how long it holds it, 8000), LOAD_DELAY_MS (pause before allocating, a
# slow model load, 2000), EXTRA_JOBS (submitted beyond what fits, 4),
# NVML_LIBRARY (an NVML other than the system's, e.g. the tests' fake for a
# rehearsal on a machine without a GPU).
set -u

JOB_MIB=${JOB_MIB:-8192}
HOLD_MS=${HOLD_MS:-8000}
LOAD_DELAY_MS=${LOAD_DELAY_MS:-2000}
EXTRA_JOBS=${EXTRA_JOBS:-4}
# Declared per job: the allocation plus the CUDA context (~500 MiB on Hopper).
VRAM_MB=$((JOB_MIB + 1024))
RESERVE_MB=2048

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
LOGDIR=${OUT:-$WORK}
mkdir -p "$LOGDIR"
LOG=$LOGDIR/gpu-check.log
SUMMARY=()
PIDS=()

log() { echo "[gpu-check] $*" | tee -a "$LOG" >&2; }
note() { SUMMARY+=("$*"); log "$*"; }
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    sleep 1
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap cleanup EXIT

prepare() {
    local dir=$1
    mkdir -p "$dir/lib"
    (cd "$ROOT" && cargo build --release -p lingua-agent -p lingua-coordinator) || return 1
    cp "$ROOT/target/release/lingua-agent" "$ROOT/target/release/lingua-coordinator" "$dir/" || return 1
    local tests
    tests=$(cd "$ROOT" && cargo test --release -p lingua-agent --test nvml --no-run --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*/deps/nvml-[^"]*"' | grep -o '/[^"]*' | tail -1)
    [ -n "$tests" ] || { log "no nvml test binary built"; return 1; }
    cp "$tests" "$dir/nvml-tests" || return 1
    cc -O2 -o "$dir/hold_vram" "$ROOT/scripts/gpu-check/hold_vram.c" -ldl || return 1
    local redis
    redis=$(command -v redis-server) && cp -L "$redis" "$dir/redis-server" &&
        ldd "$redis" | awk '/=> \// {print $3}' | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' |
        while read -r lib; do cp -L "$lib" "$dir/lib/"; done
    strip "$dir"/lingua-agent "$dir"/lingua-coordinator "$dir"/nvml-tests "$dir"/hold_vram "$dir"/redis-server 2>/dev/null
    du -sh "$dir" >&2
}

BIN_DIR=""
case "${1:-}" in
    --prepare)
        [ -n "${2:-}" ] || { echo "usage: $0 --prepare DIR" >&2; exit 64; }
        prepare "$2"
        exit $?
        ;;
    --bin-dir)
        [ -n "${2:-}" ] || { echo "usage: $0 --bin-dir DIR" >&2; exit 64; }
        BIN_DIR=$(cd "$2" && pwd)
        ;;
    "")
        if command -v cargo >/dev/null; then
            BIN_DIR=$WORK/bin
            prepare "$BIN_DIR" || note "FAIL build: see $LOG"
        else
            echo "no cargo here: pass --bin-dir DIR with prebuilt artifacts" >&2
            exit 64
        fi
        ;;
    *)
        echo "usage: $0 [--bin-dir DIR | --prepare DIR]" >&2
        exit 64
        ;;
esac
export PATH="$BIN_DIR:$PATH"
# Only redis-server (started by the coordinator) needs the carried libs.
REDIS_LIBS="$BIN_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "artifacts: $BIN_DIR; log: $LOG"

# A minimal HTTP client: curl when present, else bash's /dev/tcp.
http() { # METHOD PORT PATH [BODY]
    local method=$1 port=$2 path=$3 body=${4:-}
    if command -v curl >/dev/null; then
        curl -s -m 30 -X "$method" -H 'content-type: application/json' ${body:+-d "$body"} "http://127.0.0.1:$port$path"
        return
    fi
    exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf '%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
        "$method" "$path" "${#body}" "$body" >&3
    timeout 30 cat <&3 | sed '1,/^\r$/d'
    exec 3>&-
}

free_port() { # a port nothing listens on (best effort, no fixed port)
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 30000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
    echo 27777
}

# 1. The GPUs as the driver sees them.
step_smi() {
    if ! command -v nvidia-smi >/dev/null; then
        note "nvidia-smi: not installed"
        return
    fi
    nvidia-smi -L >"$LOGDIR/smi-L.txt" 2>&1
    nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,mig.mode.current,driver_version,ecc.errors.uncorrected.volatile.total \
        --format=csv >"$LOGDIR/smi-gpus.csv" 2>&1
    note "nvidia-smi: $(tr '\n' ';' <"$LOGDIR/smi-gpus.csv")"
}

agent_config() { # COORDINATOR_PORT METRICS_PORT
    cat <<EOF
node_id = "gpu-check"
coordinator_url = "ws://127.0.0.1:$1/v1/node"
metrics_listen = "127.0.0.1:$2"
drain_timeout_ms = 20000
[capabilities]
src_langs = ["zh"]
tgt_langs = ["en"]
[gpu]
backend = "nvml"
reserve_mb = $RESERVE_MB
poll_interval_ms = 250
[jobs.hold]
vram_mb = $VRAM_MB
max_concurrent = 256
executor = "command"
command = ["$BIN_DIR/hold_vram", "$JOB_MIB", "$HOLD_MS"]
timeout_ms = 120000
load_time_ms = $((LOAD_DELAY_MS + 3000))
EOF
    if [ -n "${NVML_LIBRARY:-}" ]; then
        printf '[gpu.nvml]\nlibrary_path = "%s"\n' "$NVML_LIBRARY"
    fi
}

# 2. probe with backend = "nvml".
step_probe() {
    agent_config 1 1 >"$WORK/probe.toml"
    if timeout 30 lingua-agent probe --config "$WORK/probe.toml" >"$LOGDIR/probe.json" 2>"$LOGDIR/probe.err"; then
        note "probe: ok ($(grep -c '"uuid"' "$LOGDIR/probe.json") devices); hold slots: $(grep -A1 '"free_slots"' "$LOGDIR/probe.json" | grep -o '[0-9]*' | head -1)"
        note "probe fields (null = NotSupported): $(grep -E '"(uuid|name|memory_total_mb|memory_used_mb|utilization_pct|temperature_c|healthy|reason|mig_parent_uuid)"' "$LOGDIR/probe.json" | tr -s ' ' | tr -d '\n')"
    else
        note "FAIL probe: exit $? $(head -c 400 "$LOGDIR/probe.err")"
    fi
}

# 3. The NVML tests against the real library.
step_tests() {
    if [ ! -x "$BIN_DIR/nvml-tests" ]; then
        note "FAIL nvml tests: $BIN_DIR/nvml-tests missing"
        return
    fi
    if LINGUA_NVML_REAL=1 LINGUA_AGENT_BIN="$BIN_DIR/lingua-agent" timeout 90 "$BIN_DIR/nvml-tests" host_ --test-threads=1 --nocapture >"$LOGDIR/nvml-tests.txt" 2>&1; then
        note "nvml tests (real library): $(grep 'test result' "$LOGDIR/nvml-tests.txt")"
    else
        note "FAIL nvml tests (real library): $(grep -E 'test result|panicked' "$LOGDIR/nvml-tests.txt" | head -3 | tr '\n' ' ')"
    fi
}

# 4. Admission against real VRAM.
step_admission() {
    if ! "$BIN_DIR/hold_vram" 64 10 >"$LOGDIR/hold-alone.json" 2>&1; then
        note "FAIL hold_vram alone: $(cat "$LOGDIR/hold-alone.json")"
        return
    fi
    note "hold_vram alone: $(cat "$LOGDIR/hold-alone.json")"
    command -v redis-server >/dev/null || { note "FAIL admission: no redis-server"; return; }
    LD_LIBRARY_PATH=$REDIS_LIBS redis-server --version >/dev/null 2>&1 ||
        note "FAIL redis-server does not run here: $(LD_LIBRARY_PATH=$REDIS_LIBS ldd "$(command -v redis-server)" | grep 'not found' | tr '\n' ' ')"

    local cport mport
    cport=$(free_port)
    mport=$(free_port)
    LD_LIBRARY_PATH=$REDIS_LIBS lingua-coordinator --listen "127.0.0.1:$cport" >"$LOGDIR/coordinator.log" 2>&1 &
    PIDS+=($!)
    local up=""
    for _ in $(seq 100); do
        http GET "$cport" /healthz >/dev/null 2>&1 && { up=1; break; }
        sleep 0.1
    done
    [ -n "$up" ] || { note "FAIL admission: coordinator not up: $(tail -3 "$LOGDIR/coordinator.log")"; return; }
    agent_config "$cport" "$mport" >"$WORK/agent.toml"
    DELAY_MS=$LOAD_DELAY_MS lingua-agent --config "$WORK/agent.toml" >"$LOGDIR/agent.log" 2>&1 &
    local agent=$!
    PIDS+=($agent)
    local slots=""
    for _ in $(seq 100); do
        slots=$(http GET "$mport" /metrics 2>/dev/null | grep '^lingua_agent_free_slots{kind="hold"}' | awk '{print $2}')
        [ -n "$slots" ] && [ "$slots" != 0 ] && http GET "$cport" /v1/nodes/gpu-check 2>/dev/null | grep -q '"ready"' && break
        sleep 0.1
    done
    note "admission: agent offers $slots hold jobs of $VRAM_MB MiB (each allocates $JOB_MIB MiB after ${LOAD_DELAY_MS} ms)"
    [ -n "$slots" ] && [ "$slots" != 0 ] || { note "FAIL admission: no slots: $(tail -5 "$LOGDIR/agent.log")"; return; }
    local total=$((slots + EXTRA_JOBS))
    (
        while kill -0 "$agent" 2>/dev/null; do
            nvidia-smi --query-gpu=uuid,memory.used,memory.total --format=csv,noheader,nounits 2>/dev/null
            sleep 0.25
        done
    ) >"$LOGDIR/vram-samples.csv" &
    PIDS+=($!)
    local i
    for i in $(seq "$total"); do
        http POST "$cport" "/v1/jobs?wait=false" \
            "{\"id\":\"hold-$i\",\"kind\":\"hold\",\"src_lang\":\"zh\",\"tgt_lang\":\"en\",\"payload\":{},\"timeout_ms\":60000}" >/dev/null
    done
    local completed=0 refused=0 failed=0 result
    for i in $(seq "$total"); do
        result=$(http GET "$cport" "/v1/jobs/hold-$i?wait_ms=$((HOLD_MS + LOAD_DELAY_MS + 20000))")
        echo "$result" >>"$LOGDIR/jobs.json"
        case "$result" in
            *'"completed"'*) completed=$((completed + 1)) ;;
            *no_capacity*) refused=$((refused + 1)) ;;
            *) failed=$((failed + 1)) ;;
        esac
    done
    http GET "$cport" /v1/nodes/gpu-check >"$LOGDIR/node.json"
    kill -TERM "$agent" 2>/dev/null
    wait "$agent"
    note "admission: $total submitted, $completed completed, $refused refused (no_capacity), $failed other; agent exit $?"
    local visible
    visible=$(grep -o '"visible": *"[^"]*"' "$LOGDIR/jobs.json" | sort | uniq -c | tr '\n' ';')
    note "admission: jobs saw CUDA_VISIBLE_DEVICES: ${visible:-none}"
    awk -F', *' -v reserve="$RESERVE_MB" '
        { if ($2 > peak[$1]) peak[$1] = $2; total[$1] = $3 }
        END { for (u in peak) printf "admission: %s peak %d MiB of %d (budget %d): %s\n", u, peak[u], total[u], total[u] - reserve, (peak[u] > total[u] - reserve ? "OVERCOMMIT" : "within budget") }
    ' "$LOGDIR/vram-samples.csv" | while read -r line; do note "$line"; done
    grep -q 'shutdown\|agent stopped' "$LOGDIR/agent.log" && note "agent: stopped cleanly"
}

step_smi
step_probe
step_tests
step_admission

echo
echo "===== gpu-check summary ====="
printf '%s\n' "${SUMMARY[@]}" | tee "$LOGDIR/summary.txt"
grep -q '^FAIL\|OVERCOMMIT' "$LOGDIR/summary.txt" && exit 1
exit 0
