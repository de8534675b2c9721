"""The scheduled form of MagCache and TaylorSeer (what the `cudagraph` cache stacks replay from CUDA graphs) against
diffusers' own hooks: the same steps computed and the same image.

CUDA graphs need a GPU; here the graphed stacks are built with everything but the graph (the step function runs
eagerly, as it does on a GPU at a size the load captured no graph for). The images are compared on the unit-scale
weights (conftest.unit_scale_weights), where every block shows in the image: on synthetic:tiny's, a skipped block
or a lost residual makes the same image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import fluxserve.pipeline
from fluxserve.contract import GenerationRequest
from fluxserve.optimizations import apply
from fluxserve.optimizations.scheduled_cache import ScheduledCache, magcache_schedule, taylorseer_schedule
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import Stack, StackError
from fluxserve.weights import parse_source
from test_compiled_caches import counting_compile  # noqa: F401 (a fixture)

REQUEST = GenerationRequest(prompt="a lighthouse", seed=0, steps=8, guidance=3.5, height=64, width=64)
CACHES = {"magcache": dict(cache_threshold=0.24), "taylorseer": dict(cache_interval=3)}


@pytest.fixture
def graphs_on_cpu(monkeypatch) -> list:
    """Let `cuda_graph` stacks build on the CPU without their graphs; returns what the graphs would have wrapped."""
    wrapped = []
    check_supported = fluxserve.pipeline.check_supported
    monkeypatch.setattr(fluxserve.pipeline, "check_supported",
                        lambda stack, device: check_supported(dataclasses.replace(stack, cuda_graph=False), device))
    monkeypatch.setattr(apply, "apply_cuda_graph", wrapped.append)
    monkeypatch.setattr(fluxserve.pipeline, "apply_text_encoder_graphs", lambda pipe: None)
    return wrapped


def build(stack: Stack, weights) -> fluxserve.pipeline.StackPipeline:
    return build_pipeline(stack, parse_source(str(weights)), torch.device("cpu"))


@pytest.mark.parametrize("cache", CACHES)
def test_scheduled_cache_computes_the_hooks_steps_and_image(cache, graphs_on_cpu, unit_scale_weights):
    hooks = build(Stack(cache=cache, **CACHES[cache]), unit_scale_weights)
    scheduled = build(Stack(cache=cache, cuda_graph=True, **CACHES[cache]), unit_scale_weights)
    (graphed,) = graphs_on_cpu
    assert isinstance(graphed, ScheduledCache)  # the graphs replay the cache's step function, below its schedule
    assert scheduled.pipe.transformer.forward is graphed
    for steps in (1, 3, 8, 20):
        request = dataclasses.replace(REQUEST, steps=steps)
        expected, got = hooks.generate(request), scheduled.generate(request)
        assert got.steps_computed == expected.steps_computed, steps
        assert got.steps_computed == sum(graphed.schedule)
        np.testing.assert_array_equal(got.image, expected.image)
    assert 0 < got.steps_computed < 20  # the last request skipped steps: the comparison covered skipped steps
    again = scheduled.generate(request)  # a generation's state does not leak into the next
    np.testing.assert_array_equal(again.image, got.image)


@pytest.mark.parametrize("cache", CACHES)
def test_compiled_scheduled_cache_runs_the_compiled_blocks(cache, graphs_on_cpu, counting_compile, unit_scale_weights):
    """Under regional compilation (what the graphs capture on a GPU), a computed step runs each block's compiled code
    and a skipped step none, and the image is the hooks' eager one."""
    eager = build(Stack(cache=cache, **CACHES[cache]), unit_scale_weights).generate(REQUEST)
    pipeline = build(Stack(cache=cache, compile="regional", cuda_graph=True, **CACHES[cache]), unit_scale_weights)
    transformer = pipeline.pipe.transformer
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    compiled = pipeline.generate(REQUEST)
    assert compiled.steps_computed == eager.steps_computed < REQUEST.steps
    assert counting_compile.attention_calls == blocks * compiled.steps_computed
    np.testing.assert_array_equal(compiled.image, eager.image)


def test_scheduled_magcache_keeps_a_residual_only_for_sizes_seen_before_sealing(graphs_on_cpu):
    pipeline = build(Stack(cache="magcache", cuda_graph=True, **CACHES["magcache"]), "synthetic:tiny")
    (cache,) = graphs_on_cpu
    pipeline.generate(REQUEST)
    cache.seal()
    for size in (32, 48, 80):
        pipeline.generate(dataclasses.replace(REQUEST, height=size, width=size))
    pipeline.generate(REQUEST)
    assert list(cache.residuals) == [(1, 16, pipeline.pipe.transformer.inner_dim)]  # 64x64: 16 image tokens


def test_schedules_match_diffusers_hooks_for_every_step_count(unit_scale_weights):
    """The schedules, computed ahead, against the hooks' decisions as they run: which steps ran the last block."""
    for cache, schedule in (("magcache", magcache_schedule), ("taylorseer", taylorseer_schedule)):
        pipeline = build(Stack(cache=cache, **CACHES[cache]), unit_scale_weights)
        transformer = pipeline.pipe.transformer
        computed = []
        step = {"index": 0}

        def count_step(*_):
            step["index"] += 1

        transformer.register_forward_pre_hook(count_step)
        transformer.single_transformer_blocks[-1].norm.register_forward_pre_hook(
            lambda *_: computed.append(step["index"] - 1))
        for steps in (2, 5, 13, 28, 50):
            computed.clear()
            step["index"] = 0
            pipeline.generate(dataclasses.replace(REQUEST, steps=steps, height=32, width=32))
            config = transformer._cache_config  # as set for `steps` by the generation
            ahead = schedule(config, steps) if cache == "magcache" else schedule(config, steps, steps - 1)
            assert computed == [index for index, compute in enumerate(ahead) if compute], (cache, steps)


def test_a_cache_deciding_from_activations_cannot_replay_graphs():
    with pytest.raises(StackError, match="activations"):
        Stack(cache="teacache", cache_threshold=0.6, cuda_graph=True)
