"""Step caches whose schedule is fixed before the first step, in a form CUDA graphs can replay (the `cudagraph`
stacks with MagCache or TaylorSeer).

diffusers' MagCache and TaylorSeer decide which steps compute from the step index and their configuration alone
(`MagCacheHeadHook`: the calibrated magnitude ratios, the retention steps and the skip limit;
`TaylorSeerCacheHook`: the first steps and the interval), so a generation's schedule is known before its first
step. Their hooks still take that decision, and keep the cache's state, in host code inside every block's call
(`torch.compiler.disable`d), which a CUDA graph cannot replay: a graph repeats the kernels of the call it recorded,
not the host's bookkeeping. Here the same caches run as three parts:
- the schedule, computed once per generation with the hooks' own arithmetic (`magcache_schedule`,
  `taylorseer_schedule`);
- one step function per kind of step, which `GraphedForward` replays as a graph per kind and input shape;
- the state, in a buffer the graphs write and read in place (MagCache's residual) or updated outside them (the
  Taylor factors, in diffusers' own `TaylorSeerState`).
tests/test_scheduled_cache.py checks that both compute the same steps and the same image as diffusers' hooks.
FBCache and TeaCache decide from the activations of the step itself: a graph cannot branch on them without reading
them back to the host, so those stacks keep diffusers' hooks and run without graphs.
"""

from __future__ import annotations

import torch

COMPUTE, SKIP = "compute", "skip"  # the kinds of step; GraphedForward keys its graphs by them (`step_kind`)


def magcache_schedule(config, steps: int) -> tuple[bool, ...]:
    """Which of `steps` steps MagCache computes: `MagCacheHeadHook`'s decision, taken for every step at once from a
    config already set for `steps` (`optimizations.apply.set_cache_steps`). In the hook's own arithmetic (its ratios
    are float32 tensors), so a step on the threshold falls the same way."""
    retention_step = int(config.retention_ratio * config.num_inference_steps + 0.5)
    ratio, skipped, error = 1.0, 0, 0.0
    schedule = []
    for step in range(steps):
        compute = True
        if step >= retention_step:
            ratio *= config.mag_ratios[step] if step < len(config.mag_ratios) else 1.0
            skipped += 1
            error += abs(1.0 - ratio)
            if any(schedule) and error <= config.threshold and skipped <= config.max_skip_steps:
                compute = False
            else:
                ratio, skipped, error = 1.0, 0, 0.0
        schedule.append(compute)
    return tuple(schedule)


def taylorseer_schedule(config, steps: int, compute_from: int | None) -> tuple[bool, ...]:
    """Which of `steps` steps TaylorSeer computes: `TaylorSeerCacheHook`'s decision for every step, with its
    `disable_cache_after_step` set to `compute_from`."""
    first = config.disable_cache_before_step
    return tuple(
        step < first or (step - first - 1) % config.cache_interval == 0
        or (compute_from is not None and step >= compute_from)
        for step in range(steps)
    )


class ScheduledCache:
    """Stands in for the transformer's forward (called with keywords only, as diffusers' pipelines do): runs each
    step as the schedule says, through `forward(step_kind=..., **inputs)` (the step function, which
    `apply_cuda_graph` makes replay graphs). `pre_hooks` run before every computed step (the step counter), outside
    any graph. Subclasses give the schedule and the skipped step."""

    def __init__(self, transformer: torch.nn.Module, config) -> None:
        self.transformer_forward = transformer.forward
        self.config = config
        self.forward = self.step
        self.pre_hooks: list = []
        self.schedule: tuple[bool, ...] = ()
        self.index = 0

    def start(self, steps: int, compute_from: int | None) -> None:
        """Set the schedule of the coming generation of `steps` steps, computing every step from `compute_from` on
        (None: as the cache decides), and forget the last generation's state."""
        self.schedule = self.schedule_for(steps, compute_from)
        self.reset()

    def schedule_for(self, steps: int, compute_from: int | None) -> tuple[bool, ...]:
        raise NotImplementedError

    def reset(self) -> None:
        self.index = 0

    def __call__(self, **inputs):
        index = self.index
        self.index += 1
        if index >= len(self.schedule) or self.schedule[index]:
            for hook in self.pre_hooks:
                hook()
            return self.computed(index, inputs)
        return self.skipped(index, inputs)

    def computed(self, index: int, inputs: dict):
        return self.forward(step_kind=COMPUTE, **inputs)

    def skipped(self, index: int, inputs: dict):
        raise NotImplementedError

    def step(self, step_kind: str, **inputs):
        """One step of the given kind: the function graphs are captured from."""
        return self.transformer_forward(**inputs)


