# Source on the offline GPU host, from anywhere in the checkout:  source build/use_gpu_bundle.sh
# then serve as anywhere else:  python3 -m fluxserve.serve --models bf16 ...
#
# Makes a virtual environment over the host's python3 (default /tmp/fluxserve-venv) whose site-packages is the
# bundle (.bundle/gpu-site-pyX.Y.tar.xz, built by build/make_gpu_bundle.sh) followed by the host's own
# site-packages (torch, transformers, ...), and puts its bin/ first on PATH. A virtual environment, not
# PYTHONPATH: the Python backend's stub runs isolated (it ignores PYTHONPATH) with the site-packages of the
# python3 it finds on PATH, which fluxserve.serve makes the python that runs it. So the server's model
# processes see the bundle's numpy 1.26 (the stub mis-sizes BYTES tensors under numpy 2), diffusers and torchao
# before anything of the host's, and `import pytriton` finds the bundled tritonserver, which tritonserver stays
# off PATH for (the launcher takes a tritonserver on PATH for the NGC image's, with its own backends).
# A host scipy that does not import beside numpy 1.26 (scipy 1.17 uses numpy 2's np.long) is hidden from the
# environment, since diffusers' schedulers import scipy.stats whenever scipy is installed.
#
# Variables: FLUXSERVE_BUNDLE (<repo>/.bundle), FLUXSERVE_VENV (/tmp/fluxserve-venv), PYTHON (python3: the
# host's). Safe to source again: the environment is rebuilt only when the bundle or the host python changed.

_fluxserve_use_bundle() {
    local root bundle venv python prefix host pyver tarball stamp want packages
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    bundle="${FLUXSERVE_BUNDLE:-$root/.bundle}"
    venv="${FLUXSERVE_VENV:-/tmp/fluxserve-venv}"
    venv="$(mkdir -p "$(dirname "$venv")" && cd "$(dirname "$venv")" && pwd -P)/$(basename "$venv")" || return 1
    python="${PYTHON:-python3}"
    # The host's interpreter: the one given, unless that is this environment's (sourced again).
    prefix="$("$python" -c 'import os, sys; print(os.path.realpath(sys.prefix))')" || return 1
    if [ "$prefix" = "$venv" ]; then
        host="$(cat "$venv/fluxserve-host-python" 2>/dev/null)" || { echo "use_gpu_bundle: $venv has no host python recorded" >&2; return 1; }
    else
        host="$("$python" -c 'import sys; print(sys.executable)')" || return 1
    fi
    pyver="$("$host" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || return 1
    tarball="$bundle/gpu-site-py$pyver.tar.xz"
    if [ ! -f "$tarball" ]; then
        echo "use_gpu_bundle: no $tarball: run build/make_gpu_bundle.sh (PYVER=$pyver) where PyPI is reachable" >&2
        return 1
    fi
    stamp="$venv/fluxserve-bundle"
    want="$(cksum < "$tarball") $host"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        if [ -e "$venv" ] && [ ! -f "$stamp" ] && [ -n "$(ls -A "$venv" 2>/dev/null)" ]; then
            echo "use_gpu_bundle: $venv exists and was not made from a bundle: set FLUXSERVE_VENV" >&2
            return 1
        fi
        echo "use_gpu_bundle: making $venv over $host from $tarball" >&2
        rm -rf "$venv" && "$host" -m venv --without-pip "$venv" || return 1
        packages="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
        tar -xJf "$tarball" -C "$packages" || return 1
        # The host's site-packages after the bundle's, with their own .pth files processed.
        "$host" - "$packages/_fluxserve_host.pth" <<'PYTHON' || return 1
import os, site, sys
dirs = [d for d in dict.fromkeys(site.getsitepackages()) if os.path.isdir(d)]
with open(sys.argv[1], "w") as pth:
    pth.writelines(f"import site; site.addsitedir({d!r})\n" for d in dirs)
PYTHON
        if ! "$venv/bin/python" -c 'import importlib.util, sys
if importlib.util.find_spec("scipy"):
    import scipy.stats' 2>/dev/null; then
            echo "use_gpu_bundle: the host's scipy does not import beside numpy 1.26: scipy and scikit-learn hidden from $venv" >&2
            # scikit-learn too: transformers imports it when present, and it needs scipy.
            echo 'import sys; sys.modules.setdefault("scipy", None); sys.modules.setdefault("sklearn", None)' \
                > "$packages/_fluxserve_no_scipy.pth"
        fi
        printf '#!/bin/sh\nexec "%s" -m locust "$@"\n' "$venv/bin/python" > "$venv/bin/locust"
        chmod 755 "$venv/bin/locust"
        echo "$host" > "$venv/fluxserve-host-python"
        echo "$want" > "$stamp"
    fi
    case ":$PATH:" in
        *":$venv/bin:"*) ;;
        *) export PATH="$venv/bin:$PATH" ;;
    esac
    hash -r
    # What the bundle relies on the host for: an error if the bundle's numpy or server is not the one found,
    # warnings for the rest.
    "$venv/bin/python" - "$venv" <<'PYTHON' || return 1
import importlib.metadata as metadata
import importlib.util, os, subprocess, sys, sysconfig
from pathlib import Path

venv = Path(sys.argv[1])
import numpy, pytriton
for module in (numpy, pytriton):
    if venv not in Path(module.__file__).parents:
        raise SystemExit(f"use_gpu_bundle: {module.__name__} comes from {module.__file__}, not {venv}")
wheel = Path(pytriton.__file__).parent / "tritonserver"
version = "%d.%d" % sys.version_info[:2]


def warn(message):
    print(f"use_gpu_bundle: WARNING: {message}", file=sys.stderr)


def release(name):
    try:
        return tuple(int(part) for part in metadata.version(name).split(".")[:3] if part.isdigit())
    except metadata.PackageNotFoundError:
        return None


for name in ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "PIL", "grpc"):
    if importlib.util.find_spec(name) is None:
        warn(f"{name} is not installed on this host")
grpcio = release("grpcio")
if grpcio and grpcio < (1, 81, 1):
    warn(f"grpcio {metadata.version('grpcio')}: tritonclient.grpc needs >= 1.81.1 (tritonclient.http does not)")
# The loader must find every library of the server, backend and stub (libpython in this Python's LIBDIR, which
# fluxserve.serve links alone into a directory of its own), with this host's glibc and libstdc++ (the wheel is
# manylinux_2_35).
libraries = os.pathsep.join(filter(None, [str(wheel.parent.parent / "nvidia_pytriton.libs"),
                                          sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")]))
for binary in (wheel / "bin" / "tritonserver", wheel / "backends" / "python" / "libtriton_python.so",
               wheel / "python_backend_stubs" / version / "triton_python_backend_stub"):
    try:
        ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                             env={**os.environ, "LD_LIBRARY_PATH": libraries})
    except OSError:
        break  # no ldd here
    missing = [line.strip() for line in (ldd.stdout + ldd.stderr).splitlines() if "not found" in line]
    if missing:
        warn(f"{binary.name}: " + "; ".join(missing))
print(f"use_gpu_bundle: python3 is {sys.executable} (Python {sys.version.split()[0]}, numpy {numpy.__version__}); "
      f"server {wheel / 'bin' / 'tritonserver'}", file=sys.stderr)
PYTHON
}

# Return when sourced (exit when run, which changes nothing in the calling shell).
if _fluxserve_use_bundle; then
    unset -f _fluxserve_use_bundle; return 0 2>/dev/null || exit 0
else
    unset -f _fluxserve_use_bundle; return 1 2>/dev/null || exit 1
fi
