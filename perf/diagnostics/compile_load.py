"""Where a compiled stack's load time goes, in one fresh process, without the server.

Run it twice with the same TORCHINDUCTOR_CACHE_DIR and FLUXSERVE_AOT_PACKAGES (cold caches, then warm) to see what a second load redoes
(perf/diagnostics/compile_loads.sh does both). Prints one JSON line: the load's phases, what torch.compile compiled
and what its caches served, and a few requests' latency; with --sizes, then the first request at each of those sizes
(its latency and what it compiled). Run once with --static-shapes and once without to compare code specialised to
the warm-up size with code that serves every size (`optimizations.apply.apply_compile`), at the timed size and at new ones.

    python3 -m perf.diagnostics.compile_load --stack bf16-cudnn-fp8-fusedqkv-compile-regional
    python3 -m perf.diagnostics.compile_load --stack STACK --static-shapes --sizes 512x512,768x1344
    python3 -m perf.diagnostics.compile_load --stack STACK --warm-up-sizes 512x512,768x1344 --profile load.txt
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import logging
import os
import pstats
import time

import torch

from fluxserve.optimizations.aot_blocks import PACKAGES_ENV
from fluxserve.contract import Limits, parse_sizes
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import catalog_by_name
from fluxserve.weights import parse_source
from perf.diagnostics.in_process import add_request_arguments, request_from


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.compile_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", required=True, choices=sorted(catalog_by_name()), metavar="STACK")
    add_request_arguments(parser, requests=3)
    parser.add_argument("--static-shapes", action="store_true",
                        help="compile for the warm-up size alone, as the stacks did before dynamic shapes")
    for flag, help in (("--sizes", "after the timed requests, one request at each of these sizes"),
                       ("--warm-up-sizes", "other sizes the load warms up at, as the server's do"),
                       ("--specialised-sizes", "sizes the load also compiles code for alone")):
        parser.add_argument(flag, type=lambda text, flag=flag: size_list(text, flag), default=[], metavar="HxW,...",
                            help=help)
    parser.add_argument("--profile", metavar="FILE", help="write the load's cProfile (top functions by cumulative "
                        "time) and torch.compile's own phase times to FILE")
    return parser.parse_args(argv)


def size_list(text: str, flag: str) -> list[tuple[int, int]]:
    """argparse type of a list of sizes: the contract's own check, its message naming the flag."""
    try:
        return parse_sizes(text, Limits(), field=flag)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def write_profile(profiler: cProfile.Profile, path: str) -> None:
    """The load's hot spots (cumulative time, top 80) and torch.compile's phase times (`compile_times`)."""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(80)
    with open(path, "w") as out:
        out.write(text.getvalue())
        out.write("\n# torch._dynamo.utils.compile_times()\n")
        out.write(torch._dynamo.utils.compile_times(repr="str"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stack = catalog_by_name()[args.stack]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    request = request_from(args)
    profiler = cProfile.Profile() if args.profile else contextlib.nullcontext()
    started = time.perf_counter()
    with profiler:
        pipeline = build_pipeline(stack, parse_source(args.weights), device, warm_up=request,
                                  warm_up_sizes=args.warm_up_sizes, dynamic_shapes=not args.static_shapes,
                                  specialised_sizes=args.specialised_sizes)
    load_s = time.perf_counter() - started
    if args.profile:
        write_profile(profiler, args.profile)
    latencies = []
    for _ in range(args.requests):
        started = time.perf_counter()
        generation = pipeline.generate(request)
        latencies.append(round(time.perf_counter() - started, 3))
    first_at_size = {}
    for height, width in args.sizes:
        started = time.perf_counter()
        at_size = pipeline.generate(dataclasses.replace(request, height=height, width=width))
        first_at_size[f"{height}x{width}"] = {"latency_s": round(time.perf_counter() - started, 3),
                                              "compiled": at_size.compiled}
    print(json.dumps({
        "stack": stack.name,
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(default)"),
        "aot_packages": os.environ.get(PACKAGES_ENV, "(default)"), "load_s": round(load_s, 3),
        "shapes": "static" if args.static_shapes else "dynamic",
        "specialised_sizes": [f"{height}x{width}" for height, width in pipeline.specialised_sizes],
        "first_request_at_size": first_at_size,
        "load_phases_s": pipeline.load_phases, "compile_stats": pipeline.compile_stats,
        "latencies_s": latencies, "steps_computed": generation.steps_computed if latencies else None,
        "peak_memory_gib": pipeline.peak_memory_gib(),
    }), flush=True)


if __name__ == "__main__":
    main()
