"""(stack, weights source, device) -> a ready pipeline that generates images and counts computed steps."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import HookRegistry

from .optimizations.aot_blocks import paused
from .optimizations.compile_artifacts import load_artifact, save_artifact
from .optimizations.compile_shapes import allow_specialisations, specialised_code
from .contract import MAX_SEQUENCE_LENGTH, GenerationRequest
from .optimizations.cuda_graph import apply_text_encoder_graphs, eager_forward, seal_cuda_graphs
from .optimizations.scheduled_cache import scheduled_cache
from .optimizations.apply import (TORCH_DTYPES, apply_vae_compile, check_supported, counted_forward,
                                  optimize_transformer, set_cache_steps)
from .prompt_cache import PromptCache
from .stacks import Stack
from .weights import WeightsSource, load_pipeline

log = logging.getLogger(__name__)

# Fault injection for tests and drills: a request whose prompt equals this variable's value runs out of memory
# inside the denoising loop (on every process of a context-parallel stack), so the real recovery path is exercised.
INJECT_OOM_ENV = "FLUXSERVE_INJECT_OOM_PROMPT"
ATTENTION_OP_MARKERS = ("scaled_dot_product", "flash_attn", "attention")


class _StopRequested(Exception):
    """Raised from the step callback to end the denoising loop at once (cancellation)."""

    def __init__(self, steps_run: int) -> None:
        super().__init__(f"stopped after {steps_run} steps")
        self.steps_run = steps_run


class StepCounter:
    """Counts transformer forwards that really ran the blocks.

    The pre-hook sits on a module inside the last single block: a hook on the block itself still fires when
    a step cache skips it (the cache replaces the block's forward, not its call). It runs eagerly, outside
    torch.compile's graphs (one graph break in the last block). A stack replaying CUDA graphs without a step
    cache computes every block on every forward: there the hook sits on the transformer itself, outside the
    graph (a hook inside would run only while the graph is captured). A last block running an ahead-of-time
    package, or compiled code that no cache decides under (`optimizations.apply.counted_forward`), calls the
    counter from its forward, where the cache's skip decision has already been taken: a hook inside would compile
    the last block apart. A step cache in its scheduled form (`scheduled_cache`, under CUDA graphs) calls it
    before every step it computes."""

    def __init__(self, transformer, whole_forward: bool = False) -> None:
        self.count = 0
        last = transformer.single_transformer_blocks[-1]
        below_cache = counted_forward(last)
        scheduled = scheduled_cache(transformer)
        if scheduled is not None:
            scheduled.pre_hooks.append(self._increment)
        elif below_cache is not None and not whole_forward:  # a package or compiled code no cache decides under
            below_cache.pre_hooks.append(self._increment)
        else:
            (transformer if whole_forward else last.norm).register_forward_pre_hook(self._increment)

    @torch.compiler.disable
    def _increment(self, *module_and_args) -> None:
        self.count += 1

    def reset(self) -> None:
        self.count = 0


@dataclass
class Generation:
    """The result of one request: the image (uint8 HxWx3) and its telemetry."""

    image: np.ndarray | None  # None when cancelled, or not decoded (context-parallel ranks but the first)
    steps_run: int  # denoising steps the loop went through (fewer than asked when cancelled)
    steps_computed: int  # of those, the ones whose transformer blocks really ran
    cancelled: bool
    timings_ms: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    compiled: dict[str, int] = field(default_factory=dict)  # what torch.compile compiled during it (none: empty)
    # Whether the prompt cache held the prompt ('hit') and its counters after the request; None without a cache.
    prompt_cache: dict | None = None


class StackPipeline:
    """A FluxPipeline with a stack applied. Not thread-safe: Triton calls one instance serially."""

    def __init__(self, stack: Stack, pipe, device: torch.device, weights: WeightsSource, attention_backend: str):
        self.stack = stack
        self.pipe = pipe
        self.device = device
        self.weights = weights
        self.attention_backend = attention_backend
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        # The cuDNN this process loaded (None without one): its version decides SDPA's default kernel on Hopper,
        # and the library path can make the model process load another one than a plain python3 would.
        self.cudnn_version = torch.backends.cudnn.version() if device.type == "cuda" else None
        self.attention_kernel = "unknown (not warmed up)"
        self.load_phases: dict[str, float] = {}
        self.compile_stats: dict[str, int] = {}  # compiled stacks: what the load compiled and the caches served
        self.compile_artifact: dict[str, str | None] = {}  # compiled stacks: the artifact read and written at load
        self.warm_up_sizes: list[tuple[int, int]] = []  # the sizes the load ran (compiled, graphs captured)
        self.specialised_sizes: list[tuple[int, int]] = []  # of those, the ones with code compiled for them alone
        self.prompt_cache: PromptCache | None = None  # set by build_pipeline after the warm-up
        self.steps = StepCounter(pipe.transformer, whole_forward=stack.cuda_graph)

    def _sync(self) -> float:
        return finished_time(self.device)

    def peak_memory_gib(self) -> float | None:
        """Peak GPU memory allocated since the stack was applied (its weights, warm-up and requests; not the
        transient peak of loading bf16 weights before quantizing them); None on CPU."""
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)

    def prompt_warnings(self, prompt: str) -> list[str]:
        """Say what the text encoders will not read (diffusers truncates silently into its log)."""
        warnings = []
        for label, tokenizer, limit in (
            ("CLIP", self.pipe.tokenizer, self.pipe.tokenizer_max_length),
            ("T5", self.pipe.tokenizer_2, MAX_SEQUENCE_LENGTH),
        ):
            count = len(tokenizer(prompt, truncation=False).input_ids)
            if count > limit:
                warnings.append(f"PROMPT truncated: it has {count} {label} tokens, {label} reads the first {limit}")
        return warnings

    def parallel_info(self) -> dict:
        """Where the stack runs: one process on one device."""
        return {"mode": "none", "world_size": 1, "devices": [str(self.device)]}

    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, should_stop: Callable[[], bool] | None = None, decode: bool = True
    ) -> Generation:
        """Run one request. `should_stop` is polled after every denoising step: when it says so the loop
        ends there and the result is marked cancelled, without an image. Without `decode` the latents are not
        decoded (a context-parallel rank whose image nobody reads). A size of `specialised_sizes` runs the code
        compiled for it at load (`compile_shapes`)."""
        with specialised_code((request.height, request.width) in self.specialised_sizes):
            return self._generate(request, should_stop, decode)

    def _generate(self, request: GenerationRequest, should_stop, decode: bool) -> Generation:
        should_stop = _with_injected_oom(request, should_stop)
        compiled_before = compile_counters() if self.stack.compile != "none" else None
        start = self._sync()
        cached = self.prompt_cache is not None and request.prompt in self.prompt_cache
        embeddings = self._encode(request.prompt)
        encoded = self._sync()
        prompt_cache = {"hit": cached, **self.prompt_cache.stats()} if self.prompt_cache is not None else None
        try:
            latents, steps_run = self._denoise(embeddings, request, should_stop)
        except _StopRequested as stop:
            return Generation(None, stop.steps_run, self.steps.count, cancelled=True, timings_ms={},
                              prompt_cache=prompt_cache)
        denoised = self._sync()
        if not decode:
            return Generation(None, steps_run, self.steps.count, cancelled=False,
                              timings_ms={"text_encode": round((encoded - start) * 1000, 3),
                                          "denoise": round((denoised - encoded) * 1000, 3)},
                              prompt_cache=prompt_cache)
        image = self._decode(latents, request.height, request.width)
        decoded = self._sync()
        pixels = image.cpu().numpy()
        done = time.perf_counter()
        timings = {
            "text_encode": encoded - start,
            "denoise": denoised - encoded,
            "vae_decode": decoded - denoised,
            "to_host": done - decoded,
        }
        return Generation(
            image=pixels,
            steps_run=steps_run,
            steps_computed=self.steps.count,
            cancelled=False,
            timings_ms={name: round(seconds * 1000, 3) for name, seconds in timings.items()},
            warnings=self.prompt_warnings(request.prompt),
            compiled=compiled_since(compiled_before) if compiled_before is not None else {},
            prompt_cache=prompt_cache,
        )

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt -> (T5 sequence embeddings, CLIP pooled embedding), from the prompt cache when it holds them
        (the same tensors the encoders returned for the prompt's first request, which the loop only reads)."""
        if self.prompt_cache is not None and (cached := self.prompt_cache.get(prompt)) is not None:
            return cached
        prompt_embeds, pooled_prompt_embeds, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        if self.prompt_cache is not None:
            self.prompt_cache.put(prompt, (prompt_embeds, pooled_prompt_embeds))
        return prompt_embeds, pooled_prompt_embeds

    def _denoise(self, embeddings, request: GenerationRequest, should_stop) -> tuple[torch.Tensor, int]:
        """The denoising loop (FluxPipeline's own); returns packed latents and the steps it went through."""
        steps_run = 0

        def on_step_end(pipeline, step, timestep, tensors):
            nonlocal steps_run
            steps_run += 1
            if should_stop is not None and should_stop():
                raise _StopRequested(steps_run)
            return tensors

        self._reset_step_state()
        set_cache_steps(self.pipe.transformer, request.steps)
        latents = self.pipe(
            prompt_embeds=embeddings[0],
            pooled_prompt_embeds=embeddings[1],
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="latent",
            callback_on_step_end=on_step_end,
        ).images
        return latents, steps_run

    def _reset_step_state(self) -> None:
        """Zero the step counter and every stateful cache hook: a request that ended early (cancelled, out of
        memory) skips the pipeline's own reset, and the next request must not see its cached residuals."""
        self.steps.reset()
        HookRegistry.check_if_exists_or_initialize(self.pipe.transformer).reset_stateful_hooks()

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> uint8 RGB image (H, W, 3) on the device, as FluxPipeline's own decode does."""
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        pixels = pipe.vae.decode(latents, return_dict=False)[0][0]
        return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)

    @torch.inference_mode()
    def warm_up(self, request: GenerationRequest, clock: PhaseClock, sizes=(), specialised=()) -> None:
        """Run the request once (compiles, autotunes, allocates), then, for a stack whose code depends on the image
        size (compiled, or replaying CUDA graphs), a short generation at each other (height, width) of `sizes`:
        compile guards settle and a graph is captured per size here, not on a request. A compiled stack also
        compiles code for each size of `specialised` alone, which requests at that size then run (the first
        request ran the general graph, outside any CUDA graph, when its size is one of them). Then one denoising
        step under the profiler to see which attention kernel the transformer actually runs (text encoders and
        VAE left out: they have attention of their own)."""
        first = (request.height, request.width)
        specialised = list(dict.fromkeys(specialised)) if self.stack.compile != "none" else []
        with eager_forward(self.pipe.transformer) if first in specialised else contextlib.nullcontext():
            self.generate(request)
        self.warm_up_sizes = [first]
        clock.lap("warm_up")
        if self.stack.compile != "none" or self.stack.cuda_graph:
            allow_specialisations(len(specialised))
            for height, width in dict.fromkeys([*specialised, *sizes]):
                if (height, width) in specialised:
                    self.specialised_sizes.append((height, width))
                elif (height, width) in self.warm_up_sizes:
                    continue
                started = time.perf_counter()
                self.generate(dataclasses.replace(request, height=height, width=width))
                log.info("warm-up at %dx%d%s: %.1f s", height, width, " (specialised)" if (height, width) in specialised
                         else "", finished_time(self.device) - started)
                if (height, width) not in self.warm_up_sizes:
                    self.warm_up_sizes.append((height, width))
        seal_cuda_graphs(self.pipe.transformer)
        if len(self.warm_up_sizes) > 1 or self.specialised_sizes:
            clock.lap("warm_up_sizes")
        from torch.profiler import ProfilerActivity, profile

        embeddings = self._encode(request.prompt)
        transformer = self.pipe.transformer
        with eager_forward(transformer), paused(transformer), profile(activities=[ProfilerActivity.CPU]) as prof:
            self._denoise(embeddings, dataclasses.replace(request, steps=1), should_stop=None)
        self.attention_kernel = attention_kernel_from_events(e.name for e in prof.events())
        clock.lap("kernel_check")


