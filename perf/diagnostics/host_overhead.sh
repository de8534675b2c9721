#!/usr/bin/env bash
# Compare host-side Python speed as python3 runs it and as Triton's Python backend stub runs it (through the
# shared libpython), on the GPU host, after build/use_gpu_bundle.sh:  bash perf/diagnostics/host_overhead.sh
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r base libdir libpython sitepackages < <(python3 -c 'import os, sys, sysconfig, torch
print(sys.base_prefix, sysconfig.get_config_var("LIBDIR"), "libpython%d.%d.so.1.0" % sys.version_info[:2],
      os.path.dirname(os.path.dirname(torch.__file__)))')
executable="$(readlink -f "$(python3 -c 'import sys; print(sys.executable)')")"
echo "python3: $executable; libpython linked: $(ldd "$executable" | grep -o 'libpython[^ ]*' || echo 'no (static)')"
stub="$(python3 -c 'import pathlib, sys, pytriton; v="%d.%d" % sys.version_info[:2]
print(pathlib.Path(pytriton.__file__).parent / "tritonserver/python_backend_stubs" / v / "triton_python_backend_stub")')"
echo "stub: libpython linked: $(LD_LIBRARY_PATH="$libdir" ldd "$stub" | grep -o 'libpython[^ ]*' || echo none)"
echo "python3:          $(python3 "$here/launch_rate.py")"
cc -O2 -o /tmp/embedded_python "$here/embedded_python.c" -ldl 2>/dev/null \
    || nvcc -o /tmp/embedded_python "$here/embedded_python.c" -ldl || exit 1
echo "embedded_python:  $(PYEMBED_LIBPYTHON="$libpython" PYTHONHOME="$base" PYTHONPATH="$sitepackages" \
    LD_LIBRARY_PATH="$libdir" /tmp/embedded_python "$here/launch_rate.py")"
