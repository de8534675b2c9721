"""TeaCache for FLUX as a diffusers hook, enabled like diffusers' own step caches.

Method: Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model" (CVPR 2025,
https://arxiv.org/abs/2411.19108), as its authors apply it to FLUX in TeaCache4FLUX
(https://github.com/ali-vilab/TeaCache/tree/main/TeaCache4FLUX). The signal is the relative L1 distance between
consecutive steps' modulated input of the first double block (`norm1(hidden_states, emb)`): cheap to compute,
and, once rescaled by a polynomial fitted on FLUX, a good estimate of how much the whole model's output will
change. The rescaled distances accumulate; while the sum stays below the threshold a step adds the cached
residual of the image stream (output of the last block minus input of the first) instead of running the
blocks; otherwise it computes, caches the new residual and resets the sum. The first and last steps always
compute.

diffusers' FluxPipeline passes no step index to the transformer, so the hook counts its calls. Knowing the last
step needs the generation's step count: `fluxserve.optimizations.apply.set_cache_steps` sets
`TeaCacheConfig.num_inference_steps` before each one. The state is per generation and per cache context
(FluxPipeline's "cond"): FluxPipeline resets stateful hooks at the end of every call, and `StackPipeline` before
every request too (a cancelled one never reaches that end); each `apply_teacache` builds its own state, so
pipelines never share it.

A skipped step never calls the blocks' forward, so a counter hooked inside the last block counts only
computed steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils.torch_utils import unwrap_module

# TeaCache4FLUX's rescale polynomial, highest degree first.
FLUX_COEFFICIENTS = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)

_TEACACHE_HEAD_HOOK = "teacache_head_block_hook"
_TEACACHE_BLOCK_HOOK = "teacache_block_hook"


@dataclass
class TeaCacheConfig:
    r"""Configuration for TeaCache on `FluxTransformer2DModel`.

    Args:
        threshold (`float`, defaults to `0.4`):
            Budget of accumulated rescaled distance a run of skipped steps may use. TeaCache4FLUX reports about
            1.5x at 0.25, 1.8x at 0.4, 2.0x at 0.6 and 2.25x at 0.8; 0 computes every step.
        num_inference_steps (`int`, defaults to `28`):
            Steps of the coming generation: the last one always computes. A server sets it per request.
        coefficients (`tuple[float, ...]`):
            The rescale polynomial, highest degree first (fitted on FLUX.1).
    """

    threshold: float = 0.4
    num_inference_steps: int = 28
    coefficients: tuple[float, ...] = FLUX_COEFFICIENTS


class TeaCacheRule:
    """TeaCache's decision on plain numbers: rescale, accumulate, skip while below the threshold, reset on a
    computed step. No tensors, so it can be checked against a hand-computed sequence."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...]) -> None:
        self.threshold = threshold
        self.coefficients = coefficients
        self.accumulated = 0.0

    def rescale(self, distance: float) -> float:
        """The polynomial at `distance` (Horner's rule)."""
        value = 0.0
        for coefficient in self.coefficients:
            value = value * distance + coefficient
        return value

    def should_compute(self, distance: float | None) -> bool:
        """Whether this step runs the blocks; `distance` is None for a step that must compute."""
        if distance is not None:
            self.accumulated += self.rescale(distance)
            if self.accumulated < self.threshold:
                return False
        self.accumulated = 0.0
        return True


class TeaCacheState(BaseState):
    """One generation's TeaCache state for one cache context."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...]) -> None:
        self.rule = TeaCacheRule(threshold, coefficients)
        self.step_index = 0
        self.should_compute = True
        self.previous_modulated_input: torch.Tensor | None = None
        self.blocks_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def reset(self) -> None:
        """Nothing to clear: the StateManager drops this state after resetting it; the next generation gets a
        new one."""


def relative_l1_distance(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current - previous| / mean |previous|, accumulated in float32."""
    change = (current - previous).abs().mean(dtype=torch.float32)
    return (change / previous.abs().mean(dtype=torch.float32)).item()


