"""Optimizations applied in-process on CPU: what they change beyond the model they are applied to."""

from __future__ import annotations

import torch

from fluxserve.contract import GenerationRequest
from fluxserve.optimize import QUANTIZED_COMPILE_OPTIONS
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import Stack
from fluxserve.weights import parse_source


def test_a_quantized_compiled_stack_keeps_torchaos_inductor_options_to_itself(monkeypatch):
    import torch._inductor.config as inductor

    compiled_with = []
    compile_ = torch.compile

    def recording_compile(*args, **kwargs):
        compiled_with.append(kwargs.get("options"))
        return compile_(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    before = {name: getattr(inductor, name) for name in QUANTIZED_COMPILE_OPTIONS}
    assert not any(before.values())  # Inductor's defaults: the options below are torchao's, not the process's
    stack = Stack(quantization="int8", compile="regional")
    request = GenerationRequest(prompt="a lighthouse", seed=3, steps=2, guidance=3.5, height=64, width=64)
    pipeline = build_pipeline(stack, parse_source("synthetic:tiny"), torch.device("cpu"), request)
    generation = pipeline.generate(request)
    assert generation.image.shape == (64, 64, 3) and generation.steps_computed == 2
    assert pipeline.compile_stats["graphs"] >= 1
    assert compiled_with and all(options == QUANTIZED_COMPILE_OPTIONS for options in compiled_with)  # every block
    assert {name: getattr(inductor, name) for name in QUANTIZED_COMPILE_OPTIONS} == before
