"""The GPU profiles (`PROFILES`): the nodes each runs on, what a pod serves there and on which GPUs; and
`plan_for`, which checks a profile against the catalog, the GPU and the measurements and derives what its pods
need (GPUs, memory, startup probe, queue-time target)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..contract import Limits
from ..server.placement import Placement, check_placement
from ..stacks import Stack, catalog_by_name
from .image import EXIT_TIMEOUT_S
from .measurements import (REFERENCE_STACK, RESULTS_CSV, Measurement, cold_start_loads, measured_as, measurements,
                           startup_load_s)

# Startup: weights are read from the volume once per node, then from the page cache. 34 GB at 200 MB/s, a
# conservative network-volume rate; then each instance's measured cold load (compile caches empty, so the first
# pod fills them), scaled to the GPU by the reference stack's latency, times a margin.
FLUX_DEV_BYTES = 34e9
VOLUME_READ_BYTES_PER_S = 200e6
LOAD_MARGIN = 2.0
PROBE_PERIOD_S = 10
PRE_STOP_S = 10  # endpoints drop a terminating pod before Triton stops taking requests
GRACE_SLACK_S = 20

# Memory. GPU: each instance holds its own weights; a GPU's instances (measured peak, plus a CUDA context each)
# must fit in this fraction of it. Host: from_pretrained builds the pipeline in host memory before moving it to
# the GPU, one checkpoint per weight copy (each GPU of a context-parallel instance holds one), plus the server.
GPU_MEMORY_FRACTION = 0.9
CUDA_CONTEXT_GIB = 1.0
HOST_GIB_PER_WEIGHT_COPY = 40
HOST_BASE_GIB = 8
# /dev/shm: the Python backend passes each request's tensors through shared memory; the largest response is an
# IMAGE and its PNG at the contract's maximum size. This many of them per instance, at least the floor.
SHM_RESPONSES_PER_INSTANCE = 8
SHM_FLOOR_GIB = 1


class ProfileError(ValueError):
    """A profile that cannot be deployed: unknown stack, a stack on a GPU below its compute capability, a GPU
    over-committed."""


@dataclass(frozen=True)
class Model:
    """A stack a pod serves, and its instances: each a tuple of the pod's GPU ids (the launcher's `--gpus`)."""

    stack: str
    instances: Placement


@dataclass(frozen=True)
class GpuProfile:
    """One GPU type: the nodes it runs on, what a pod serves there, how far the autoscaler may go."""

    name: str
    gpu: str
    products: tuple[str, ...]  # values of nvidia.com/gpu.product
    memory_gib: float  # per GPU, as nvidia-smi reports it
    compute_capability: tuple[int, int]
    models: tuple[Model, ...]  # the first is the throughput model: the autoscaler's target is its latency
    # The seed benchmark's BF16 P50 on this GPU (by hand, without a server); None where results.csv measured it.
    seed_bf16_p50_s: float | None
    max_replicas: int = 4


def on_every_gpu(stack: str, gpus: int) -> Model:
    return Model(stack, tuple((gpu,) for gpu in range(gpus)))


def over_gpus(stack: str, gpus: int) -> Model:
    return Model(stack, (tuple(range(gpus)),))


FASTEST = "bf16-cudnn-fp8row-fusedqkv-compile-regional-cudagraph"  # fastest uncached stack measured (fp8 linear layers)
FASTEST_WITHOUT_FP8 = "bf16-compile-regional"
FASTEST_CACHE = "bf16-fp8attn-magcache-0.24-fp8row-fusedgelu-fusedqkv-compile-regional-cudagraph"  # of any kind

# Two GPUs per pod: the throughput stack on each GPU, and a context-parallel stack over both for lower latency
# per image (the DESIGN probe: Ulysses scales well to 2 GPUs, poorly past); on the H200's 141 GB also the
# fastest image of any kind measured (a step cache). 80 GB GPUs hold two stacks each, so the A100 has no room for
# a third.
PROFILES: tuple[GpuProfile, ...] = (
    GpuProfile(
        name="a100-80gb", gpu="NVIDIA A100 80GB", products=("NVIDIA-A100-SXM4-80GB",), memory_gib=80.0,
        compute_capability=(8, 0), seed_bf16_p50_s=15.66,
        models=(on_every_gpu(FASTEST_WITHOUT_FP8, 2), over_gpus("bf16-cp2", 2)),
    ),
    GpuProfile(
        name="h100-80gb", gpu="NVIDIA H100 80GB HBM3", products=("NVIDIA-H100-80GB-HBM3",), memory_gib=79.6,
        compute_capability=(9, 0), seed_bf16_p50_s=7.09,
        models=(on_every_gpu(FASTEST, 2), over_gpus(f"{FASTEST}-cp2", 2)),
    ),
    GpuProfile(
        name="h200", gpu="NVIDIA H200", products=("NVIDIA-H200",), memory_gib=140.4,
        compute_capability=(9, 0), seed_bf16_p50_s=None,
        models=(on_every_gpu(FASTEST, 2), over_gpus(f"{FASTEST}-cp2", 2),
                on_every_gpu(FASTEST_CACHE, 2)),
    ),
)


@dataclass(frozen=True)
class Plan:
    """What a profile's pods need, derived and checked (`plan_for`)."""

    profile: GpuProfile
    stacks: tuple[Stack, ...]
    gpus: int  # per pod
    weight_copies: int  # one per GPU of each instance
    slowdown: float  # this GPU's latency over the H200's, for the reference stack
    startup_s: int
    queue_target_s: float
    memory_gib: int
    shm_gib: int

    @property
    def name(self) -> str:
        return f"fluxserve-{self.profile.name}"

    @property
    def grace_s(self) -> int:
        return PRE_STOP_S + EXIT_TIMEOUT_S + GRACE_SLACK_S


