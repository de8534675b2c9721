"""Replay the transformer's whole forward (one denoising step) as a CUDA graph, captured on first use.

Eager FLUX issues thousands of small kernels per step from Python. Inside Triton's Python backend stub, whose
interpreter runs through the shared libpython (two thirds of the bytecode speed of a static python3 on the
H200 host, perf/results/h200), that host work becomes the bound; a graph replays the step with one launch. Uses
PyTorch's CUDA graph API (torch.cuda.graph); this wrapper only keys graphs by input shape and copies the inputs
into the captured buffers. Under a step cache, only one whose schedule is fixed before the first step: its scheduled
form (`scheduled_cache`) decides on the host and replays a graph per kind of step; other caches decide from the
step's activations, on the host, between the blocks.
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
    inputs: dict[int | str, torch.Tensor]  # the buffers the graph reads (by position or name), refilled per call
    outputs: object  # what the captured forward returned; overwritten by the next replay


class GraphedForward:
    """Stands in for `module.forward`: replays a graph per (input shapes, other arguments), capturing it the
    first time, until the load seals it: then a shape without a graph runs the plain forward (capturing costs
    two extra forwards, and each graph holds memory: only the load's warm-up sizes get one). Outputs live in the
    graph's buffers until the next call, which the denoising loop allows: it consumes each step's prediction
    before the next step; with `copy_outputs` each call returns copies (a text encoder's output outlives the
    next call in the prompt cache)."""

    def __init__(self, forward, copy_outputs: bool = False) -> None:
        self.forward = forward
        self.copy_outputs = copy_outputs
        self.captured: dict[tuple, _Captured] = {}
        self.pool = None  # one memory pool for every shape's graph: one request runs at a time
        self.paused = False
        self.sealed = False

    def __call__(self, *args, **kwargs):
        if self.paused:
            return self.forward(*args, **kwargs)
        arguments = {**dict(enumerate(args)), **kwargs}
        tensors = {key: value for key, value in arguments.items() if isinstance(value, torch.Tensor)}
        others = {key: value for key, value in arguments.items() if key not in tensors}
        key = (tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(tensors.items(), key=_by_name)),
               repr(sorted(others.items(), key=_by_name)))
        captured = self.captured.get(key)
        if captured is None:
            if self.sealed:
                return self.forward(*args, **kwargs)
            captured = self.captured[key] = self._capture(tensors, others)
        for name, buffer in captured.inputs.items():
            buffer.copy_(tensors[name])
        captured.graph.replay()
        if self.copy_outputs:
            return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, captured.outputs)
        return captured.outputs

    def _capture(self, tensors: dict, others: dict) -> _Captured:
        inputs = {name: tensor.clone() for name, tensor in tensors.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._run({**inputs, **others})
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._run({**inputs, **others})
        self.pool = graph.pool()
        log.info("captured a CUDA graph of %s for %s", getattr(self.forward, "__qualname__", self.forward),
                 {name: tuple(t.shape) for name, t in inputs.items()})
        return _Captured(graph, inputs, outputs)

    def _run(self, arguments: dict):
        positional = [arguments[index] for index in range(sum(isinstance(key, int) for key in arguments))]
        return self.forward(*positional, **{key: value for key, value in arguments.items() if isinstance(key, str)})

    def seal(self) -> None:
        self.sealed = True

    @contextlib.contextmanager
    def eager(self):
        """Run the plain forward meanwhile (to profile which kernels it launches)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def apply_cuda_graph(owner) -> None:
    """Make the owner's forward replay CUDA graphs: the transformer's (its module hooks still run, outside the graph),
    or a scheduled step cache's step function (`scheduled_cache`)."""
    owner.forward = GraphedForward(owner.forward)


def apply_text_encoder_graphs(pipe) -> None:
    """Replay each text encoder (CLIP, T5) as a CUDA graph too: each sees one shape (its prompt padded to 77 and 512
    tokens), and run eagerly they are bound by the host's launches. The graph replays the same kernels, so the
    embeddings are the same; they are copied out of the graph's buffers (`copy_outputs`)."""
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.forward = GraphedForward(encoder.forward, copy_outputs=True)


def _by_name(item) -> str:
    """Sort key of an argument: its name, or its position for a positional one."""
    return str(item[0])


def _forwards(transformer: torch.nn.Module):
    """The transformer's forward and what it wraps, outermost first (a scheduled step cache above its graphs)."""
    forward = transformer.forward
    while forward is not None:
        yield forward
        forward = getattr(forward, "forward", None)


def seal_cuda_graphs(transformer: torch.nn.Module) -> None:
    """Capture no more graphs (the load is over): shapes without one run the plain forward. A step cache above the
    graphs is sealed too: it keeps state per shape only for shapes that have graphs."""
    for forward in _forwards(transformer):
        if hasattr(forward, "seal"):
            forward.seal()


def eager_forward(transformer: torch.nn.Module):
    """A context in which the transformer runs its plain forward, graphed or not."""
    graphed = next((forward for forward in _forwards(transformer) if isinstance(forward, GraphedForward)), None)
    return graphed.eager() if graphed is not None else contextlib.nullcontext()
