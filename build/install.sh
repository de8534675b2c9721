#!/usr/bin/env bash
# Create .venv in the checkout (if missing) and install a requirements file into it: build/install.sh FILE
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="${1:-$root/build/requirements.txt}"
python="${PYTHON:-python3}"
[ -x "$root/.venv/bin/python" ] || "$python" -m venv "$root/.venv"
"$root/.venv/bin/python" -m pip install --quiet --upgrade pip
"$root/.venv/bin/python" -m pip install --quiet -r "$requirements"
