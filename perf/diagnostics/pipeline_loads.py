"""The saved pipeline for perf/diagnostics/cold_load.py: building and saving one, loading it by each variant (timed
until it is on the device), checksumming its models, and what a load leaves in host and device memory."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import time
from pathlib import Path

from perf.diagnostics.page_cache import GB, folder_files

VARIANTS = ("load_pipeline", "onto_device_no_read_ahead", "cpu_then_to")


def model_checksums(pipe) -> dict[str, str]:
    """Per model of the pipeline, a digest of its state dict: names, shapes and, per tensor, the exact integer sum
    of its values' float32 bit patterns (independent of the dtype a model keeps a layer in: bf16 -> fp32 is exact)."""
    import torch

    digests = {}
    for name, component in sorted(pipe.components.items()):
        if not isinstance(component, torch.nn.Module):
            continue
        digest = hashlib.sha256()
        with torch.no_grad():
            for key, tensor in sorted(component.state_dict().items()):
                if tensor.is_floating_point():
                    total = tensor.detach().float().contiguous().view(torch.int32).sum(dtype=torch.int64)
                else:
                    total = tensor.detach().to(torch.int64).sum()
                digest.update(f"{key}:{tuple(tensor.shape)}:{int(total.item())};".encode())
        digests[name] = digest.hexdigest()[:16]
    return digests


def pipeline_bytes(pipe) -> int:
    import torch

    return sum(tensor.numel() * tensor.element_size() for component in pipe.components.values()
               if isinstance(component, torch.nn.Module) for tensor in component.state_dict().values())


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def rss_gb() -> dict:
    """This process's resident memory, GB: anonymous (copies: tensors in host memory) and file-backed (mapped
    files: safetensors' mmap)."""
    found = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    found[key] = round(int(line.split()[1]) * 1024 / GB, 3)
    except OSError:
        pass
    return found


def save_pipeline(pipe, folder: Path) -> dict:
    """`pipe.save_pretrained` into FOLDER.partial, flushed to the disk, then renamed FOLDER: a save cut short never
    leaves a FOLDER with model_index.json and missing shards."""
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    started = time.perf_counter()
    pipe.save_pretrained(partial)
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - started
    if folder.exists():
        folder.rmdir()  # checked empty by the caller
    partial.rename(folder)
    return {"save_s": round(save_s, 3), "sync_s": round(sync_s, 3)}


def require_device(device) -> None:
    import torch

    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"needs a CUDA GPU for --device {device}, and torch.cuda.is_available() is False on this "
                           "host: this phase loads onto the GPU (--device cpu runs it on the CPU)")


def build_and_save(folder: Path, build: str, device) -> dict:
    """Build `build` (a synthetic:SIZE source) on `device`, checksum it, save it as `folder`, free the device."""
    import torch

    from fluxserve.pipeline import finished_time
    from fluxserve.weights import load_pipeline, parse_source

    require_device(device)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists without model_index.json and is not empty: not overwriting it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = load_pipeline(parse_source(build), torch.bfloat16, device)
    try:
        record = {"source": build, "build_s": round(finished_time(device) - started, 3)}
        size = pipeline_bytes(pipe)
        free_bytes = shutil.disk_usage(folder.parent).free
        if free_bytes < size * 1.05:
            raise OSError(f"{folder.parent} has {free_bytes / GB:.1f} GB free, the pipeline needs {size / GB:.1f} GB")
        record["checksums"] = model_checksums(pipe)
        record.update(save_pipeline(pipe, folder))
    finally:
        del pipe
        free(device)
    record["size_gb"] = round(sum(path.stat().st_size for path in folder_files(folder)) / GB, 3)
    return record


def time_load(variant: str, folder: Path, device, threads: int) -> tuple[dict, object]:
    """One load of `folder` onto `device` by `variant`: its time (until on the device), breakdown and the pipeline."""
    import torch

    from fluxserve import weights
    from fluxserve.pipeline import finished_time

    require_device(device)
    source = weights.parse_source(str(folder))
    dtype = torch.bfloat16
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record: dict = {"variant": variant}
    started = time.perf_counter()
    if variant == "load_pipeline":
        pipe = weights.load_pipeline(source, dtype, device)
        loaded = finished_time(device)
    elif variant == "cpu_then_to":
        pipe = weights.load_to_cpu(source, dtype)
        on_cpu = time.perf_counter()
        record["rss_gb_on_cpu"] = rss_gb()
        pipe.to(device)
        loaded = finished_time(device)
        record["breakdown_s"] = {"from_pretrained_cpu": round(on_cpu - started, 3),
                                 "to_device": round(loaded - on_cpu, 3)}
    elif variant == "onto_device_no_read_ahead":
        timings: dict[str, float] = {}
        pipe = weights.load_onto_device(source, dtype, device, timings=timings, read_ahead_threads=0)
        loaded = finished_time(device)
        record["breakdown_s"] = timings
    else:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    record["load_s"] = round(loaded - started, 3)
    record["on_device"] = sorted({str(p.device) for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                                  for p in c.parameters()})
    if device.type == "cuda":
        record["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / GB, 3)
    record["rss_gb"] = rss_gb()
    return record, pipe