def _with_injected_oom(request: GenerationRequest, should_stop):
    """Wrap `should_stop` (polled after each step) to raise an out-of-memory error for the marked prompt."""
    marker = os.environ.get(INJECT_OOM_ENV)
    if not marker or request.prompt != marker:
        return should_stop

    def stop_or_fail() -> bool:
        raise torch.OutOfMemoryError("injected by " + INJECT_OOM_ENV)

    return stop_or_fail


def attention_kernel_from_events(names) -> str:
    """The most specific attention op seen (e.g. aten::_scaled_dot_product_cudnn_attention), not the
    `scaled_dot_product_attention` dispatcher around it."""
    seen = {name for name in names if any(marker in name.lower() for marker in ATTENTION_OP_MARKERS)}
    specific = sorted(name for name in seen if name != "aten::scaled_dot_product_attention")
    return ", ".join(specific) or ", ".join(sorted(seen)) or "none seen"


def build_pipeline(
    stack: Stack, weights: WeightsSource, device: torch.device, warm_up: GenerationRequest | None = None,
    warm_up_sizes=(), dynamic_shapes: bool = True, specialised_sizes=(), prompt_cache: PromptCache | None = None,
) -> StackPipeline:
    """Load the weights, apply the stack and warm up (compiling, when the stack compiles).

    `warm_up_sizes`: other (height, width) a compiled or graphed stack runs once at load (`StackPipeline.warm_up`).
    `dynamic_shapes`: compiled code serves every size (`optimizations.apply.apply_compile`); off, it is specialised
    to the sizes of the warm-up. `specialised_sizes`: sizes a compiled stack also compiles code for alone, run by
    requests at those sizes (`compile_shapes`). `prompt_cache`: the text embeddings' cache requests use
    (`prompt_cache`), given to the pipeline after the warm-up so that it holds and counts requests alone
    (context-parallel workers build without one). A compiled stack first fills its compile caches from its portable
    artifact, when there is one for this GPU and these versions, and writes one when the load compiled anything
    (`compile_artifacts`).

    The result's `load_phases` says where the load time went, in seconds: `weights`, `stack` (quantizing,
    wrapping), `warm_up` (the first request: compilation, graph capture), `warm_up_sizes` (the other sizes, when
    the stack runs them) and `kernel_check`;
    a compiled stack's first phase, `artifacts`, is the time to read its artifact into the caches."""
    check_supported(stack, device)
    compiled_before = compile_counters()
    clock = PhaseClock(device)
    artifact_read = None
    if stack.compile != "none":
        artifact_read = load_artifact(stack, device)
        clock.lap("artifacts")
    pipe = load_pipeline(weights, TORCH_DTYPES[stack.dtype], device)
    pipe.set_progress_bar_config(disable=True)
    clock.lap("weights")
    backend = optimize_transformer(pipe.transformer, stack, device, dynamic_shapes)
    if stack.compile != "none" and device.type == "cuda":  # measured on the GPU; on CPU a compile per load for tests
        apply_vae_compile(pipe.vae, dynamic_shapes)
    if stack.cuda_graph:
        apply_text_encoder_graphs(pipe)
    clock.lap("stack")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stack_pipeline = StackPipeline(stack, pipe, device, weights, backend)
    if warm_up is not None:
        stack_pipeline.warm_up(warm_up, clock, warm_up_sizes, specialised_sizes)
    stack_pipeline.prompt_cache = prompt_cache
    stack_pipeline.load_phases = clock.phases
    if stack.compile != "none":
        stack_pipeline.compile_stats = compiled_since(compiled_before, keep_zeros=True)
        # Inductor's code generation is what costs minutes; with dynamic shapes AOTAutograd misses its cache for
        # a few graphs even after an artifact (traced again, seconds) and Inductor then hits.
        compiled_anew = stack_pipeline.compile_stats["inductor_cache_misses"] > 0
        written = save_artifact(stack, device) if compiled_anew or artifact_read is None else None
        stack_pipeline.compile_artifact = {"read": artifact_read and str(artifact_read),
                                           "written": written and str(written)}
    return stack_pipeline


