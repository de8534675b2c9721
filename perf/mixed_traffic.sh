#!/usr/bin/env bash
# Mixed traffic on this host, one command: serve a plan's models, run perf.mixed_traffic with the plan's arguments
# (steady P50s, capacity, open loop at a fraction of it), stop the server.
#
#   bash perf/mixed_traffic.sh PLAN OUTPUT [perf.mixed_traffic args...]
#
# PLAN: perf.mixed_traffic's arguments, one per line (perf/plans/*.args); the server loads the models of its
# --models=... line. Everything goes to OUTPUT (report.md, steady_p50.csv, capacity.json, locust_*, server.log).
# On the offline GPU host, source build/use_gpu_bundle.sh first. FLUXSERVE_WEIGHTS defaults to synthetic:full;
# LOAD_DEADLINE_S (1800) bounds the models' load, MIXED_TRAFFIC_PORT (8000) is the HTTP port (gRPC +1, metrics +2),
# SERVE_ARGS adds launcher arguments (python3 -m fluxserve.serve -h).
set -uo pipefail
plan=$1 out=$2
shift 2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out"
plan="$(cd "$(dirname "$plan")" && pwd)/$(basename "$plan")" out="$(cd "$out" && pwd)"
cd "$root"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/fluxserve-inductor}" PYTHONUNBUFFERED=1
export FLUXSERVE_WEIGHTS="${FLUXSERVE_WEIGHTS:-synthetic:full}"
models=$(sed -n 's/^--models=//p' "$plan")
[ -n "$models" ] || { echo "mixed_traffic: $plan has no --models=... line" >&2; exit 2; }
port="${MIXED_TRAFFIC_PORT:-8000}"
echo "mixed traffic: $models into $out"

python3 -m fluxserve.serve --models "$models" --http-port "$port" --grpc-port $((port + 1)) \
    --metrics-port $((port + 2)) ${SERVE_ARGS:-} > "$out/server.log" 2>&1 &
server=$! started=$SECONDS
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"' EXIT
deadline=$((SECONDS + ${LOAD_DEADLINE_S:-1800}))
for model in ${models//,/ }; do
    until curl -sf "http://127.0.0.1:$port/v2/models/$model/ready" >/dev/null; do
        if ! kill -0 "$server" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            echo "mixed_traffic: $model is not ready; see $out/server.log" >&2
            exit 1
        fi
        sleep 2
    done
done

echo "$((SECONDS - started)) s from the launcher's start until every model was ready" | tee "$out/ready.txt"

python3 -m perf.mixed_traffic @"$plan" --url "127.0.0.1:$port" --output "$out" "$@"
status=$?
[ "$status" -eq 0 ] || echo "mixed traffic: exit $status; what it wrote is in $out (server.log, locust.log)" >&2
exit "$status"
