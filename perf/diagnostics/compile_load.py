"""Where a compiled stack's load time goes, in one fresh process, without the server.

Run it twice with the same TORCHINDUCTOR_CACHE_DIR (cold caches, then warm) to see what a second load redoes;
`--without-quantized-options` compiles a quantized stack without torchao's Inductor options (coordinate-descent
tuning benchmarks every generated kernel on the GPU, the suspect for fp8's slow warm loads). Prints one JSON line:
the load's phases, what torch.compile compiled and what its caches served, and a few requests' latency.

    python3 -m perf.diagnostics.compile_load --stack bf16-cudnn-fp8-fusedqkv-compile-regional
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from unittest import mock

import torch

from fluxserve import optimize
from fluxserve.contract import GenerationRequest
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import catalog_by_name
from fluxserve.weights import ENV_VAR, parse_source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.compile_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", required=True, choices=sorted(catalog_by_name()), metavar="STACK")
    parser.add_argument("--weights", default=os.environ.get(ENV_VAR, "synthetic:full"))
    parser.add_argument("--size", type=int, default=1024, help="image height and width (default 1024)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=3, help="timed requests after the load (default 3)")
    parser.add_argument("--without-quantized-options", action="store_true",
                        help="compile a quantized stack without torchao's Inductor options")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stack = catalog_by_name()[args.stack]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    request = GenerationRequest(prompt="a lighthouse on a cliff at dusk", seed=0, steps=args.steps, guidance=3.5,
                                height=args.size, width=args.size)
    without = mock.patch.dict(optimize.QUANTIZED_COMPILE_OPTIONS, clear=True)
    with without if args.without_quantized_options else nullcontext():
        started = time.perf_counter()
        pipeline = build_pipeline(stack, parse_source(args.weights), device, warm_up=request)
        load_s = time.perf_counter() - started
    latencies = []
    for _ in range(args.requests):
        started = time.perf_counter()
        generation = pipeline.generate(request)
        latencies.append(round(time.perf_counter() - started, 3))
    print(json.dumps({
        "stack": stack.name,
        "quantized_options": stack.quantization != "none" and not args.without_quantized_options,
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(default)"), "load_s": round(load_s, 3),
        "load_phases_s": pipeline.load_phases, "compile_stats": pipeline.compile_stats,
        "latencies_s": latencies, "steps_computed": generation.steps_computed if latencies else None,
    }), flush=True)


if __name__ == "__main__":
    main()
