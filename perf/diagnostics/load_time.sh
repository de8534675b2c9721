#!/usr/bin/env bash
# Time loading stacks through a running server, each loaded and unloaded in turn (the load includes Triton
# starting the model's Python stub, the build and the warm-up):
#   bash perf/diagnostics/load_time.sh URL MODEL [MODEL ...]      e.g. 127.0.0.1:8000 bf16 fp16 bf16
set -uo pipefail
url=$1
shift
for model in "$@"; do
    started=$(date +%s.%N)
    curl -sf -X POST "http://$url/v2/repository/models/$model/load" > /dev/null || { echo "$model: load failed"; continue; }
    echo "$model: loaded in $(echo "$(date +%s.%N) - $started" | bc) s"
    curl -sf -X POST "http://$url/v2/repository/models/$model/unload" > /dev/null
    for _ in $(seq 120); do  # unloading finishes after the call returns: wait, so the next load starts clean
        curl -s "http://$url/v2/models/$model/ready" -o /dev/null -w '%{http_code}' | grep -q 200 || break
        sleep 0.5
    done
done
