"""TeaCache: the decision rule on known distances, the hook in a synthetic:tiny pipeline, and through the server.
Also how the other step caches (MagCache, TaylorSeer) skip, as far as steps_computed is concerned."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import TEACACHE_ALWAYS_SKIPS, TEACACHE_NEVER_SKIPS
from fluxserve.contract import GenerationRequest
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import Stack
from fluxserve.optimizations.teacache import FLUX_COEFFICIENTS, TeaCacheRule
from fluxserve.weights import parse_source
from test_serving import infer, output

SOURCE = parse_source("synthetic:tiny")
STEPS = 8


def request(seed: int = 1, steps: int = STEPS) -> GenerationRequest:
    return GenerationRequest(prompt="a red fox in snow", seed=seed, steps=steps, guidance=3.5, height=64, width=64)


def pipeline(stack: Stack):
    return build_pipeline(stack, SOURCE, torch.device("cpu"))


class Recorder:
    """Runs requests on a pipeline, recording per denoising step how many blocks really ran (called attention)."""

    def __init__(self, stack_pipeline) -> None:
        self.pipeline = stack_pipeline
        transformer = stack_pipeline.pipe.transformer
        self.blocks = (*transformer.transformer_blocks, *transformer.single_transformer_blocks)
        self.blocks_run: list[int] = []
        transformer.register_forward_pre_hook(lambda module, args: self.blocks_run.append(0))
        for block in self.blocks:
            block.attn.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.blocks_run[-1] += 1

    def pattern(self, req: GenerationRequest, **kwargs) -> list[bool]:
        """Run `req`; per step, whether it computed."""
        self.blocks_run = []
        self.generation = self.pipeline.generate(req, **kwargs)
        return [count > 0 for count in self.blocks_run]


SKIPS_ALL_BUT_FIRST_AND_LAST = [True] + [False] * (STEPS - 2) + [True]


# --- the rule, on known distances --------------------------------------------------------------------------


def flux_polynomial(x: float) -> float:
    return 498.651651 * x**4 - 283.781631 * x**3 + 55.8554382 * x**2 - 3.82021401 * x + 0.264230861


def test_rescale_is_the_teacache4flux_polynomial():
    rule = TeaCacheRule(0.4, FLUX_COEFFICIENTS)
    assert rule.rescale(0.0) == pytest.approx(0.264230861)
    assert rule.rescale(0.05) == pytest.approx(0.1805026249, abs=1e-10)  # by hand, term by term
    assert rule.rescale(0.1) == pytest.approx(0.2068473761, abs=1e-10)
    for x in (0.02, 0.3, 0.7):
        assert rule.rescale(x) == pytest.approx(flux_polynomial(x))


def test_rule_accumulates_skips_and_resets_as_computed_by_hand():
    rule = TeaCacheRule(0.5, FLUX_COEFFICIENTS)
    # (distance or None for a step that must compute, decision, accumulator after the step)
    sequence = [
        (None, True, 0.0),  # first step
        (0.05, False, 0.1805026249),  # 0.1805 < 0.5: reuse the residual
        (0.05, False, 0.3610052498),  # 0.3610 < 0.5
        (0.1, True, 0.0),  # 0.3610 + 0.2068 = 0.5679 >= 0.5: compute, reset
        (0.1, False, 0.2068473761),
        (None, True, 0.0),  # last step: computes, whatever the sum
    ]
    for distance, computes, accumulated in sequence:
        assert rule.should_compute(distance) is computes
        assert rule.accumulated == pytest.approx(accumulated, abs=1e-9)


def test_threshold_zero_never_skips_because_the_polynomial_stays_positive():
    rule = TeaCacheRule(0.0, FLUX_COEFFICIENTS)
    assert all(rule.should_compute(x) for x in np.linspace(0.0, 2.0, 401))


# --- the hook, in a synthetic:tiny pipeline ----------------------------------------------------------------


def test_threshold_zero_computes_every_step_and_matches_no_cache_bit_for_bit():
    plain = pipeline(Stack()).generate(request())
    cached = pipeline(TEACACHE_NEVER_SKIPS).generate(request())
    assert cached.steps_computed == STEPS
    assert np.array_equal(plain.image, cached.image)


def test_large_threshold_computes_only_the_first_and_last_steps():
    recorder = Recorder(pipeline(TEACACHE_ALWAYS_SKIPS))
    outputs = []
    recorder.pipeline.pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    assert recorder.pattern(request()) == SKIPS_ALL_BUT_FIRST_AND_LAST
    assert recorder.generation.steps_computed == 2
    assert len(outputs) == STEPS and all(torch.isfinite(output).all() for output in outputs)
    assert recorder.generation.image.shape == (64, 64, 3)


def test_a_skipped_step_adds_the_cached_image_residual_to_the_blocks_input():
    stack_pipeline = pipeline(TEACACHE_ALWAYS_SKIPS)
    transformer = stack_pipeline.pipe.transformer
    blocks_in, blocks_out = [], []
    transformer.x_embedder.register_forward_hook(lambda module, args, output: blocks_in.append(output))
    transformer.norm_out.register_forward_pre_hook(lambda module, args: blocks_out.append(args[0]))
    stack_pipeline.generate(request(steps=4))
    residual = blocks_out[0] - blocks_in[0]
    assert residual.abs().max() > 0
    for step in (1, 2):
        assert torch.equal(blocks_out[step], blocks_in[step] + residual)


def test_no_state_leaks_between_requests_even_after_a_cancelled_one():
    stack = Stack(cache="teacache", cache_threshold=0.6)
    alone = {seed: Recorder(pipeline(stack)).pattern(request(seed)) for seed in (1, 2)}
    assert not all(alone[1]) and not all(alone[2]), "the threshold must make some steps skip"
    shared = Recorder(pipeline(stack))
    assert [shared.pattern(request(seed)) for seed in (1, 2)] == [alone[1], alone[2]]
    assert shared.pattern(request(3), should_stop=lambda: True) == [True]  # cancelled after the first step
    assert shared.pattern(request(2)) == alone[2]


def test_concurrent_pipelines_keep_their_own_state():
    stacks = (TEACACHE_NEVER_SKIPS, TEACACHE_ALWAYS_SKIPS)
    recorders = [Recorder(pipeline(stack)) for stack in stacks]
    with ThreadPoolExecutor(len(recorders)) as pool:
        patterns = list(pool.map(lambda recorder: [recorder.pattern(request(seed)) for seed in (1, 2)], recorders))
    assert patterns == [[[True] * STEPS] * 2, [SKIPS_ALL_BUT_FIRST_AND_LAST] * 2]


# --- every step cache skips whole steps, so steps_computed is honest ---------------------------------------


@pytest.mark.parametrize(
    "stack,computed",
    [
        (Stack(cache="teacache", cache_threshold=0.6), None),  # decided from the activations: some of the 8
        (Stack(cache="magcache", cache_threshold=0.24), 2),  # steps 0 and 3, from diffusers' FLUX magnitude ratios
        (Stack(cache="taylorseer", cache_interval=3), 5),  # steps 0, 1, 2, 4 and 7
    ],
    ids=lambda value: value.name if isinstance(value, Stack) else None,
)
def test_a_step_runs_every_block_or_none_and_steps_computed_counts_the_full_ones(stack, computed):
    recorder = Recorder(pipeline(stack))
    recorder.pattern(request())
    assert len(recorder.blocks_run) == STEPS and set(recorder.blocks_run) <= {0, len(recorder.blocks)}
    assert recorder.generation.steps_computed == recorder.blocks_run.count(len(recorder.blocks)) < STEPS
    if computed is not None:
        assert recorder.generation.steps_computed == computed


def test_magcache_follows_the_request_step_count():
    """At 8 steps, MagCache computes its 10% retention (step 0), then skips at most 5 steps in a row."""
    recorder = Recorder(pipeline(Stack(cache="magcache", cache_threshold=1e6)))
    expected = [True] + [False] * 5 + [True, False]
    assert [recorder.pattern(request(seed)) for seed in (1, 2)] == [expected] * 2


def test_taylorseer_computes_its_warm_up_every_intervalth_step_and_the_last_one_at_any_step_count():
    """Interval 3 after 3 warm-up steps computes steps 0-2, then every third from step 4, and always the last."""
    recorder = Recorder(pipeline(Stack(cache="taylorseer", cache_interval=3)))
    patterns = [recorder.pattern(request(steps=steps)) for steps in (8, 10, 8)]
    computed = [[step for step, ran in enumerate(pattern) if ran] for pattern in patterns]
    assert computed == [[0, 1, 2, 4, 7], [0, 1, 2, 4, 7, 9], [0, 1, 2, 4, 7]]


# --- through the server ------------------------------------------------------------------------------------


def test_server_large_threshold_computes_first_and_last_steps_request_after_request(server):
    for seed in (5, 6):
        result = infer(server, TEACACHE_ALWAYS_SKIPS.name, SEED=seed, STEPS=6, HEIGHT=64, WIDTH=64)
        assert output(result, "STEPS_COMPUTED")[0] == 2
        assert output(result, "IMAGE").shape == (64, 64, 3)
