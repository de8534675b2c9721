"""A step-cache stack replayed from CUDA graphs against the same stack without them, in one process: steps computed,
latency, where a request's time goes, load time and the PSNR of the graphed image against the ungraphed one. The
ungraphed version is the stack with `cuda_graph` off, built from its fields (it need not be in the catalog): it runs
diffusers' hooks, with its own compiled code. So the graphed stack's image is also compared with the same pipeline's
steps run without replaying their graphs (`eager_forward`): a graph must not change the image. Then the step budget:
a computed and a skipped forward timed alone (`step_cost`, two more requests), and the P50 against steps computed x
a computed forward + the time outside the loop. Prints one JSON line per stack and version.

    python3 -m perf.diagnostics.graphed_caches \\
        --stacks bf16-fp8attn-magcache-0.24-fp8row-fusedgelu-fusedqkv-compile-regional-cudagraph --requests 10
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time

import numpy as np
import torch

from fluxserve.optimizations.cuda_graph import eager_forward
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import catalog_by_name
from fluxserve.weights import parse_source
from perf import LatencySummary
from perf.diagnostics.in_process import add_request_arguments, add_stacks_argument, request_from
from perf.diagnostics.step_cost import forward_times_ms, rounded_median
from perf.measure import psnr

GRAPHED_CACHE_STACKS = sorted(name for name, stack in catalog_by_name().items()
                              if stack.cuda_graph and stack.cache != "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.graphed_caches", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stacks_argument(parser, GRAPHED_CACHE_STACKS, "graphed step-cache")
    add_request_arguments(parser, requests=10)
    parser.add_argument("--out", help="also write every line's object to this JSON file")
    return parser.parse_args(argv)


def measure(stack, weights, device: torch.device, request, requests: int) -> tuple[dict, np.ndarray]:
    """Load the stack (warm-up at the request's size), then time `requests` requests; returns the row and the image."""
    started = time.perf_counter()
    pipeline = build_pipeline(stack, weights, device, warm_up=request, specialised_sizes=[(request.height,
                                                                                             request.width)])
    load_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats(device)
    latencies, generations = [], []
    for _ in range(requests):
        started = time.perf_counter()
        generations.append(pipeline.generate(request))
        latencies.append(time.perf_counter() - started)
    timings = {phase: round(statistics.median(g.timings_ms[phase] for g in generations), 2)
               for phase in generations[0].timings_ms}
    latency = LatencySummary.of(latencies)
    row = {
        "stack": stack.name, "graphed": stack.cuda_graph, "device": pipeline.device_name, "size": request.height,
        "steps": request.steps, "steps_computed": generations[-1].steps_computed, "requests": requests,
        "min_s": round(latency.min, 4), "p50_s": round(latency.p50, 4), "max_s": round(max(latencies), 4),
        "p99_over_p50": round(latency.p99 / latency.p50, 3),
        "timings_ms_median": timings, "load_s": round(load_s, 1), "load_phases": pipeline.load_phases,
        "peak_memory_gib": pipeline.peak_memory_gib(),
        "compiled_while_serving": [g.compiled for g in generations if g.compiled],
    }
    image = generations[-1].image
    forwards = forward_times_ms(pipeline, request, 2)
    computed_ms, skipped_ms = rounded_median(forwards["computed"]), rounded_median(forwards["skipped"])
    outside_s = row["p50_s"] - timings["denoise"] / 1000
    budget_s = row["steps_computed"] * computed_ms / 1000 + outside_s
    row.update(computed_forward_ms=computed_ms, skipped_forward_ms=skipped_ms, outside_loop_s=round(outside_s, 4),
               budget_s=round(budget_s, 4), p50_over_budget=round(row["p50_s"] / budget_s - 1, 4))
    if stack.cuda_graph:
        with eager_forward(pipeline.pipe.transformer):
            row["psnr_vs_steps_without_graphs_db"] = round(psnr(image, pipeline.generate(request).image), 2)
    del pipeline, generations
    gc.collect()
    torch.cuda.empty_cache()
    return row, image


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda")
    weights = parse_source(args.weights)
    request = request_from(args)
    rows = []
    for name in args.stacks:
        graphed = catalog_by_name()[name]
        plain_row, plain_image = measure(dataclasses.replace(graphed, cuda_graph=False), weights, device, request,
                                         args.requests)
        graphed_row, graphed_image = measure(graphed, weights, device, request, args.requests)
        graphed_row["psnr_vs_ungraphed_db"] = round(psnr(graphed_image, plain_image), 2)
        graphed_row["p50_vs_ungraphed"] = round(graphed_row["p50_s"] / plain_row["p50_s"], 4)
        for row in (plain_row, graphed_row):
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
