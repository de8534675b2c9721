"""Where a denoising step's GPU time goes, kernel by kernel, for stacks built in-process (no server).

The fastest uncached stack runs about 100 ms a step where the arithmetic of fp8 linears and attention needs about
65-75 ms (perf/results/h200, "How far 2.25x is from the floor"). This runs a few denoising steps of each stack under
torch.profiler, with the transformer's CUDA graph paused so each kernel is seen on its own (the graph replays the
same kernels), and reports per step: the device time of each kernel family (matmuls, attention, Inductor's
generated kernels, the rest), the largest kernels, and the matmul ops by input shape (which layer costs what).
Prints one JSON line per stack (and writes them to `--out`).

    python3 -m perf.diagnostics.step_profile --stacks bf16-fp8attn-fp8row-fusedqkv-compile-regional-cudagraph
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fluxserve.optimizations.cuda_graph import eager_forward
from fluxserve.pipeline import build_pipeline, finished_time
from fluxserve.stacks import catalog_by_name
from fluxserve.weights import parse_source
from perf.diagnostics.in_process import (
    add_request_arguments,
    add_stacks_argument,
    request_from,
)

# Kernel families by name, first match wins. cuDNN's attention kernels carry "sdpa"/"fmha"/"flash" in their names;
# cuBLAS's and CUTLASS's matmuls (torchao's fp8 per-row matmul is CUTLASS) "gemm", "nvjet", "xmma" or "cutlass".
FAMILIES = (
    ("attention", re.compile(r"sdpa|fmha|flash|attention", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|_mm_|scaled_mm", re.I)),
    ("inductor_reduction", re.compile(r"^triton_(red|per)_")),
    ("inductor_pointwise", re.compile(r"^triton_")),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
)
MATMUL_OPS = ("aten::_scaled_mm", "aten::mm", "aten::addmm", "aten::bmm")  # the ops that launch the kernels


def family(kernel: str) -> str:
    return next((name for name, pattern in FAMILIES if pattern.search(kernel)), "other")


def summarize(prof, steps: int, top: int) -> dict:
    """Per-step device time by kernel family, the `top` kernels, and the matmul ops by input shape."""
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        # "## Call CompiledFxGraph ... ##" and other annotations also lie on the device's timeline: not kernels.
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith("##"):
            entry = kernels[event.name]
            entry[0] += 1
            entry[1] += event.device_time
    families: dict[str, float] = collections.Counter()
    for name, (_, total_us) in kernels.items():
        families[family(name)] += total_us
    largest = sorted(kernels.items(), key=lambda item: -item[1][1])[:top]
    matmuls = [
        {"op": average.key, "shapes": str(average.input_shapes)[:160], "calls_per_step": round(average.count / steps, 2),
         "ms_per_step": round(average.device_time_total / steps / 1e3, 3),
         "us_per_call": round(average.device_time_total / max(average.count, 1), 1)}
        for average in prof.key_averages(group_by_input_shape=True) if average.key in MATMUL_OPS
    ]
    return {
        "device_ms_per_step": round(sum(families.values()) / steps / 1e3, 2),
        "families_ms_per_step": {name: round(us / steps / 1e3, 2) for name, us in families.most_common()},
        "top_kernels": [{"kernel": name[:140], "family": family(name), "calls_per_step": round(count / steps, 2),
                         "ms_per_step": round(total / steps / 1e3, 3), "us_per_call": round(total / count, 1)}
                        for name, (count, total) in largest],
        "matmuls_by_shape": sorted(matmuls, key=lambda row: -row["ms_per_step"])[:top],
    }


def profiled_steps(pipeline, request, eager: bool):
    """Denoise `request` (a few steps) once unprofiled, then once under the profiler; returns the profile and the
    profiled run's wall time. `eager` pauses the transformer's CUDA graph."""
    with torch.inference_mode(), (eager_forward(pipeline.pipe.transformer) if eager else contextlib.nullcontext()):
        embeddings = pipeline._encode(request.prompt)
        pipeline._denoise(embeddings, request, should_stop=None)  # warm this path's allocations
        finished_time(pipeline.device)
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if pipeline.device.type == "cuda"
                                                         else [])], record_shapes=True) as prof:
            started = time.perf_counter()
            pipeline._denoise(embeddings, request, should_stop=None)
            finished_time(pipeline.device)
            wall_s = time.perf_counter() - started
    return prof, wall_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.step_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stacks_argument(parser, sorted(n for n, s in catalog_by_name().items() if s.gpus == 1), "one-GPU")
    add_request_arguments(parser, requests=1)
    parser.add_argument("--profiled-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    request = request_from(args)
    lines = []
    for name in args.stacks:
        started = time.perf_counter()
        pipeline = build_pipeline(catalog_by_name()[name], parse_source(args.weights), device, warm_up=request)
        load_s = time.perf_counter() - started
        latencies, timings = [], {}
        for _ in range(args.requests):
            started = time.perf_counter()
            timings = pipeline.generate(request).timings_ms
            latencies.append(time.perf_counter() - started)
        line = {"stack": name, "device": pipeline.device_name, "torch": torch.__version__, "load_s": round(load_s, 1),
                "latency_s": [round(value, 3) for value in latencies], "timings_ms": timings,
                "denoise_ms_per_step": round(timings["denoise"] / args.steps, 2), "profiled_steps": args.profiled_steps}
        few = dataclasses.replace(request, steps=args.profiled_steps)
        # As served (a CUDA graph replays each step, where the stack has one): device time and wall time per step.
        prof, wall_s = profiled_steps(pipeline, few, eager=False)
        replayed = summarize(prof, args.profiled_steps, 0)
        line["as_served"] = {"wall_ms_per_step": round(wall_s * 1e3 / args.profiled_steps, 2),
                             "device_ms_per_step": replayed["device_ms_per_step"],
                             "families_ms_per_step": replayed["families_ms_per_step"]}
        # Kernel by kernel: the graph paused, so each kernel and the op that launched it are seen.
        prof, _ = profiled_steps(pipeline, few, eager=True)
        line.update(summarize(prof, args.profiled_steps, args.top))
        print(json.dumps(line), flush=True)
        lines.append(line)
        del pipeline, prof
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as file:
            file.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