class _FluxBlockHook(ModelHook):
    """Reads a FLUX block's inputs and builds its (encoder_hidden_states, hidden_states) output."""

    def __init__(self, state_manager: StateManager) -> None:
        super().__init__()
        self.state_manager = state_manager
        self._metadata = None

    def initialize_hook(self, module):
        self._metadata = TransformerBlockRegistry.get(unwrap_module(module).__class__)
        return module

    def _input(self, name: str, args, kwargs) -> torch.Tensor:
        return self._metadata._get_parameter_from_args_kwargs(name, args, kwargs)

    def _output(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple:
        output = [None, None]
        output[self._metadata.return_hidden_states_index] = hidden_states
        output[self._metadata.return_encoder_hidden_states_index] = encoder_hidden_states
        return tuple(output)


class TeaCacheHeadHook(_FluxBlockHook):
    """On the first double block: decides the step, and on a skipped step returns input + cached residual."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, config: TeaCacheConfig) -> None:
        super().__init__(state_manager)
        self.config = config

    def new_forward(self, module, *args, **kwargs):
        hidden_states = self._input("hidden_states", args, kwargs)
        modulated_input = module.norm1(hidden_states, emb=self._input("temb", args, kwargs))[0]
        state = self.state_manager.get_state()
        state.should_compute = self._decide(state, modulated_input)
        if state.should_compute:
            state.blocks_input = hidden_states
            return self.fn_ref.original_forward(*args, **kwargs)
        encoder_hidden_states = self._input("encoder_hidden_states", args, kwargs)
        return self._output(hidden_states + state.residual, encoder_hidden_states)

    @torch.compiler.disable
    def _decide(self, state: TeaCacheState, modulated_input: torch.Tensor) -> bool:
        first_or_last = state.step_index in (0, self.config.num_inference_steps - 1)
        distance = None if first_or_last else relative_l1_distance(modulated_input, state.previous_modulated_input)
        state.previous_modulated_input = modulated_input
        state.step_index += 1
        return state.rule.should_compute(distance)

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class TeaCacheBlockHook(_FluxBlockHook):
    """On every later block: passes its input through on a skipped step; the last block caches the residual."""

    def __init__(self, state_manager: StateManager, is_tail: bool = False) -> None:
        super().__init__(state_manager)
        self.is_tail = is_tail

    def new_forward(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        if not state.should_compute:
            return self._output(
                self._input("hidden_states", args, kwargs), self._input("encoder_hidden_states", args, kwargs)
            )
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            state.residual = output[self._metadata.return_hidden_states_index] - state.blocks_input
        return output


def apply_teacache(transformer: FluxTransformer2DModel, config: TeaCacheConfig) -> None:
    """Enable TeaCache as `transformer.enable_cache` enables diffusers' caches (which it cannot take: it knows
    only its own configs): hooks on every block, the config recorded so a second cache is refused."""
    if not isinstance(transformer, FluxTransformer2DModel):
        raise ValueError(f"TeaCache's rescale polynomial is fitted on FLUX, not {type(transformer).__name__}")
    if transformer.is_cache_enabled:
        raise ValueError(f"caching is already enabled with {type(transformer._cache_config).__name__}")
    state_manager = StateManager(
        TeaCacheState, init_kwargs={"threshold": config.threshold, "coefficients": config.coefficients}
    )
    head, *middle, tail = (*transformer.transformer_blocks, *transformer.single_transformer_blocks)
    hooks = [(head, TeaCacheHeadHook(state_manager, config), _TEACACHE_HEAD_HOOK)]
    hooks += [(block, TeaCacheBlockHook(state_manager), _TEACACHE_BLOCK_HOOK) for block in middle]
    hooks.append((tail, TeaCacheBlockHook(state_manager, is_tail=True), _TEACACHE_BLOCK_HOOK))
    for block, hook, name in hooks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, name)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._cache_config = config
