#!/usr/bin/env bash
# Measures an idle agent: release binaries, simulated backend (2 GPUs read
# every 500 ms), connected to a coordinator, heartbeating every 2 s, no jobs.
# Prints resident memory, threads and CPU time over 60 s.
# Usage: cargo build --release -p lingua-agent -p lingua-coordinator && bash tests/scripts/idle_agent.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$dir/agent.toml" <<TOML
node_id = "idle-01"
coordinator_url = "ws://127.0.0.1:$port/v1/node"
[capabilities]
src_langs = ["zh", "en"]
tgt_langs = ["en", "ja"]
[gpu]
backend = "simulated"
[gpu.simulated]
count = 2
[jobs.translate]
vram_mb = 2000
max_concurrent = 16
[jobs.asr]
vram_mb = 4000
max_concurrent = 4
TOML
target/release/lingua-coordinator --listen "127.0.0.1:$port" 2>/dev/null &
coordinator=$!
sleep 1
target/release/lingua-agent --config "$dir/agent.toml" 2>/dev/null &
agent=$!
trap 'kill $agent $coordinator 2>/dev/null; rm -rf "$dir"' EXIT
sleep 10
ticks=$(getconf CLK_TCK)
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$agent/stat")
sleep 60
read -r u2 s2 < <(awk '{print $14, $15}' "/proc/$agent/stat")
used=$(( (u2 + s2) - (u1 + s1) ))
echo "rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status") threads=$(awk '/Threads/ {print $2}' "/proc/$agent/status")"
echo "cpu: $used ticks of 1/$ticks s in 60 s = $(python3 -c "print(f'{$used / $ticks / 60 * 100:.3f}')") % of a core"
curl -s "http://127.0.0.1:$port/v1/nodes/idle-01" | python3 -c 'import json,sys; print("state:", json.load(sys.stdin)["state"])'
