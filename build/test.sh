#!/usr/bin/env bash
# Install into .venv and run the test suite against the real tritonserver (extra args go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/build/install.sh" "$root/build/requirements-test.txt"
cd "$root"
exec "$root/.venv/bin/python" -m pytest tests "$@"
