"""Where a context-parallel step's time goes: compute against communication, per rank, without the server.

Starts one process per GPU as the served model does (the same `worker.join_and_build`: process group, stack,
warm-up), times `--requests` requests, then runs one more denoising loop under the profiler and splits the device
time of its steps into collectives (NCCL kernels on GPUs; gloo's operators on the CPU) and everything else. A step's wall time
above its compute is communication the GPUs waited for (not overlapped), plus host gaps. Text encoding and the
VAE are timed too: every rank encodes the prompt, only rank 0 decodes. With `--compare`, rank 0 then builds the
same stack in one process and reports the PSNR of the split image against it (on the tests' unit-scale tiny
weights bf16 rounding alone gives 53 dB, the broken splits tests/test_parallel.py names 47 dB or less; synthetic:tiny
shows no bug at all, its blocks' contributions being below bf16's resolution). Prints one JSON line per stack and
rank.

It needs a GPU per rank: NCCL refuses two ranks on one GPU, and gloo with the GPU's tensors, tried on a one-GPU
H200 host (perf/results/h200, session 6), crashed a rank (SIGSEGV).

    python3 -m perf.diagnostics.parallel_step --stacks bf16-cp2,bf16-cp4 --compare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from fluxserve.parallel.group import Timeouts
from fluxserve.parallel.messages import Build
from fluxserve.parallel.worker import join_and_build
from fluxserve.pipeline import build_pipeline, release_memory
from fluxserve.stacks import catalog_by_name
from fluxserve.weights import parse_source
from perf.diagnostics.in_process import add_request_arguments, add_stacks_argument, request_from
from perf.measure import psnr

MULTI_GPU_STACKS = sorted(name for name, stack in catalog_by_name().items() if stack.gpus > 1)
COLLECTIVE_MARKERS = ("nccl", "gloo", "all_to_all", "alltoall", "all_gather", "allgather", "broadcast")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.parallel_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stacks_argument(parser, MULTI_GPU_STACKS, "multi-GPU")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compare", action="store_true",
                        help="rank 0 also builds the stack in one process: PSNR of the split image against it")
    add_request_arguments(parser, requests=2)
    return parser.parse_args(argv)


def is_collective(name: str) -> bool:
    return any(marker in name.lower() for marker in COLLECTIVE_MARKERS)


def split_device_time_ms(events, on_gpu: bool) -> dict[str, float]:
    """Summed time of the profile's device kernels (GPU) or top-level operators (CPU), collectives apart."""
    totals = {"collective_ms": 0.0, "compute_ms": 0.0}
    for event in events:
        if on_gpu:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            duration = event.device_time_total
        else:
            if event.cpu_parent is not None or event.device_type != torch.autograd.DeviceType.CPU:
                continue
            duration = event.cpu_time_total
        totals["collective_ms" if is_collective(event.name) else "compute_ms"] += duration / 1e3
    return totals


@torch.inference_mode()
def measure(rank: int, world_size: int, stack_name: str, args: argparse.Namespace, rendezvous: str) -> dict:
    """One rank: build as a worker does, time the requests, profile one denoising loop; figures per step."""
    from torch.profiler import ProfilerActivity, profile

    stack = catalog_by_name()[stack_name]
    device = "cpu" if args.device == "cpu" else f"cuda:{rank}"
    request = request_from(args)
    pipeline = join_and_build(Build(stack.to_parameters(), args.weights, rank, world_size, device, rendezvous,
                                    request, Timeouts().load_s))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    generations = [pipeline.generate(request, decode=rank == 0) for _ in range(args.requests)]
    steps = sum(generation.steps_run for generation in generations)
    embeddings = pipeline._encode(request.prompt)
    with profile(activities=activities) as profiler:
        _, profiled_steps = pipeline._denoise(embeddings, request, should_stop=None)
        pipeline._sync()
    split = {key: value / profiled_steps for key, value in
             split_device_time_ms(profiler.events(), args.device == "cuda").items()}
    timings = {phase: sum(g.timings_ms.get(phase, 0.0) for g in generations) / len(generations)
               for phase in ("text_encode", "denoise", "vae_decode")}
    report = {
        "stack": stack_name, "rank": rank, "world_size": world_size, "device": device,
        "size": args.size, "steps": args.steps, "requests": args.requests,
        "step_ms": round(timings["denoise"] * len(generations) / steps, 3),
        "collective_ms_per_step": round(split["collective_ms"], 3),
        "compute_ms_per_step": round(split["compute_ms"], 3),
        "text_encode_ms": round(timings["text_encode"], 3), "vae_decode_ms": round(timings["vae_decode"], 3),
        "steps_computed": [generation.steps_computed for generation in generations],
        "peak_memory_gib": pipeline.peak_memory_gib(),
    }
    if args.compare and rank == 0:
        report["psnr_vs_one_process_db"] = psnr_against_one_process(pipeline, stack, args, generations[0].image)
    return report


def psnr_against_one_process(pipeline, stack, args: argparse.Namespace, image) -> float:
    """The same request on the same stack built without context parallelism, in this process."""
    single = dataclasses.replace(stack, parallel="none", parallel_degree=1)
    request = request_from(args)
    reference = build_pipeline(single, parse_source(args.weights), pipeline.device, request).generate(request).image
    release_memory(pipeline.device)
    return round(psnr(image, reference), 2)


def run_rank(rank: int, world_size: int, stack_name: str, args: argparse.Namespace, rendezvous: str) -> None:
    print(json.dumps(measure(rank, world_size, stack_name, args, rendezvous)), flush=True)
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in args.stacks:
        world_size = catalog_by_name()[name].gpus
        with tempfile.TemporaryDirectory() as folder:
            torch.multiprocessing.spawn(run_rank, args=(world_size, name, args, str(Path(folder) / "rendezvous")),
                                        nprocs=world_size, join=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
