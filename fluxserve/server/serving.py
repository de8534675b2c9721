"""A stack's serving logic, independent of Triton's Python API: load from a model's config parameters, turn
validated inputs into the contract's outputs. `triton_model` adapts it to `pb_utils`."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from ..contract import WARMUP_BUCKETS, GenerationRequest, Limits, parse_request, parse_sizes
from ..parallel import WorkerGroup
from ..parallel.group import Timeouts
from ..pipeline import build_pipeline, release_memory
from .placement import PlacementError, instance_gpus
from .png import encode_png
from ..prompt_cache import ENTRIES_PARAMETER, PromptCache
from ..stacks import Stack
from ..weights import ENV_VAR, default_source, parse_source

log = logging.getLogger(__name__)

WARMUP_SIZES_ENV = "FLUXSERVE_WARMUP_SIZES"
SPECIALISED_SIZES_ENV = "FLUXSERVE_SPECIALISED_SIZES"
NO_SIZES = "none"
WARMUP_STEPS = 2


def instance_devices(kind: str, device_id: int, parameters: dict[str, str]) -> list[torch.device]:
    """The devices of the instance Triton started as (`kind`, `device_id`), one per GPU its stack uses: cuda:{id},
    never bare 'cuda'. A multi-GPU stack's GPUs come from its placement (`placement.instance_gpus`); without GPUs
    it runs as many processes on the CPU."""
    gpus = Stack.from_parameters(parameters).gpus
    if kind == "CPU" or (kind == "MODEL" and not torch.cuda.is_available()):
        return [torch.device("cpu")] * gpus
    ids = instance_gpus(parameters, gpus, kind, device_id)
    available = torch.cuda.device_count()
    if max(ids) >= available:
        raise PlacementError(f"this instance runs on GPUs {', '.join(map(str, ids))}, but the host has {available} "
                             f"GPU(s): place it with the launcher's --gpus, or use a stack of fewer GPUs")
    return [torch.device(f"cuda:{gpu}") for gpu in ids]


def weights_from(parameters: dict[str, str]):
    """The model's weights source: its `weights` parameter, else FLUXSERVE_WEIGHTS, else the default."""
    spec = parameters.get("weights") or os.environ.get(ENV_VAR, "")
    if spec:
        return parse_source(spec), f"from {'parameter weights' if parameters.get('weights') else ENV_VAR}"
    return default_source()


def warm_up_request(guidance: float, height: int, width: int) -> GenerationRequest:
    """The generation a stack runs at load: the size compiled stacks are tuned for, a couple of steps."""
    return GenerationRequest(prompt="warm-up", seed=0, steps=WARMUP_STEPS, guidance=guidance, height=height,
                             width=width)


def warm_up_sizes(parameters: dict[str, str], limits: Limits, gpus: int) -> list[tuple[int, int]]:
    """The sizes a load runs, the first in full: the model's `warmup_sizes` parameter, else FLUXSERVE_WARMUP_SIZES
    (the launcher's --warmup-sizes), else its default size and the usual buckets. Only compiled or graphed stacks
    run more than the first (`StackPipeline.warm_up`)."""
    sizes = sizes_setting(parameters, "warmup_sizes", WARMUP_SIZES_ENV, limits, gpus, none_allowed=False)
    if sizes is None:
        return [(limits.default_size, limits.default_size),
                *(size for size in WARMUP_BUCKETS if size != (limits.default_size, limits.default_size))]
    return sizes


def specialised_sizes(parameters: dict[str, str], limits: Limits, gpus: int, on_gpu: bool) -> list[tuple[int, int]]:
    """The sizes a compiled stack also compiles code for alone at load, faster than its general graph
    (`compile_shapes`): the model's `specialised_sizes` parameter, else FLUXSERVE_SPECIALISED_SIZES (the launcher's
    --specialised-sizes), else its default size on a GPU (2.4% faster on the H200, for 7-8 s more load with
    artifacts and 1.8 GiB: perf/results/h200/s12-specialised-sizes) and none on the CPU, where it would only cost
    compile time."""
    sizes = sizes_setting(parameters, "specialised_sizes", SPECIALISED_SIZES_ENV, limits, gpus)
    if sizes is None:
        return [(limits.default_size, limits.default_size)] if on_gpu else []
    return sizes


