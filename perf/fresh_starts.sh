#!/usr/bin/env bash
# How compiled stacks start on a fresh machine, without and with their portable compile artifacts, and how their
# first request at each size compares with that size's steady P50 once the server is ready:
#
#   bash perf/fresh_starts.sh PLAN OUTPUT [STEPS]
#
# 1. OUTPUT/cold:  empty Inductor and Triton caches and no artifact (a new pod without the cache volume): the loads
#                  compile and write their artifacts to OUTPUT/artifacts (fluxserve.optimizations.compile_artifacts).
# 2. OUTPUT/fresh: other empty caches and the artifacts of step 1 (a new pod with them shipped or mounted).
# Each step serves the plan's models and runs perf.mixed_traffic without the open loop (perf/mixed_traffic.sh,
# --duration 0): ready.txt (seconds until every model was ready), server.log (each model's load and its phases),
# first_requests.csv, loads.json (each model's load, from INFO) and report.md. PLAN as for perf/mixed_traffic.sh
# (perf/plans/*.args). STEPS: which of them to run (default "cold fresh").
set -euo pipefail
plan=$1 out=$2 steps=${3:-cold fresh}
mkdir -p "$out"
out="$(cd "$out" && pwd)"
for step in $steps; do
    rm -rf "$out/inductor-$step" "$out/triton-$step"
    TORCHINDUCTOR_CACHE_DIR="$out/inductor-$step" TRITON_CACHE_DIR="$out/triton-$step" \
        FLUXSERVE_COMPILE_ARTIFACTS="$out/artifacts" \
        bash "$(dirname "${BASH_SOURCE[0]}")/mixed_traffic.sh" "$plan" "$out/$step" --duration 0
    grep -ho "[^\"]*: stack .* ready on .* in [0-9.]* s ([^)]*)" "$out/$step/server.log" | sed 's/^/  /' || true
done
