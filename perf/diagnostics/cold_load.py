"""How long a saved FLUX.1 weights folder takes to load onto a GPU from a cold page cache, next to the disk's speed.

In one process, each phase on its own (a failed phase is recorded with its error; the others still run) and the
JSON written again after every phase, so that a run cut short keeps what it measured:

1. build: when FOLDER has no model_index.json, builds `synthetic:full` (FLUX.1-dev's architecture, random
   weights) on the GPU, saves it with `save_pipeline` (diffusers' `save_pretrained` into FOLDER.partial, renamed
   to FOLDER when complete: about 34 GB, `save_s`, then `sync_s` to flush it to the disk) and frees the GPU.
2. cold: evicts the folder's files from the page cache: `sync; echo 3 > /proc/sys/vm/drop_caches` (root; a
   container usually refuses it), and in any case fsync + `posix_fadvise(POSIX_FADV_DONTNEED)` on every file.
   Verified by counting the files' pages still resident with mincore(2) (what util-linux `fincore` reports;
   `fincore` itself, if present, cross-checks the largest file).
3. disk read: reads the largest file, cold, in 64 MiB chunks on one thread (`disk_read_gb_s`: what one stream of
   large sequential reads gets), then up to `--parallel-read-gb` of the folder's files in 256 MiB segments on
   `--threads` threads (`disk_read_parallel_gb_s`: what the disk gives with requests in flight), and evicts again.
4. cold loads, each from a cold cache (evicted and verified just before), timed until the pipeline is on the
   device (torch.cuda.synchronize); every pipeline checked against the built one (or the first one loaded) by a
   checksum of each model's tensors:
   - load_pipeline: `fluxserve.weights.load_pipeline`, the server's path (on a GPU: `load_onto_device`, the files
     read ahead into the page cache by `fluxserve.weights.read_ahead` on 8 threads while the models load)
   - onto_device_no_read_ahead: the same without the readers (the loader's page faults alone read the disk)
   - cpu_then_to: the path before it, `load_to_cpu` (diffusers' `FluxPipeline.from_pretrained` into host memory)
     then `pipe.to(device)`, each timed; safetensors maps the files, so part of the reading can happen in `.to()`
5. warm: the fastest variant once more, files in the page cache (the load's floor without the disk).

Writes one JSON (versions, host, folder size and file count, build, cold method, disk speeds, every load with its
breakdown, peak GPU memory and host RSS, a summary against the 30 s target) to --out and prints it. The disk's own
caches are not reached: a virtual disk that a hypervisor caches can read faster than the device it lives on.
Needs a CUDA GPU for the build and the loads (`--device cpu` runs them on the CPU: the tests do, with
`--build synthetic:tiny`); without one those phases fail with a message and the disk phases still run.

    python3 -m perf.diagnostics.cold_load --folder /tmp/flux-saved --out $OUT/cold_load.json

The run is here; the page-cache helpers are in perf/diagnostics/page_cache.py, the build, loads and checksums in
perf/diagnostics/pipeline_loads.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from fluxserve.weights.read_ahead import ReadAhead
from perf.diagnostics.page_cache import GB, evict, filesystem_of, folder_files, make_cold, read_speed, residency
from perf.diagnostics.page_cache import fincore_bytes, resident_bytes  # noqa: F401  (tests/test_cold_load.py's)
from perf.diagnostics.pipeline_loads import VARIANTS, build_and_save, free, model_checksums, require_device, time_load

TARGET_S = 30.0
SYNTHETIC_FULL_GB = 34.0  # what synthetic:full takes on disk, about (for the free-space check)


def log(message: str) -> None:
    print(f"cold_load [{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Run:
    """The report, written to `out` after every phase; phases skipped once past the time budget."""

    def __init__(self, out: Path | None, budget_s: float) -> None:
        self.out = out
        self.budget_s = budget_s
        self.started = time.perf_counter()
        self.report: dict = {
            "what": "cold page-cache load of a saved FLUX.1 weights folder (perf/diagnostics/cold_load.py)",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "errors": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.out.with_name(self.out.name + ".tmp")
        temporary.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        temporary.replace(self.out)

    def phase(self, key: str, function, *, estimate_s: float | None = None, into: dict | None = None):
        """Run `function()`, store its dict under `key` (in `into`, else the report): its error instead if it raises,
        or why it was skipped if `estimate_s` would end past the budget."""
        into = self.report if into is None else into
        if estimate_s is not None and self.elapsed() + estimate_s > self.budget_s:
            into[key] = {"skipped": f"budget: {self.elapsed():.0f} s used + about {estimate_s:.0f} s needed > "
                                    f"--budget-s {self.budget_s:.0f}"}
            log(f"{key}: skipped ({into[key]['skipped']})")
            self.write()
            return None
        log(f"{key} ...")
        started = time.perf_counter()
        try:
            result = function()
            into[key] = result
            log(f"{key}: done in {time.perf_counter() - started:.1f} s")
            return result
        except Exception as exc:  # noqa: BLE001 - one phase's failure must not lose the others
            message = f"{type(exc).__name__}: {exc}"
            into[key] = {"error": message, "traceback": traceback.format_exc(limit=8)[-4000:]}
            self.report["errors"][key] = message
            log(f"{key}: FAILED: {message}")
            return None
        finally:
            self.write()


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "numpy"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            found[name] = f"not importable: {type(exc).__name__}: {exc}"
    return found


def host() -> dict:
    import torch

    info = {"kernel": platform.release(), "cpus": os.cpu_count()}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    info["mem_total_gb"] = round(int(line.split()[1]) * 1024 / GB, 1)
    except OSError:
        pass
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def folder_record(folder: Path) -> dict:
    files = folder_files(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder / 'model_index.json'} missing: no saved pipeline to load")
    sizes = {path: path.stat().st_size for path in files}
    largest = max(files, key=sizes.get)
    return {"path": str(folder), "size_gb": round(sum(sizes.values()) / GB, 3), "files": len(files),
            "safetensors_files": sum(path.suffix == ".safetensors" for path in files),
            "largest_file": str(largest.relative_to(folder)), "largest_gb": round(sizes[largest] / GB, 3),
            "filesystem": filesystem_of(folder)}


def measure_load(run: Run, variant: str, folder: Path, device, args, cold: bool, reference: dict) -> dict:
    """Evict (when `cold`), load, checksum against `reference` (filled by the first load when empty), free."""
    require_device(device)
    files = folder_files(folder)
    record: dict = {}
    if cold:
        record["cold"] = make_cold(files, try_drop_caches=not args.no_drop_caches)
    else:
        try:
            record["cache_before"] = residency(files)
        except Exception as exc:  # noqa: BLE001 - the check is optional
            record["cache_before"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        result, pipe = time_load(variant, folder, device, args.threads)
    except BaseException:
        free(device)  # what a failed load left on the device
        raise
    record.update(result)
    log(f"{variant}: {'cold' if cold else 'warm'} load {record['load_s']} s")
    size_gb = (run.report.get("folder") or {}).get("size_gb")
    record["effective_gb_s"] = round(size_gb / record["load_s"], 3) if size_gb and record["load_s"] else None
    try:
        sums = model_checksums(pipe)
        if not reference:
            reference.update(sums)
            record["checksums"] = sums
        mismatched = sorted(name for name in set(sums) | set(reference) if sums.get(name) != reference.get(name))
        record["checksums_match"] = not mismatched
        if mismatched:
            record["checksums_mismatched"] = {name: [sums.get(name), reference.get(name)] for name in mismatched}
    finally:
        del pipe
        free(device)
    return record


def summarize(report: dict) -> dict:
    """The headline numbers in one flat dict."""
    def number(section, *keys):
        value = report.get(section)
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    loads = {name: record.get("load_s") for name, record in (report.get("cold_loads") or {}).items()
             if isinstance(record, dict) and record.get("load_s") is not None}
    fastest = min(loads, key=loads.get) if loads else None
    summary = {
        "folder_size_gb": number("folder", "size_gb"), "files": number("folder", "files"),
        "filesystem": number("folder", "filesystem", "type"),
        "filesystem_warning": number("folder", "filesystem", "warning"),
        "save_s": number("build", "save_s"), "sync_s": number("build", "sync_s"),
        "cold_method": number("cold", "method"), "cold_verified": number("cold", "verified"),
        "disk_read_gb_s": number("disk_read", "gb_s"),
        "disk_read_parallel_gb_s": number("disk_read_parallel", "gb_s"),
        "cold_load_s": loads,
        "cold_breakdown_s": {name: record.get("breakdown_s") for name, record in
                             (report.get("cold_loads") or {}).items() if isinstance(record, dict)
                             and record.get("breakdown_s")},
        "checksums_match": {name: record.get("checksums_match") for name, record in
                            (report.get("cold_loads") or {}).items() if isinstance(record, dict)
                            and "checksums_match" in record},
        "fastest_cold": fastest, "fastest_cold_load_s": loads.get(fastest),
        "warm_variant": number("warm", "variant"), "warm_load_s": number("warm", "load_s"),
        "target_s": TARGET_S,
        "meets_target": (loads[fastest] <= TARGET_S) if fastest else None,
        "errors": sorted(report.get("errors", {})),
    }
    size = summary["folder_size_gb"]
    for key, speed in (("disk_floor_s", "disk_read_gb_s"), ("disk_parallel_floor_s", "disk_read_parallel_gb_s")):
        if size and summary[speed]:
            summary[key] = round(size / summary[speed], 1)  # the whole folder read at that speed
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.cold_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True,
                        help="the saved weights folder (built and saved there when it has no model_index.json)")
    parser.add_argument("--out", type=Path, help="the JSON report (also printed)")
    parser.add_argument("--device", default="cuda:0", help="where to load (default cuda:0)")
    parser.add_argument("--build", default="synthetic:full",
                        help="what to save when the folder has no pipeline (default synthetic:full)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"cold loads, in order (default {','.join(VARIANTS)})")
    parser.add_argument("--threads", type=int, default=8, help="reader threads of the parallel read and prefetch")
    parser.add_argument("--parallel-read-gb", type=float, default=16.0,
                        help="GB read by the parallel disk read (default 16)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip a phase that would end past this many seconds (default 420)")
    parser.add_argument("--no-drop-caches", action="store_true",
                        help="do not try /proc/sys/vm/drop_caches (it empties the whole host's page cache)")
    args = parser.parse_args(argv)
    args.variants = [name for name in args.variants.split(",") if name]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = Run(args.out, args.budget_s)
    report = run.report
    report["argv"] = sys.argv[1:] if argv is None else list(argv)
    log("importing torch, diffusers, transformers")
    import torch
    import diffusers
    import transformers

    # The model classes import lazily: import them now, so that no timed load pays for it.
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401

    from fluxserve.pipeline import finished_time

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    folder = args.folder.expanduser().absolute()
    device = torch.device(args.device)
    report["versions"] = versions()
    run.phase("host", host)

    def start_device() -> dict:
        require_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            started = time.perf_counter()
            torch.zeros(1, device=device)
            return {"device": str(device), "context_s": round(finished_time(device) - started, 3)}
        return {"device": str(device)}

    run.phase("device", start_device)
    if (folder / "model_index.json").is_file():
        report["build"] = {"skipped": f"{folder} already has model_index.json"}
    else:
        run.phase("build", lambda: build_and_save(folder, args.build, device))
    folder_info = run.phase("folder", lambda: folder_record(folder))
    if folder_info and folder_info["filesystem"].get("warning"):
        log(f"WARNING: {folder}: {folder_info['filesystem']['warning']}; the cold loads measure memory, not the disk")
    files = folder_files(folder) if folder_info else []
    run.phase("cold", lambda: make_cold(files, try_drop_caches=not args.no_drop_caches))

    def disk_read() -> dict:
        if not files:
            raise FileNotFoundError(f"no files to read in {folder}")
        largest = max(files, key=lambda path: path.stat().st_size)
        record = {"cold_before": residency([largest])}
        record.update(read_speed(largest))
        evict(largest)
        return record

    run.phase("disk_read", disk_read, estimate_s=30)

    def disk_read_parallel() -> dict:
        if not files:
            raise FileNotFoundError(f"no files to read in {folder}")
        biggest_first = sorted(files, key=lambda path: path.stat().st_size, reverse=True)
        record = {"cold_before": residency(files)}
        record.update(ReadAhead(biggest_first, threads=args.threads,
                                limit_bytes=int(args.parallel_read_gb * GB)).start().join())
        record["after"] = make_cold(files, try_drop_caches=not args.no_drop_caches)
        return record

    run.phase("disk_read_parallel", disk_read_parallel, estimate_s=30)

    report["cold_loads"] = {}
    reference = dict((report.get("build") or {}).get("checksums") or {})
    if reference:
        report["checksum_reference"] = "build"
    size_gb = (folder_info or {}).get("size_gb") or SYNTHETIC_FULL_GB
    disk_gb_s = max([value for value in ((report.get("disk_read") or {}).get("gb_s"),
                                         (report.get("disk_read_parallel") or {}).get("gb_s")) if value] or [1.0])
    for variant in args.variants:
        loads = [r["load_s"] for r in report["cold_loads"].values() if isinstance(r, dict) and "load_s" in r]
        estimate = max(loads) if loads else size_gb / disk_gb_s + 10
        run.phase(variant, lambda variant=variant: measure_load(run, variant, folder, device, args, True, reference),
                  estimate_s=estimate, into=report["cold_loads"])
    if reference and "checksum_reference" not in report:
        report["checksum_reference"] = "first load"

    loads = {name: r["load_s"] for name, r in report["cold_loads"].items() if isinstance(r, dict) and "load_s" in r}
    if loads:
        fastest = min(loads, key=loads.get)
        run.phase("warm", lambda: measure_load(run, fastest, folder, device, args, False, reference),
                  estimate_s=loads[fastest])
    else:
        report["warm"] = {"skipped": "no cold load succeeded"}
    report["summary"] = summarize(report)
    run.write()
    print(json.dumps(report, indent=2, default=str), flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
