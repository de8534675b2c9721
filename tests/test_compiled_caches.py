"""Regional compilation under every step cache: a computed step must run the blocks' compiled code, not eager code.

Compile counts do not tell: a block whose compiled frame graph-breaks straight into a compiler-disabled cache
hook still counts a compiled frame (an empty one) while the block itself runs eagerly. What runs does tell: the
stacks compile through `torch.compile` as they do when served, but with a counting backend instead of Inductor
(which takes minutes to compile on two CPU cores). It runs each graph Dynamo captured as captured, and counts the
attention calls inside the graphs as they execute. Every FLUX block calls attention once, so a computed step must
execute one compiled attention per block. The images are compared on the unit-scale weights
(conftest.unit_scale_weights), where every block shows: on synthetic:tiny's, a compiled block whose output is lost
makes the same image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxserve.contract import GenerationRequest
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import Stack
from fluxserve.weights.synthetic import TINY
from fluxserve.weights import parse_source

REQUEST = GenerationRequest(prompt="a lighthouse", seed=0, steps=8, guidance=3.5, height=64, width=64)
CACHES = {  # settings under which each cache skips some of REQUEST's steps on the unit-scale weights, computes others
    "magcache": dict(cache_threshold=0.24),
    "fbcache": dict(cache_threshold=0.5),
    "teacache": dict(cache_threshold=0.4),
    "taylorseer": dict(cache_interval=3),
}
# Steps of REQUEST's 8 that a cache computes by its rule alone, whatever the activations: MagCache at 0.24 over
# diffusers' FLUX magnitude ratios computes step 0 (its first 10%) and step 3 (where the error accumulated from the
# ratios passes 0.24; steps 4-7 stay below it); TaylorSeer at interval 3 steps 0, 1, 2 (warm-up), 4 and 7 (the last).
# FBCache and TeaCache decide from the activations.
COMPUTED_BY_RULE = {"magcache": 2, "taylorseer": 5}
FIRST_BLOCK_ALWAYS_RUNS = ("fbcache",)  # FBCache decides from the first block's output, so it runs on every step


class CountingBackend:
    """A torch.compile backend that runs the captured graphs unchanged and counts the attention calls executed
    inside them."""

    def __init__(self) -> None:
        self.graphs = 0
        self.attention_calls = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        attentions = sum("scaled_dot_product_attention" in str(node.target) for node in graph_module.graph.nodes)

        def run(*args):
            self.attention_calls += attentions
            return graph_module.forward(*args)

        return run


@pytest.fixture
def counting_compile(monkeypatch) -> CountingBackend:
    """Every torch.compile in the test compiles with one CountingBackend, from empty Dynamo caches."""
    backend = CountingBackend()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compile_(*args, **{**kwargs, "backend": backend}))
    torch._dynamo.reset()
    yield backend
    torch._dynamo.reset()


def generate(stack: Stack, weights: str = "synthetic:tiny"):
    """Build the stack on `weights` (no warm-up: the first request compiles) and run REQUEST once."""
    pipeline = build_pipeline(stack, parse_source(weights), torch.device("cpu"))
    transformer = pipeline.pipe.transformer
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    return pipeline.generate(REQUEST), blocks


@pytest.mark.parametrize("cache", CACHES)
def test_computed_steps_run_the_compiled_blocks_and_make_the_eager_image(cache, counting_compile, unit_scale_weights):
    eager, _ = generate(Stack(cache=cache, **CACHES[cache]), str(unit_scale_weights))
    assert counting_compile.graphs == 0
    compiled, blocks = generate(Stack(cache=cache, compile="regional", **CACHES[cache]), str(unit_scale_weights))
    if cache in COMPUTED_BY_RULE:
        assert compiled.steps_computed == COMPUTED_BY_RULE[cache]
    else:
        assert 0 < compiled.steps_computed < REQUEST.steps  # the cache skipped some steps and computed the others
    assert compiled.steps_computed == eager.steps_computed
    skipped = REQUEST.steps - compiled.steps_computed
    runs_on_skipped = 1 if cache in FIRST_BLOCK_ALWAYS_RUNS else 0
    assert counting_compile.attention_calls == blocks * compiled.steps_computed + runs_on_skipped * skipped
    # The counting backend runs the very ops of the eager blocks (Inductor would round differently), so the
    # images are equal, not just close.
    np.testing.assert_array_equal(compiled.image, eager.image)


def test_compiled_magcache_blocks_share_their_code_beyond_the_recompile_limit(counting_compile, monkeypatch):
    """One compiled graph serves every block of a class, as under `compile_repeated_blocks`: with more blocks of
    each class than Dynamo's recompile limit (past which a frame falls back to eager), every block of every
    computed step still runs compiled code."""
    limit = torch._dynamo.config.recompile_limit
    monkeypatch.setitem(TINY["transformer"], "num_layers", limit + 2)
    monkeypatch.setitem(TINY["transformer"], "num_single_layers", limit + 4)
    generation, blocks = generate(Stack(cache="magcache", cache_threshold=0.24, compile="regional"))
    assert blocks == 2 * limit + 6
    assert generation.steps_computed == COMPUTED_BY_RULE["magcache"]
    assert counting_compile.attention_calls == blocks * generation.steps_computed
    assert counting_compile.graphs <= 6  # as many as synthetic:tiny's 4 blocks compile (6), not one per block
