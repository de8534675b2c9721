"""Replay the transformer's whole forward (one denoising step) as a CUDA graph, captured on first use.

Eager FLUX issues thousands of small kernels per step from Python. Inside Triton's Python backend stub, whose
interpreter runs through the shared libpython (two thirds of the bytecode speed of a static python3 on the
H200 host, perf/results/h200), that host work becomes the bound; a graph replays the step with one launch. Uses
PyTorch's CUDA graph API (torch.cuda.graph); this wrapper only keys graphs by input shape and copies the inputs
into the captured buffers. Only for stacks without a step cache: a cache's skip decision is host control flow.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS handles, compile, autotuning)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the buffers the graph reads; each call copies its tensors into them
    outputs: object  # what the captured forward returned; overwritten by the next replay


class GraphedForward:
    """Stands in for `module.forward`: replays a graph per (input shapes, other arguments), capturing it the
    first time, until the load seals it: then a shape without a graph runs the plain forward (capturing costs
    two extra forwards, and each graph holds memory: only the load's warm-up sizes get one). Outputs live in the
    graph's buffers until the next call, which the denoising loop allows: it consumes each step's prediction
    before the next step."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.captured: dict[tuple, _Captured] = {}
        self.pool = None  # one memory pool for every shape's graph: one request runs at a time
        self.paused = False
        self.sealed = False

    def __call__(self, *args, **kwargs):
        if args or self.paused:  # diffusers passes keywords only; positional calls stay eager
            return self.forward(*args, **kwargs)
        tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        others = {name: value for name, value in kwargs.items() if name not in tensors}
        key = (tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(tensors.items())),
               repr(sorted(others.items())))
        captured = self.captured.get(key)
        if captured is None:
            if self.sealed:
                return self.forward(**kwargs)
            captured = self.captured[key] = self._capture(tensors, others)
        for name, buffer in captured.inputs.items():
            buffer.copy_(tensors[name])
        captured.graph.replay()
        return captured.outputs

    def _capture(self, tensors: dict[str, torch.Tensor], others: dict) -> _Captured:
        inputs = {name: tensor.clone() for name, tensor in tensors.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.forward(**inputs, **others)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.forward(**inputs, **others)
        self.pool = graph.pool()
        log.info("captured a CUDA graph of the transformer for %s", {n: tuple(t.shape) for n, t in inputs.items()})
        return _Captured(graph, inputs, outputs)

    @contextlib.contextmanager
    def eager(self):
        """Run the plain forward meanwhile (to profile which kernels it launches)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def apply_cuda_graph(transformer: torch.nn.Module) -> None:
    """Make the transformer's forward replay CUDA graphs (module hooks still run, outside the graph)."""
    transformer.forward = GraphedForward(transformer.forward)


def seal_cuda_graphs(transformer: torch.nn.Module) -> None:
    """Capture no more graphs (the load is over): shapes without one run the plain forward."""
    if isinstance(transformer.forward, GraphedForward):
        transformer.forward.sealed = True


def eager_forward(transformer: torch.nn.Module):
    """A context in which the transformer runs its plain forward, graphed or not."""
    forward = transformer.forward
    return forward.eager() if isinstance(forward, GraphedForward) else contextlib.nullcontext()
