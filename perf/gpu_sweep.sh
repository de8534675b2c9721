#!/usr/bin/env bash
# Sweep stacks on every GPU of one host at once: one server and one sweep per GPU, each GPU a shard of stacks.
#
#   bash perf/gpu_sweep.sh PLAN OUTPUT [perf.sweep args...]
#
# PLAN: one line per GPU, each "stacks=a,b,c" plus optional "direct=x,y" (also measured in-process, each right
# after its served run) and "reload=a,b" (stacks whose second load, torch.compile's caches warm, is timed).
# Every shard measures the baseline (bf16) first, so speed-ups are ratios within one GPU. Results go to
# OUTPUT/gpu<i>/ (perf.sweep's files), logs to OUTPUT/logs/. On the offline GPU host, source
# build/use_gpu_bundle.sh first. SWEEP_DEADLINE_S bounds each sweep.
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

# A shard on a GPU the host lacks would start a server that only fails every load (synthetic:full needs a GPU).
shards=$(grep -c '[^[:space:]]' "$plan")
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$shards" -gt "$gpus" ]; then
    echo "gpu_sweep: $plan has $shards shard line(s) but this host has $gpus GPU(s); run one line per call," \
        "e.g. sed -n 1p $plan > /tmp/plan.txt" >&2
    exit 2
fi

shard() {  # shard GPU LINE [sweep args]
    local gpu=$1 line=$2 port=$((8000 + 10 * $1))
    shift 2
    local url="127.0.0.1:$port" log="$out/logs/gpu$gpu"
    export CUDA_VISIBLE_DEVICES=$gpu
    python3 -m fluxserve.serve --models '' --http-port "$port" --grpc-port $((port + 1)) \
        --metrics-port $((port + 2)) > "$log-server.log" 2>&1 &
    local server=$!
    for _ in $(seq 120); do curl -sf "http://$url/v2/health/ready" >/dev/null && break; sleep 1; done
    local direct reload
    direct=$(field direct "$line") reload=$(field reload "$line")
    timeout "$deadline" python3 -m perf.sweep --url "$url" --models "$(field stacks "$line")" \
        ${direct:+--direct "$direct"} ${reload:+--reload "$reload"} --output "$out/gpu$gpu" "$@" \
        > "$log-sweep.log" 2>&1
    echo "sweep exit $?" >> "$log-sweep.log"
    kill -TERM "$server"; wait "$server"
}

gpu=0
while read -r line; do
    [ -n "${line// }" ] || continue
    shard "$gpu" "$line" "$@" &
    gpu=$((gpu + 1))
done < "$plan"
wait
