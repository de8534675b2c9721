#!/usr/bin/env bash
# Build .bundle/ for the offline GPU host (no network there; the working tree travels, 64 MiB in all): run here,
# where PyPI is reachable. On the host, from the repo root: `source build/use_gpu_bundle.sh`.
#
# Downloads the wheels pinned in build/gpu-bundle-requirements.txt for CPython $PYVER (default 3.12) on
# manylinux x86-64, installs them (no dependency resolution, no .pyc) into a staging site-packages, adds the
# tritonserver of the nvidia-pytriton wheel (server, Python backend, the stub for $PYVER, its bundled libraries
# minus the libpython3.13 only the 3.13 stub needs) laid out as a minimal `pytriton` package, so that
# fluxserve.serve finds it by `import pytriton` unchanged, and packs the lot into one xz tarball, to be unpacked
# as the site-packages of a virtual environment over the host's Python:
#     .bundle/gpu-site-py$PYVER.tar.xz     .bundle/MANIFEST.txt
# One solid xz archive, not the wheels themselves: the wheels (zip, 42 MB) beside the server parts (27 MB even
# with xz) would not fit the 64 MiB with room to spare; the one archive is 39 MiB. Needs pip, xz, readelf, strip.
#
# Variables: PYVER (3.12), BUNDLE_DIR (<repo>/.bundle), PYTHON (python3: runs pip here, any version),
# XZ_THREADS (1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pyver="${PYVER:-3.12}"
out="${BUNDLE_DIR:-$root/.bundle}"
python="${PYTHON:-python3}"
requirements="$root/build/gpu-bundle-requirements.txt"
tarball="gpu-site-py$pyver.tar.xz"

work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-bundle.XXXXXX")"
trap 'rm -rf "$work"' EXIT
site="$work/site"
mkdir -p "$work/wheels" "$work/server" "$site"

# The pins, without comments; nvidia-pytriton apart (manylinux_2_35 only, and only parts of it are packed).
grep -vE '^[[:space:]]*(#|$)' "$requirements" | sed 's/[[:space:]]*#.*//' > "$work/all.txt"
grep -iE '^nvidia-pytriton==' "$work/all.txt" > "$work/server.txt" || { echo "no nvidia-pytriton pin in $requirements" >&2; exit 1; }
grep -viE '^nvidia-pytriton==' "$work/all.txt" > "$work/wheels.txt"

target=(--only-binary=:all: --python-version "$pyver" --implementation cp)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
pip=("$python" -m pip --disable-pip-version-check)

echo "make_gpu_bundle: downloading wheels for CPython $pyver" >&2
"${pip[@]}" download -q --no-deps "${target[@]}" "${platforms[@]}" -d "$work/wheels" -r "$work/wheels.txt"
"${pip[@]}" download -q --no-deps "${target[@]}" --platform manylinux_2_35_x86_64 -d "$work/server" -r "$work/server.txt"
wanted=$(wc -l < "$work/wheels.txt"); got=$(find "$work/wheels" -name '*.whl' | wc -l)
[ "$wanted" -eq "$got" ] || { echo "make_gpu_bundle: $got wheels for $wanted pins" >&2; exit 1; }

