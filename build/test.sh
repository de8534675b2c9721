#!/usr/bin/env bash
# Install into .venv and run the test suite against the real tritonserver (extra args go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/build/install.sh" "$root/build/requirements-test.txt"
cd "$root"
# Two pytest-xdist workers, each taking whole test files (a file's servers are module fixtures, started once): on
# 2 CPU cores the suite took 20 minutes in one process and about 13 in two, peaking near 11 GiB of memory (each
# worker starts its own session server). FLUXSERVE_TEST_WORKERS=0 runs it in one process.
exec "$root/.venv/bin/python" -m pytest tests -n "${FLUXSERVE_TEST_WORKERS:-2}" --dist loadfile "$@"
