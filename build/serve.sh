#!/usr/bin/env bash
# Install into .venv and serve model_repository/ with the real tritonserver (flags: python -m fluxserve.serve -h).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/build/install.sh" "$root/build/requirements.txt"
cd "$root"
exec "$root/.venv/bin/python" -m fluxserve.serve "$@"
