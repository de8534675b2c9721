"""A folder's files and the page cache, for perf/diagnostics/cold_load.py: evicting files (drop_caches where allowed,
fsync + posix_fadvise(DONTNEED) always), counting their resident bytes with mincore(2) (util-linux `fincore` as a
cross-check), and timing one thread's sequential reads of a file."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import time
from pathlib import Path

GB = 1e9
GIB = 2**30
CHUNK = 64 * 2**20  # one sequential read


def folder_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, sorted by path (the order diffusers loads the models in, by name)."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def filesystem_of(path: Path) -> dict:
    """The mount holding `path` (longest mount-point prefix in /proc/self/mounts): mount point, type, device."""
    real = os.path.realpath(path)
    best = {"mount_point": None, "type": None, "device": None}
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best["mount_point"] or ""):
                    best = {"mount_point": point, "type": fields[2], "device": fields[0]}
    except OSError as exc:
        best["error"] = str(exc)
    if best["type"] in ("tmpfs", "ramfs"):
        best["warning"] = f"{best['type']} keeps files in memory: they cannot be made cold"
    return best


_libc = None


def _mincore_libc():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = libc
    return _libc


def resident_bytes(path: Path, window: int = GIB) -> int:
    """Bytes of `path` in the page cache, by mincore(2) on a shared read-only mapping of it, window by window."""
    import numpy as np

    libc = _mincore_libc()
    page = mmap.PAGESIZE
    size = os.path.getsize(path)
    resident = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, size, window):
            length = min(window, size - offset)
            address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
            if address in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            try:
                pages = (length + page - 1) // page
                vector = (ctypes.c_ubyte * pages)()
                if libc.mincore(address, length, vector) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
                in_cache = np.frombuffer(vector, dtype=np.uint8) & 1
                resident += int(in_cache.sum()) * page
                if in_cache[-1]:  # the last page counts only its part of the file
                    resident -= pages * page - length
            finally:
                libc.munmap(address, length)
    finally:
        os.close(fd)
    return resident


def fincore_bytes(path: Path) -> int | None:
    """util-linux `fincore`'s count of `path`'s resident bytes (a cross-check of mincore); None without it."""
    if shutil.which("fincore") is None:
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise OSError(f"fincore: {done.stderr.strip()}")
    return int(done.stdout.split()[0])


def drop_caches() -> dict:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`: the whole page cache (root, and /proc/sys writable)."""
    started = time.perf_counter()
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
        return {"ok": True, "s": round(time.perf_counter() - started, 3)}
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def evict(path: Path) -> None:
    """Flush `path`'s dirty pages (DONTNEED skips those) and drop its clean ones from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def residency(files: list[Path]) -> dict:
    """Resident bytes of `files` (mincore), as GB and as a fraction of their size."""
    total = sum(path.stat().st_size for path in files)
    resident = sum(resident_bytes(path) for path in files)
    return {"resident_gb": round(resident / GB, 3), "resident_fraction": round(resident / total, 4) if total else 0.0}


def make_cold(files: list[Path], try_drop_caches: bool = True) -> dict:
    """Evict `files` from the page cache (drop_caches if allowed, fadvise always) and check that it worked."""
    record: dict = {}
    try:
        record["before"] = residency(files)
    except Exception as exc:  # noqa: BLE001 - the check is optional, the eviction is not
        record["before"] = {"error": f"{type(exc).__name__}: {exc}"}
    if try_drop_caches:
        record["drop_caches"] = drop_caches()
    else:
        record["drop_caches"] = {"ok": False, "error": "not tried (--no-drop-caches)"}
    started = time.perf_counter()
    for path in files:
        evict(path)
    record["fadvise_files"] = len(files)
    record["fadvise_s"] = round(time.perf_counter() - started, 3)
    record["method"] = "drop_caches" if record["drop_caches"]["ok"] else "fadvise_dontneed"
    try:
        record["after"] = residency(files)
        record["verify_tool"] = "mincore"
        record["verified"] = record["after"]["resident_fraction"] <= 0.01
    except Exception as exc:  # noqa: BLE001
        record["after"] = {"error": f"{type(exc).__name__}: {exc}"}
        record["verified"] = None
    if files:
        largest = max(files, key=lambda path: path.stat().st_size)
        try:
            record["fincore_largest_bytes"] = fincore_bytes(largest)
        except Exception as exc:  # noqa: BLE001
            record["fincore_largest_bytes"] = f"{type(exc).__name__}: {exc}"
    return record


def read_speed(path: Path, limit_bytes: int | None = None, chunk: int = CHUNK) -> dict:
    """Read `path` (its first `limit_bytes`) in `chunk`-sized sequential reads on one thread: bytes, s, GB/s."""
    buffer = mmap.mmap(-1, chunk)  # anonymous: its pages are touched by the reads, not zeroed up front
    size = os.path.getsize(path)
    want = size if limit_bytes is None else min(size, limit_bytes)
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        while done < want:
            got = os.preadv(fd, [memoryview(buffer)[: min(chunk, want - done)]], done)
            if got == 0:
                break
            done += got
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
    return {"file": str(path), "bytes": done, "s": round(seconds, 3),
            "gb_s": round(done / GB / seconds, 3) if seconds > 0 else None}
