#!/usr/bin/env bash
# First and second load of compiled stacks without the server: each variant gets its own empty Inductor cache
# directory (and, with FLUXSERVE_AOT_PACKAGES=on in the caller's environment, its own ahead-of-time packages folder)
# and is loaded twice in fresh processes (cold caches, then warm), with perf.diagnostics.compile_load.
#   bash perf/diagnostics/compile_loads.sh OUTPUT "STACK [compile_load args]" ...
# e.g. bash perf/diagnostics/compile_loads.sh .runs/cl bf16-cudnn-fp8-fusedqkv-compile-regional "bf16-compile-regional --requests 5"
# Appends one JSON line per load to OUTPUT/loads.jsonl (compile_load's, plus "variant" and "caches": cold/warm);
# each load's output goes to OUTPUT/<n>-<caches>.log. DIAG_DEADLINE_S (default 560) bounds the whole run: no load
# starts after it, and a running one is stopped at it. PYTHON (default python3) runs the loads.
set -uo pipefail
out=$1
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
end=$(( $(date +%s) + ${DIAG_DEADLINE_S:-560} ))
n=0
for variant in "$@"; do
    n=$((n + 1))
    export TORCHINDUCTOR_CACHE_DIR="$out/cache-$n"
    [ "${FLUXSERVE_AOT_PACKAGES:-off}" = off ] || export FLUXSERVE_AOT_PACKAGES="$out/aot-$n"
    for caches in cold warm; do
        left=$(( end - $(date +%s) ))
        [ "$left" -gt 0 ] || { echo "deadline: $variant ($caches) not run" >&2; exit 0; }
        log="$out/$n-$caches.log"
        # shellcheck disable=SC2086  # a variant is a stack name and compile_load's flags
        (cd "$root" && timeout "$left" "${PYTHON:-python3}" -m perf.diagnostics.compile_load --stack $variant) > "$log" 2>&1
        status=$?
        echo "$variant ($caches): exit $status" >&2
        line=$(grep '^{' "$log" | tail -1)
        [ -n "$line" ] && "${PYTHON:-python3}" -c 'import json, sys; print(json.dumps(
            {"variant": sys.argv[1], "caches": sys.argv[2], **json.loads(sys.argv[3])}))' \
            "$variant" "$caches" "$line" >> "$out/loads.jsonl"
        [ "$status" -eq 0 ] || break
    done
done