COMPILE_COUNTERS = {  # name -> torch.compile's own counter (what TORCH_LOGS reports), (group, key)
    "frames": ("frames", "ok"),
    "graphs": ("stats", "unique_graphs"),
    "aot_cache_hits": ("aot_autograd", "autograd_cache_hit"),
    "aot_cache_misses": ("aot_autograd", "autograd_cache_miss"),
    "aot_cache_bypasses": ("aot_autograd", "autograd_cache_bypass"),
    "inductor_cache_hits": ("inductor", "fxgraph_cache_hit"),
    "inductor_cache_misses": ("inductor", "fxgraph_cache_miss"),
}
AOT_COUNTERS = {"aot_blocks_loaded": "blocks_loaded", "aot_packages_built": "packages_built",
                "aot_fallbacks": "fallbacks"}  # name -> aot_blocks' counter


def compile_counters() -> dict[str, int]:
    """What torch.compile has compiled in this process so far, and what its on-disk caches served: a slow
    second load says here whether it traced again, missed the caches or compiled more graphs than expected.
    Read from torch's process-wide counters (torch._dynamo.utils, private), so a load reports the difference; the
    `aot_` ones say how many blocks run ahead-of-time packages, how many package folders were built and how often
    packages fell back to torch.compile."""
    from torch._dynamo.utils import counters

    from .optimizations import aot_blocks

    return {**{name: counters[group][key] for name, (group, key) in COMPILE_COUNTERS.items()},
            **{name: aot_blocks.counters[key] for name, key in AOT_COUNTERS.items()}}


def compiled_since(before: dict[str, int], keep_zeros: bool = False) -> dict[str, int]:
    """What `compile_counters` counted since `before` (only what changed, unless `keep_zeros`)."""
    now = compile_counters()
    return {key: now[key] - before[key] for key in now if keep_zeros or now[key] != before[key]}


def release_memory(device: torch.device) -> None:
    """Give back what a failed request held, so the next request starts from the loaded model's footprint."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def finished_time(device: torch.device) -> float:
    """time.perf_counter() once the work queued on `device` has finished (a GPU runs behind the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PhaseClock:
    """Seconds per named phase of a load, each measured from the end of the previous one (GPU work included)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, float] = {}
        self._last = finished_time(device)

    def lap(self, phase: str) -> None:
        now = finished_time(self.device)
        self.phases[phase] = round(now - self._last, 3)
        self._last = now