class ScheduledMagCache(ScheduledCache):
    """MagCache: a computed step runs every block and keeps the residual they added (the last block's image output
    minus the first block's input) in a buffer per input shape; a skipped step runs the layers outside the blocks,
    with the first block adding that residual and every other block passing its inputs through, as diffusers'
    `MagCacheHeadHook` and `MagCacheBlockHook` do. The blocks keep their forward below the wrappers
    (`_BlockStep`), so a graph records whichever kind of step it was captured for.

    A graph reads the buffer at a fixed address, so the buffers of the shapes seen before `seal` (the load's warm-up
    sizes) are kept; a later shape gets one for its generation only. Before `seal` every computed step also runs a
    skipped one, whose output is not used, so that the load captures both graphs of each warm-up size."""

    def __init__(self, transformer: torch.nn.Module, config) -> None:
        super().__init__(transformer, config)
        from diffusers.hooks._helpers import TransformerBlockRegistry

        self.computing = True
        self.head_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.residuals: dict[tuple, torch.Tensor] = {}
        self.kept_shapes: set[tuple] = set()
        self.sealed = False
        self.inner_dim = transformer.inner_dim
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        for position, block in enumerate(blocks):
            role = "head" if position == 0 else "tail" if position == len(blocks) - 1 else "body"
            block.forward = _BlockStep(self, block.forward, TransformerBlockRegistry.get(type(block)), role)

    def schedule_for(self, steps: int, compute_from: int | None) -> tuple[bool, ...]:
        return magcache_schedule(self.config, steps)

    def seal(self) -> None:
        self.sealed = True

    def reset(self) -> None:
        super().reset()
        self.residuals = {shape: buffer for shape, buffer in self.residuals.items() if shape in self.kept_shapes}

    def computed(self, index: int, inputs: dict):
        self._use_residual(inputs["hidden_states"])
        output = super().computed(index, inputs)
        if not self.sealed:  # the load: graph the skipped step too (a warm-up's few steps all compute); output unused
            self.forward(step_kind=SKIP, **inputs)
        return output

    def skipped(self, index: int, inputs: dict):
        self._use_residual(inputs["hidden_states"])
        return self.forward(step_kind=SKIP, **inputs)

    def step(self, step_kind: str, **inputs):
        self.computing = step_kind == COMPUTE
        return super().step(step_kind, **inputs)

    def _use_residual(self, latents: torch.Tensor) -> None:
        """Point the blocks at the residual buffer for these latents (batch, image tokens, channels)."""
        shape = (*latents.shape[:2], self.inner_dim)
        if shape not in self.residuals:
            self.residuals[shape] = torch.zeros(shape, dtype=latents.dtype, device=latents.device)
            if not self.sealed:
                self.kept_shapes.add(shape)
        self.residual = self.residuals[shape]


class _BlockStep:
    """A FLUX block's forward under `ScheduledMagCache`: on a computed step the block's own forward (the first block
    also noting its image input, the last writing the residual into the buffer); on a skipped step its inputs
    back, the first block's image input plus the residual. No state changes here, so a graph can replay it."""

    def __init__(self, cache: ScheduledMagCache, forward, metadata, role: str) -> None:
        self.cache = cache
        self.forward = forward
        self.metadata = metadata
        self.role = role

    def __call__(self, *args, **kwargs):
        cache, metadata = self.cache, self.metadata
        hidden_states = metadata._get_parameter_from_args_kwargs(metadata.hidden_states_argument_name, args, kwargs)
        if cache.computing:
            if self.role == "head":
                cache.head_input = hidden_states
            output = self.forward(*args, **kwargs)
            if self.role == "tail":
                cache.residual.copy_(output[metadata.return_hidden_states_index] - cache.head_input)
            return output
        if self.role == "head":
            hidden_states = hidden_states + cache.residual
        encoder_hidden_states = metadata._get_parameter_from_args_kwargs(
            metadata.encoder_hidden_states_argument_name, args, kwargs)
        output = [None, None]
        output[metadata.return_hidden_states_index] = hidden_states
        output[metadata.return_encoder_hidden_states_index] = encoder_hidden_states
        return tuple(output)


class ScheduledTaylorSeer(ScheduledCache):
    """TaylorSeer in diffusers' lite mode: a computed step runs the whole forward and updates the Taylor factors of
    its output (the output projection's, which lite mode forecasts); a forecast step runs nothing of the model, only
    the Taylor series of the output (diffusers' `TaylorSeerState`, its arithmetic unchanged). Lite mode's blocks
    return zeros on a forecast step, which only the forecast output replaces, so skipping them changes nothing."""

    def __init__(self, transformer: torch.nn.Module, config) -> None:
        super().__init__(transformer, config)
        from diffusers.hooks.taylorseer_cache import TaylorSeerState

        self.state = TaylorSeerState(taylor_factors_dtype=config.taylor_factors_dtype, max_order=config.max_order)

    def schedule_for(self, steps: int, compute_from: int | None) -> tuple[bool, ...]:
        return taylorseer_schedule(self.config, steps, compute_from)

    def reset(self) -> None:
        super().reset()
        self.state.reset()

    def computed(self, index: int, inputs: dict):
        output = super().computed(index, inputs)
        self.state.current_step = index
        self.state.update((_sample(output),))
        return output

    def skipped(self, index: int, inputs: dict):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        self.state.current_step = index
        (forecast,) = self.state.predict()
        return Transformer2DModelOutput(sample=forecast) if inputs.get("return_dict", True) else (forecast,)


def _sample(output) -> torch.Tensor:
    """The predicted noise of a transformer output (a tuple without `return_dict`, else diffusers' output class)."""
    return output[0] if isinstance(output, tuple) else output.sample


SCHEDULED_CACHES = {"magcache": ScheduledMagCache, "taylorseer": ScheduledTaylorSeer}


def apply_scheduled_cache(transformer: torch.nn.Module, cache: str, config) -> ScheduledCache:
    """Run the stack's step cache in its scheduled form, as the transformer's forward (instead of diffusers' hooks)."""
    scheduled = SCHEDULED_CACHES[cache](transformer, config)
    transformer.forward = scheduled
    return scheduled


def scheduled_cache(transformer: torch.nn.Module) -> ScheduledCache | None:
    """The transformer's scheduled cache, if it runs one."""
    forward = transformer.forward
    return forward if isinstance(forward, ScheduledCache) else None
