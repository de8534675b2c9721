#!/usr/bin/env bash
# Sweep stacks on the GPUs of one host at once: one server per shard (a plan line, on GPUs of its own), and one
# sweep per concurrency of the line.
#
#   bash perf/gpu_sweep.sh PLAN OUTPUT [perf.sweep args...]
#
# PLAN: see perf/plan.py (stacks=a,b,c [direct=x,y] [reload=a,b] [gpus=0-3] [concurrency=1,4,8] [place=M=0-3,4-7]
# per line). Every
# shard measures the baseline (bf16) first, so speed-ups are ratios within one shard's GPUs. Results go to
# OUTPUT/gpu<first GPU>/ (perf.sweep's files), logs to OUTPUT/logs/. On the offline GPU host, source
# build/use_gpu_bundle.sh first. SWEEP_DEADLINE_S bounds each sweep.
set -uo pipefail
plan=$1 out=$2
shift 2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mkdir -p "$out/logs"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/fluxserve-inductor}" PYTHONUNBUFFERED=1
export FLUXSERVE_WEIGHTS="${FLUXSERVE_WEIGHTS:-synthetic:full}"
# Multi-GPU hosts here keep NVLink multicast off; every process the servers start (stubs, workers) inherits this.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}" \
    NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
deadline="${SWEEP_DEADLINE_S:-540}"

# Checks the plan against this host (a shard on a GPU the host lacks would only fail every load).
shards=$(python3 -m perf.plan "$plan") || exit 2

shard() {  # shard INDEX GPUS CONCURRENCIES STACKS DIRECT RELOAD PLACEMENTS [sweep args]
    local index=$1 gpus=$2 concurrencies=$3 stacks=$4 direct=$5 reload=$6 placements=$7 port=$((8000 + 10 * $1))
    shift 7
    local url="127.0.0.1:$port" log="$out/logs/gpu${gpus%%,*}" place=()
    for spec in ${placements//;/ }; do place+=(--gpus "$spec"); done
    export CUDA_VISIBLE_DEVICES=$gpus
    python3 -m fluxserve.serve --models '' --http-port "$port" --grpc-port $((port + 1)) \
        --metrics-port $((port + 2)) "${place[@]}" > "$log-server.log" 2>&1 &
    local server=$!
    for _ in $(seq 120); do curl -sf "http://$url/v2/health/ready" >/dev/null && break; sleep 1; done
    for concurrency in ${concurrencies//,/ }; do
        timeout "$deadline" python3 -m perf.sweep --url "$url" --models "$stacks" --concurrency "$concurrency" \
            ${direct:+--direct "$direct"} ${reload:+--reload "$reload"} --output "$out/gpu${gpus%%,*}" "$@" \
            >> "$log-sweep.log" 2>&1
        echo "sweep (concurrency $concurrency) exit $?" >> "$log-sweep.log"
    done
    kill -TERM "$server"; wait "$server"
}

while IFS='|' read -r index gpus concurrencies stacks direct reload placements; do
    shard "$index" "$gpus" "$concurrencies" "$stacks" "$direct" "$reload" "$placements" "$@" &
done <<< "$shards"
wait