def sizes_setting(parameters: dict[str, str], name: str, env: str, limits: Limits, gpus: int,
                  none_allowed: bool = True):
    """A list of sizes from the model's parameter `name`, else the environment variable `env`: None when neither
    is set, [] for 'none' (when `none_allowed`); a ValueError names where a bad value came from."""
    text = parameters.get(name) or os.environ.get(env, "")
    where = f"parameter {name}" if parameters.get(name) else env
    if not text.strip():
        return None
    if text.strip().lower() == NO_SIZES:
        if not none_allowed:
            raise ValueError(f"{where}: {NO_SIZES!r} is not allowed: a load runs at least one size")
        return []
    return parse_sizes(text, limits, gpus, field=where)


class RequestCancelled(RuntimeError):
    """The client cancelled (or timed out) while the request was generating."""


class OutOfMemory(RuntimeError):
    """The request ran out of device or host memory; the memory was released."""


class StackService:
    """One model instance: a warmed-up stack pipeline plus the request contract."""

    def __init__(
        self, model_name: str, parameters: dict[str, str], devices: list[torch.device], notify=log.warning,
        observe=None, trace=None,
    ):
        """`devices`: one per GPU the stack uses (`instance_devices`). `notify(message)` reports to the server
        log; `observe(request, generation)` sees every generation (metrics); `trace(message)`, when given, hears of
        each request as it starts generating (the server log's info level: which request the instance is busy with).
        The prompt cache (`prompt_cache_entries`) serves one-GPU stacks only: a context-parallel stack's workers build
        their pipelines themselves (`parallel.worker`), without one, and the log says the parameter is ignored."""
        self.model_name = model_name
        self.notify = notify
        self.observe = observe
        self.trace = trace
        self.stack = Stack.from_parameters(parameters)
        self.limits = Limits.from_parameters(parameters)
        prompt_cache = PromptCache.from_parameters(parameters)
        self.weights, why = weights_from(parameters)
        if self.weights.kind == "synthetic":
            notify(f"*** {model_name}: serving RANDOM weights ({self.weights}): {why}. Images are noise. ***")
        if len(devices) != self.stack.gpus:
            raise PlacementError(f"stack {self.stack.name} runs on {self.stack.gpus} device(s), given {len(devices)}")
        sizes = warm_up_sizes(parameters, self.limits, self.stack.gpus)
        specialised = specialised_sizes(parameters, self.limits, self.stack.gpus, devices[0].type == "cuda")
        warm_up = warm_up_request(self.limits.default_guidance, *sizes[0])
        started = time.perf_counter()
        if self.stack.gpus == 1:
            self.pipeline = build_pipeline(self.stack, self.weights, devices[0], warm_up, sizes[1:],
                                           specialised_sizes=specialised, prompt_cache=prompt_cache)
        else:
            if prompt_cache is not None:
                notify(f"{model_name}: parameter {ENTRIES_PARAMETER} ignored: a context-parallel stack has no "
                       "prompt cache")
            self.pipeline = WorkerGroup(self.stack, parameters, str(self.weights), devices, warm_up, notify,
                                        Timeouts.from_parameters(parameters), sizes[1:], specialised)
        self.load_seconds = time.perf_counter() - started
        phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.pipeline.load_phases.items())
        compiled = ", ".join(f"{name} {count}" for name, count in self.pipeline.compile_stats.items())
        notify(
            f"{model_name}: stack {self.stack.description} ready on {', '.join(map(str, devices))} in "
            f"{self.load_seconds:.1f} s "
            f"({phases}){f'; compiled: {compiled}' if compiled else ''}; weights {self.weights}; "
            f"attention {self.pipeline.attention_backend} -> {self.pipeline.attention_kernel}"
        )

    def infer(self, inputs: dict, wanted: set[str], should_stop=None, request_id: str = "") -> dict[str, np.ndarray]:
        """Validated inputs -> the requested outputs (raises InvalidInput for bad input). `request_id`: the
        client's id of the request, if any, for the log."""
        started = time.perf_counter()
        request = parse_request(inputs, self.limits, self.stack.gpus)
        if self.trace is not None:
            self.trace(f"{self.model_name}: request {request_id or '(no id)'} started: {request.height}x{request.width}, "
                       f"{request.steps} steps, seed {request.seed}")
        generation = self._generate(request, should_stop, request_id)
        outputs = {"STEPS_COMPUTED": np.array([generation.steps_computed], dtype=np.int32)}
        if "IMAGE" in wanted:
            outputs["IMAGE"] = generation.image
        timings = dict(generation.timings_ms)
        if "IMAGE_PNG" in wanted:
            encode_started = time.perf_counter()
            outputs["IMAGE_PNG"] = np.array([encode_png(generation.image)], dtype=np.object_)
            timings["png_encode"] = round((time.perf_counter() - encode_started) * 1000, 3)
        info = {
            "model": self.model_name,
            "stack": self.stack.name,
            "weights": str(self.weights),
            "device": str(self.pipeline.device),
            "parallel": self.pipeline.parallel_info(),
            "device_name": self.pipeline.device_name,
            "cudnn_version": self.pipeline.cudnn_version,
            "attention_backend": self.pipeline.attention_backend,
            "attention_kernel": self.pipeline.attention_kernel,
            "seed": request.seed,
            "height": request.height,
            "width": request.width,
            "guidance": request.guidance,
            "steps_total": request.steps,
            "steps_computed": generation.steps_computed,
            "cancelled": generation.cancelled,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "load_seconds": round(self.load_seconds, 3),
            "load_phases_s": self.pipeline.load_phases,
            "compile_stats": self.pipeline.compile_stats,
            "compile_artifact": self.pipeline.compile_artifact,
            "warm_up_sizes": [f"{height}x{width}" for height, width in self.pipeline.warm_up_sizes],
            "specialised_sizes": [f"{height}x{width}" for height, width in self.pipeline.specialised_sizes],
            "compiled_in_request": generation.compiled,
            "peak_memory_gib": self.pipeline.peak_memory_gib(),
            "timings_ms": timings,
            "prompt_cache": generation.prompt_cache,
            "warnings": generation.warnings,
        }
        outputs["INFO"] = np.array([json.dumps(info).encode()], dtype=np.object_)
        return outputs

    def close(self) -> None:
        """Stop what the instance started (a multi-GPU stack's workers): nothing may outlive an unload."""
        if isinstance(self.pipeline, WorkerGroup):
            self.pipeline.close()

    def _generate(self, request: GenerationRequest, should_stop, request_id: str = ""):
        """Generate, turning cancellation and out-of-memory into errors for this request alone."""
        try:
            generation = self.pipeline.generate(request, should_stop)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            release_memory(self.pipeline.device)
            self.notify(f"{self.model_name}: out of memory at {request.height}x{request.width}, released: {exc}")
            raise OutOfMemory(
                f"out of memory generating {request.height}x{request.width} with {request.steps} steps; "
                "the request was dropped and the model keeps serving: retry later or ask for a smaller image"
            ) from None
        if self.observe is not None:
            self.observe(request, generation)
        if generation.compiled.get("frames") or generation.compiled.get("graphs"):
            self.notify(f"{self.model_name}: a request at {request.height}x{request.width} compiled "
                        f"({generation.compiled}): list its size in the model's warmup_sizes parameter")
        if generation.cancelled:
            self.notify(
                f"{self.model_name}: request cancelled by the client after {generation.steps_computed} of "
                f"{request.steps} steps computed{f' (request {request_id})' if request_id else ''}"
            )
            raise RequestCancelled(f"cancelled by the client after {generation.steps_computed} of {request.steps} steps")
        return generation