def plan_for(profile: GpuProfile, measured: dict[str, Measurement] | None = None,
             cold: dict[str, float] | None = None) -> Plan:
    """Check `profile` against the catalog, the GPU and the measurements, and derive what its pods need."""
    measured = measurements() if measured is None else measured
    cold = cold_start_loads() if cold is None else cold
    catalog = catalog_by_name()
    unknown = [model.stack for model in profile.models if model.stack not in catalog]
    if unknown:
        raise ProfileError(f"profile {profile.name}: not in the catalog: {', '.join(unknown)}")
    stacks = tuple(catalog[model.stack] for model in profile.models)
    beyond_gpu = [stack for stack in stacks
                  if stack.capability_need and profile.compute_capability < stack.capability_need.capability]
    if beyond_gpu:
        capability = ".".join(map(str, profile.compute_capability))
        raise ProfileError(f"profile {profile.name}: {profile.gpu} (compute capability {capability}) cannot load "
                           + "; ".join(f"{stack.name}: {stack.capability_need}" for stack in beyond_gpu))
    for model, stack in zip(profile.models, stacks):
        check_placement(model.instances, stack.gpus, stack.name)
        if measured_as(stack) not in measured:
            raise ProfileError(f"profile {profile.name}: {stack.name} has no measured load in {RESULTS_CSV.name} "
                               f"(nor its one-GPU twin): its startup probe cannot be sized")
    used = sorted({gpu for model in profile.models for gpus in model.instances for gpu in gpus})
    if used != list(range(len(used))):
        raise ProfileError(f"profile {profile.name}: GPUs {used} are not 0..N-1, the ids a pod's N GPUs have")
    for gpu in used:
        on_gpu = [stack for model, stack in zip(profile.models, stacks) for gpus in model.instances if gpu in gpus]
        need = sum(measured[measured_as(stack)].peak_gib + CUDA_CONTEXT_GIB for stack in on_gpu)
        if need > GPU_MEMORY_FRACTION * profile.memory_gib:
            raise ProfileError(f"profile {profile.name}: GPU {gpu} needs {need:.1f} GiB for "
                               f"{', '.join(s.name for s in on_gpu)}; {GPU_MEMORY_FRACTION:.0%} of "
                               f"{profile.memory_gib} GiB is the most it may hold")
    reference = measured[REFERENCE_STACK].p50_s
    slowdown = profile.seed_bf16_p50_s / reference if profile.seed_bf16_p50_s else 1.0
    loads = sum(startup_load_s(stack, measured, cold) for model, stack in zip(profile.models, stacks)
                for _ in model.instances)
    startup = FLUX_DEV_BYTES / VOLUME_READ_BYTES_PER_S + LOAD_MARGIN * slowdown * loads
    instances = sum(len(model.instances) for model in profile.models)
    weight_copies = sum(len(gpus) for model in profile.models for gpus in model.instances)
    response_bytes = 2 * 3 * Limits().max_pixels  # IMAGE (RGB) and IMAGE_PNG at most as large
    shm_gib = max(SHM_FLOOR_GIB, math.ceil(instances * SHM_RESPONSES_PER_INSTANCE * response_bytes / 2**30))
    return Plan(
        profile=profile, stacks=stacks, gpus=len(used), weight_copies=weight_copies, slowdown=slowdown,
        startup_s=math.ceil(startup / PROBE_PERIOD_S) * PROBE_PERIOD_S,
        queue_target_s=round(measured[measured_as(stacks[0])].p50_s * slowdown, 2),
        memory_gib=HOST_BASE_GIB + HOST_GIB_PER_WEIGHT_COPY * weight_copies + shm_gib, shm_gib=shm_gib,
    )
