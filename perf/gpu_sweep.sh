#!/usr/bin/env bash
# Sweep stacks on every GPU of one host at once: one server and one sweep per GPU, each GPU a shard of stacks.
#
#   bash perf/gpu_sweep.sh PLAN OUTPUT [perf.sweep args...]
#
# PLAN: one line per GPU, each "stacks=a,b,c" plus optional "direct=x,y" and "reload=a,b" (stacks whose second
# load, with torch.compile's cache warm, is timed after the sweep). Every shard measures the baseline (bf16)
# first, so speed-ups are ratios within one GPU. Results go to OUTPUT/gpu<i>/ (perf.sweep's files), logs to
# OUTPUT/logs/. On the offline GPU host, source build/use_gpu_bundle.sh first. SWEEP_DEADLINE_S bounds each sweep.
set -uo pipefail
plan=$1 out=$2
shift 2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mkdir -p "$out/logs"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/fluxserve-inductor}" PYTHONUNBUFFERED=1
export FLUXSERVE_WEIGHTS="${FLUXSERVE_WEIGHTS:-synthetic:full}"
deadline="${SWEEP_DEADLINE_S:-540}"

field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }

shard() {  # shard GPU LINE [sweep args]
    local gpu=$1 line=$2 port=$((8000 + 10 * $1))
    shift 2
    local url="127.0.0.1:$port" log="$out/logs/gpu$gpu"
    export CUDA_VISIBLE_DEVICES=$gpu
    python3 -m fluxserve.serve --models '' --http-port "$port" --grpc-port $((port + 1)) \
        --metrics-port $((port + 2)) > "$log-server.log" 2>&1 &
    local server=$!
    for _ in $(seq 120); do curl -sf "http://$url/v2/health/ready" >/dev/null && break; sleep 1; done
    local direct
    direct=$(field direct "$line")
    timeout "$deadline" python3 -m perf.sweep --url "$url" --models "$(field stacks "$line")" \
        ${direct:+--direct "$direct"} --output "$out/gpu$gpu" "$@" > "$log-sweep.log" 2>&1
    echo "sweep exit $?" >> "$log-sweep.log"
    for stack in $(field reload "$line" | tr , ' '); do  # second load: torch.compile's cache is warm now
        python3 - "$url" "$stack" "$out/gpu$gpu/second_load.csv" <<'PYTHON' >> "$log-sweep.log" 2>&1
import sys
from client import FluxClient
url, stack, path = sys.argv[1:]
client = FluxClient(url, "http")
seconds = client.load(stack)
client.unload(stack)
with open(path, "a") as csv:
    csv.write(f"{stack},{seconds:.1f}\n")
print(f"second load of {stack}: {seconds:.1f} s")
PYTHON
    done
    kill -TERM "$server"; wait "$server"
}

gpu=0
while read -r line; do
    [ -n "${line// }" ] || continue
    shard "$gpu" "$line" "$@" &
    gpu=$((gpu + 1))
done < "$plan"
wait
