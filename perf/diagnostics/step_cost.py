"""What a skipped step costs against a computed one, timed step by step in one process, without the server.

The results' fits charge skipped steps with the difference between two runs' denoising loops, so 1% of noise in
either run moves the estimate by several milliseconds per skipped step. This times every transformer forward of
a request on its own, from the device being idle to it finishing that forward, and tells computed from skipped
forwards by the pipeline's step counter (the blocks really ran or not). What happens between two forwards (the
scheduler's update of the latents) is the same for both kinds and is left out. Prints one JSON line per stack.

    python3 -m perf.diagnostics.step_cost --stacks bf16-teacache-0.4,bf16-magcache-0.06
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from fluxserve.contract import GenerationRequest
from fluxserve.pipeline import StackPipeline, build_pipeline, compile_counters, finished_time
from fluxserve.stacks import catalog_by_name
from fluxserve.weights import parse_source
from perf.diagnostics.in_process import add_request_arguments, add_stacks_argument, request_from

CACHE_STACKS = sorted(name for name, stack in catalog_by_name().items() if stack.cache != "none" and stack.gpus == 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.step_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stacks_argument(parser, CACHE_STACKS, "step-cache")
    add_request_arguments(parser, requests=2)
    return parser.parse_args(argv)


def forward_times_ms(pipeline: StackPipeline, request: GenerationRequest, requests: int) -> dict[str, list[float]]:
    """Each transformer forward of `requests` requests, in ms, as {"computed": [...], "skipped": [...]}."""
    times: dict[str, list[float]] = {"computed": [], "skipped": []}
    started = {}

    def before(module, args) -> None:
        started["count"], started["time"] = pipeline.steps.count, finished_time(pipeline.device)

    def after(module, args, output) -> None:
        kind = "computed" if pipeline.steps.count > started["count"] else "skipped"
        times[kind].append((finished_time(pipeline.device) - started["time"]) * 1e3)

    transformer = pipeline.pipe.transformer
    handles = [transformer.register_forward_pre_hook(before), transformer.register_forward_hook(after)]
    try:
        for _ in range(requests):
            pipeline.generate(request)
    finally:
        for handle in handles:
            handle.remove()
    return times


def rounded_median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = parse_source(args.weights)
    request = request_from(args)
    for name in args.stacks:
        started = time.perf_counter()
        pipeline = build_pipeline(catalog_by_name()[name], weights, device, warm_up=request)
        load_s = time.perf_counter() - started
        before = compile_counters()
        times = forward_times_ms(pipeline, request, args.requests)
        compiled = {key: value - before[key] for key, value in compile_counters().items() if value != before[key]}
        computed, skipped = rounded_median(times["computed"]), rounded_median(times["skipped"])
        print(json.dumps({
            "stack": name, "device": pipeline.device_name, "requests": args.requests, "steps": args.steps,
            "computed": len(times["computed"]), "skipped": len(times["skipped"]),
            "computed_ms_median": computed, "skipped_ms_median": skipped,
            "skipped_vs_computed": round(skipped / computed, 4) if computed and skipped is not None else None,
            "load_s": round(load_s, 1),
            "compiled_while_serving": compiled,  # torch.compile's counters that moved during the timed requests
        }), flush=True)
        del pipeline
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
