"""What the CUDA-graph wrapper does without capturing (capture needs a GPU): a sealed or paused wrapper runs the plain
forward with the call's own arguments, and sealing and pausing reach a wrapper beneath a scheduled step cache."""

from __future__ import annotations

import types

import torch

from fluxserve.optimizations.cuda_graph import GraphedForward, eager_forward, seal_cuda_graphs


def recording_forward(calls: list):
    def forward(*args, **kwargs):
        calls.append((args, kwargs))
        return "plain"

    return forward


def test_a_sealed_graphed_forward_runs_unseen_shapes_plainly_with_positional_arguments():
    calls = []
    graphed = GraphedForward(recording_forward(calls))
    graphed.seal()
    ids = torch.ones(1, 77, dtype=torch.long)
    assert graphed(ids, output_hidden_states=False) == "plain"  # a text encoder's call: the ids are positional
    ((args, kwargs),) = calls
    assert args[0] is ids and kwargs == {"output_hidden_states": False}
    assert graphed.captured == {}


def test_sealing_and_pausing_reach_the_graphs_beneath_a_scheduled_cache():
    calls = []
    graphed = GraphedForward(recording_forward(calls))
    cache = types.SimpleNamespace(forward=graphed, sealed=False)
    cache.seal = lambda: setattr(cache, "sealed", True)
    transformer = types.SimpleNamespace(forward=cache)
    seal_cuda_graphs(transformer)
    assert graphed.sealed and cache.sealed
    with eager_forward(transformer):
        assert graphed.paused
        assert graphed(hidden_states=torch.zeros(1)) == "plain"
    assert not graphed.paused and len(calls) == 1
