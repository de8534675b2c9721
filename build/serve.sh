#!/usr/bin/env bash
# Install into .venv and serve model_repository/ with the real tritonserver (flags: python -m fluxserve.serve -h).
# On a host with an NVIDIA GPU (nvidia-smi answers) the GPU extras of build/requirements-gpu.txt come too.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/build/install.sh" "$root/build/requirements.txt"
if nvidia-smi -L >/dev/null 2>&1; then
    bash "$root/build/install.sh" "$root/build/requirements-gpu.txt"
fi
cd "$root"
exec "$root/.venv/bin/python" -m fluxserve.serve "$@"
