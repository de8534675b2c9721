"""A stack's serving logic, independent of Triton's Python API: load from a model's config parameters, turn
validated inputs into the contract's outputs. `triton_model` adapts it to `pb_utils`."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import time

import numpy as np
import torch

from .contract import GenerationRequest, Limits, parse_request
from .pipeline import build_pipeline
from .stacks import Stack
from .weights import ENV_VAR, default_source, parse_source

log = logging.getLogger(__name__)

WARMUP_SIZE_ENV = "FLUXSERVE_WARMUP_SIZE"
# Fault injection for tests and drills: a request whose prompt equals this variable's value runs out of
# memory inside the denoising loop, so the real recovery path is exercised.
INJECT_OOM_ENV = "FLUXSERVE_INJECT_OOM_PROMPT"
WARMUP_STEPS = 2
PNG_COMPRESS_LEVEL = 1  # level 6 costs ~10x the encode time for a few % of size on 1024x1024 images


def instance_device(kind: str, device_id: int) -> torch.device:
    """The device Triton gave this instance: cuda:{device_id} for GPU instances, never bare 'cuda'."""
    return torch.device(f"cuda:{device_id}") if kind == "GPU" else torch.device("cpu")


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


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


class RequestCancelled(RuntimeError):
    """The client cancelled (or timed out) while the request was generating."""


class OutOfMemory(RuntimeError):
    """The request ran out of device or host memory; the memory was released."""


def release_memory(device: torch.device) -> None:
    """Give back what a failed request held, so the next request starts from the loaded model's footprint."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class StackService:
    """One model instance: a warmed-up stack pipeline plus the request contract."""

    def __init__(
        self, model_name: str, parameters: dict[str, str], device: torch.device, notify=log.warning, observe=None
    ):
        """`notify(message)` reports to the server log; `observe(request, generation)` sees every generation
        (metrics)."""
        self.model_name = model_name
        self.notify = notify
        self.observe = observe
        self.stack = Stack.from_parameters(parameters)
        self.limits = Limits.from_parameters(parameters)
        self.weights, why = weights_from(parameters)
        if self.weights.kind == "synthetic":
            notify(f"*** {model_name}: serving RANDOM weights ({self.weights}): {why}. Images are noise. ***")
        size = int(os.environ.get(WARMUP_SIZE_ENV, self.limits.default_size))
        warm_up = warm_up_request(self.limits.default_guidance, size, size)
        started = time.perf_counter()
        self.pipeline = build_pipeline(self.stack, self.weights, device, warm_up)
        self.load_seconds = time.perf_counter() - started
        phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.pipeline.load_phases.items())
        compiled = ", ".join(f"{name} {count}" for name, count in self.pipeline.compile_stats.items())
        notify(
            f"{model_name}: stack {self.stack.description} ready on {device} in {self.load_seconds:.1f} s "
            f"({phases}){f'; compiled: {compiled}' if compiled else ''}; weights {self.weights}; "
            f"attention {self.pipeline.attention_backend} -> {self.pipeline.attention_kernel}"
        )

    def infer(self, inputs: dict, wanted: set[str], should_stop=None) -> dict[str, np.ndarray]:
        """Validated inputs -> the requested outputs (raises InvalidInput for bad input)."""
        started = time.perf_counter()
        request = parse_request(inputs, self.limits)
        generation = self._generate(request, should_stop)
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
            "peak_memory_gib": self.pipeline.peak_memory_gib(),
            "timings_ms": timings,
            "warnings": generation.warnings,
        }
        outputs["INFO"] = np.array([json.dumps(info).encode()], dtype=np.object_)
        return outputs

    def _generate(self, request: GenerationRequest, should_stop):
        """Generate, turning cancellation and out-of-memory into errors for this request alone."""
        should_stop = _with_injected_oom(request, should_stop)
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
        if generation.cancelled:
            self.notify(
                f"{self.model_name}: request cancelled by the client after {generation.steps_computed} of "
                f"{request.steps} steps computed"
            )
            raise RequestCancelled(f"cancelled by the client after {generation.steps_computed} of {request.steps} steps")
        return generation


def _with_injected_oom(request: GenerationRequest, should_stop):
    """Wrap `should_stop` (polled after each step) to raise an out-of-memory error for the marked prompt."""
    marker = os.environ.get(INJECT_OOM_ENV)
    if not marker or request.prompt != marker:
        return should_stop

    def stop_or_fail() -> bool:
        raise torch.OutOfMemoryError("injected by " + INJECT_OOM_ENV)

    return stop_or_fail
