"""compile_shapes: the general graph keeps every dimension but the size's constant and serves new sizes without
compiling; code specialised to a size is compiled and run only inside `specialised_code`, beside the general graph.
Each torch.compile here gets its own recording backend (as Inductor's wrappers are distinct per call), which keeps
the graphs as Dynamo captured them and counts the calls of each."""

from __future__ import annotations

import pytest
import torch

from fluxserve.optimizations.compile_shapes import SizeRouted, allow_specialisations, specialised_code


class Recorder:
    """A torch.compile backend: remembers each graph's input shapes as Dynamo traced them (a symbolic dimension a
    SymInt) and counts the graph's runs."""

    def __init__(self, dynamic) -> None:
        self.dynamic = dynamic
        self.graphs: list[list[tuple]] = []
        self.runs = 0

    def __call__(self, graph, example_inputs):
        traced = [node.meta["example_value"] for node in graph.graph.nodes if node.op == "placeholder"]
        self.graphs.append([tuple(value.shape) for value in traced if isinstance(value, torch.Tensor)])

        def run(*args):
            self.runs += 1
            return graph.forward(*args)

        return run


@pytest.fixture
def recorders(monkeypatch):
    """Every torch.compile in the test: its recorder, by the `dynamic` it was asked for."""
    made: dict = {}
    compile_ = torch.compile

    def compile_recording(function, dynamic=None, **kwargs):
        made[dynamic] = Recorder(dynamic)
        return compile_(function, backend=made[dynamic], dynamic=dynamic, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_recording)
    torch._dynamo.reset()
    yield made
    torch._dynamo.reset()


def block(hidden_states, scale):
    """Stands in for a FLUX block: tokens along dimension 1, a fixed width along 2."""
    return (hidden_states * scale).softmax(dim=-1) + hidden_states.mean(dim=1, keepdim=True)


def inputs(tokens: int):
    return dict(hidden_states=torch.randn(1, tokens, 8), scale=torch.randn(8))


def test_the_general_graph_serves_every_token_count_and_keeps_the_width_constant(recorders):
    routed = SizeRouted(block, {"hidden_states": (1,)})
    for tokens in (16, 24, 40, 7):
        kwargs = inputs(tokens)
        assert torch.allclose(routed(**kwargs), block(**kwargs))
    general = recorders[None]
    assert len(general.graphs) == 1 and general.runs == 4  # one graph, never compiled again
    (shape, _) = general.graphs[0]
    assert isinstance(shape[1], torch.SymInt) and shape[2] == 8  # only the tokens are symbolic
    assert recorders[False].graphs == []


def test_specialised_code_is_compiled_and_run_only_inside_specialised_code(recorders):
    allow_specialisations(3)
    routed = SizeRouted(block, {"hidden_states": (1,)})
    routed(**inputs(16))  # the general graph, first
    for tokens in (16, 24):
        with specialised_code():
            kwargs = inputs(tokens)
            assert torch.allclose(routed(**kwargs), block(**kwargs))
    specialised, general = recorders[False], recorders[None]
    assert [graph[0] for graph in specialised.graphs] == [(1, 16, 8), (1, 24, 8)]  # one per size, all constant
    with specialised_code():
        routed(**inputs(16))
    assert len(specialised.graphs) == 2 and specialised.runs == 3  # 16 again: its graph, not a new one
    routed(**inputs(16))
    routed(**inputs(24))
    assert len(general.graphs) == 1 and general.runs == 3  # outside: the general graph, also at 16 and 24


def test_pre_hooks_run_once_per_call_on_either_path(recorders):
    calls = []
    routed = SizeRouted(block, {"hidden_states": (1,)})
    routed.pre_hooks.append(lambda: calls.append(1))
    routed(**inputs(16))
    with specialised_code():
        routed(**inputs(16))
    assert len(calls) == 2


def test_without_dynamic_the_first_size_is_specialised_as_torch_compiles_by_default(recorders):
    routed = SizeRouted(block, {"hidden_states": (1,)}, dynamic=False)
    routed(**inputs(16))
    assert recorders[None].graphs[0][0] == (1, 16, 8)