# Install as pip would on the host, for that Python (--target with --python-version installs, compiles nothing).
"${pip[@]}" install -q --no-deps --no-index --no-compile --root-user-action=ignore "${target[@]}" "${platforms[@]}" \
    --target "$site" "$work"/wheels/*.whl
# Console scripts carry this machine's interpreter in their shebang: use_gpu_bundle.sh writes the one wanted.
rm -rf "$site/bin"
# Test suites, and the debug sections of extensions built with them (rapidjson and brotli: 12 MB of 14).
find "$site" -type d -name tests -prune -exec rm -rf {} +
while IFS= read -r -d '' so; do
    if readelf -S "$so" 2>/dev/null | grep -q '\.debug_info'; then strip --strip-debug "$so"; fi
done < <(find "$site" -name '*.so' -print0)

# The server parts of the nvidia-pytriton wheel, at the paths the wheel gives them (RPATHs point from
# pytriton/tritonserver/... to ../nvidia_pytriton.libs), with a pytriton/__init__.py of their own: the real one
# imports pytriton's client and model API and their dependencies (pyzmq, sh, ...), which serving does not use.
"$python" - "$work"/server/nvidia_pytriton-*.whl "$site" "$pyver" <<'EOF'
import sys, zipfile
from pathlib import Path, PurePosixPath

wheel, site, pyver = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
keep = ("pytriton/tritonserver/bin/", "pytriton/tritonserver/backends/python/", "pytriton/tritonserver/caches/",
        f"pytriton/tritonserver/python_backend_stubs/{pyver}/", "nvidia_pytriton.libs/")
count = size = 0
stub = False
with zipfile.ZipFile(wheel) as archive:
    licenses = [n for n in archive.namelist() if ".dist-info/" in n and "LICENSE" in n.upper()]
    for info in archive.infolist():
        name = info.filename
        if info.is_dir() or not name.startswith(keep) or "/__pycache__/" in name:
            continue
        if name.startswith("nvidia_pytriton.libs/libpython3"):
            continue  # libpython3.13, for the 3.13 stub only (31 MB)
        target = site / PurePosixPath(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.read(info))
        target.chmod((info.external_attr >> 16) & 0o777 or 0o644)
        stub |= name.endswith(f"/{pyver}/triton_python_backend_stub")
        count += 1
        size += info.file_size
    for name in licenses:
        (site / "pytriton" / PurePosixPath(name).name).write_bytes(archive.read(name))
if not stub:
    raise SystemExit(f"{wheel} has no Python backend stub for Python {pyver}")
(site / "pytriton" / "__init__.py").write_text(
    '"""The tritonserver of nvidia-pytriton 0.7.0 (server, Python backend, the stub for one Python, the wheel\'s\n'
    "libraries), packed by build/make_gpu_bundle.sh without pytriton's Python API: fluxserve.serve finds the\n"
    'server by importing this package."""\n\n__version__ = "0.7.0"\n')
print(f"make_gpu_bundle: {count} server files, {size / 2**20:.1f} MiB unpacked", file=sys.stderr)
EOF
for binary in pytriton/tritonserver/bin/tritonserver pytriton/tritonserver/python_backend_stubs/"$pyver"/triton_python_backend_stub; do
    [ -x "$site/$binary" ] || { echo "make_gpu_bundle: $binary is missing or not executable" >&2; exit 1; }
done

# What is in it, then the archive (sorted, with fixed owners, so that a rebuild from the same pins is identical).
{
    echo "# .bundle/$tarball: unpack with build/use_gpu_bundle.sh. CPython $pyver, manylinux x86-64."
    echo "# wheels (installed without dependencies):"
    (cd "$work/wheels" && ls -1 *.whl) | sed 's/^/  /'
    echo "# from $(cd "$work/server" && ls -1 *.whl): pytriton/tritonserver/{bin,backends/python,caches,python_backend_stubs/$pyver}, nvidia_pytriton.libs (without libpython3.13)"
    echo "# unpacked: $(du -sm "$site" | cut -f1) MiB"
} > "$work/MANIFEST.txt"
echo "make_gpu_bundle: packing $(du -sm "$site" | cut -f1) MiB with xz -9 (a few minutes)" >&2
mkdir -p "$out"
rm -f "$out"/gpu-site-py*.tar.xz "$out/MANIFEST.txt"
tar -C "$site" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | xz -9 -T"${XZ_THREADS:-1}" > "$out/$tarball.part"
mv "$out/$tarball.part" "$out/$tarball"
(cd "$out" && sha256sum "$tarball") >> "$work/MANIFEST.txt"
mv "$work/MANIFEST.txt" "$out/MANIFEST.txt"
bytes=$(du -cb "$out"/* | tail -1 | cut -f1)
echo "make_gpu_bundle: $out holds $(awk -v b="$bytes" 'BEGIN { printf "%.1f MiB", b / 1048576 }') ($bytes bytes):" >&2
ls -l "$out" >&2
