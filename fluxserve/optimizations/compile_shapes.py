"""Which image sizes compiled code serves: one general graph for every size, plus code specialised to listed sizes.

The general graph is compiled with only the dimensions that follow the image size symbolic (the image tokens, the
latent's height and width), marked before each call (`torch._dynamo.maybe_mark_dynamic`): every other dimension
(channels, heads, the 512 text tokens) stays a constant, so Inductor's kernels keep their fixed sizes and Dynamo
reasons about one or two symbols instead of every dimension (torch.compile's `dynamic=True`).

Code specialised to a size (`dynamic=False`) is still faster: on the H200, 2.4% at 1024x1024 against `dynamic=True`
(perf/results/h200/s11-production-traffic). A stack compiles it at load for its `specialised_sizes`
(`StackPipeline.warm_up`), and a request at such a size runs it (`specialised_code`). Both live beside each other
in Dynamo's cache for the same function: its entries are kept per torch.compile backend, and the two wrappers'
backends differ (`dynamic=False` against `None`), so a lookup never mixes them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch

# Where the image size shows in each compiled function's inputs: argument (name or position) -> its dimensions.
BLOCK_SIZE_DIMS = {"hidden_states": (1,), "image_rotary_emb": (0,)}  # a FLUX block: image tokens; rotary rows
TRANSFORMER_SIZE_DIMS = {"hidden_states": (1,), "img_ids": (0,)}  # the whole transformer: image tokens
VAE_DECODE_SIZE_DIMS = {0: (2, 3)}  # the latents (batch, channels, height, width)

_SPECIALISED = contextvars.ContextVar("fluxserve_specialised_code", default=False)


@contextlib.contextmanager
def specialised_code(on: bool = True):
    """Within it, compiled functions run (and at load, compile) the code specialised to the current inputs' shapes."""
    token = _SPECIALISED.set(on)
    try:
        yield
    finally:
        _SPECIALISED.reset(token)


def allow_specialisations(sizes: int) -> None:
    """Let Dynamo keep a specialised entry per size beside the general ones (per function: two block classes and the
    stride variant of the single blocks' text input share `Module._call_impl`); past its recompile limit it would
    run the function uncompiled."""
    needed = 4 * (sizes + 1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)


class SizeRouted:
    """Stands in for a compiled function: calls the general graph, with the size's dimensions marked dynamic, or,
    inside `specialised_code`, the code compiled for these exact shapes. `pre_hooks` run first, eagerly (the step
    counter, where this function sits below a step cache's skip decision)."""

    def __init__(self, function: Callable, size_dims: dict, dynamic: bool = True) -> None:
        self.general = torch.compile(function, dynamic=None)
        self.specialised = torch.compile(function, dynamic=False)
        self.size_dims = size_dims if dynamic else {}  # none: code specialised to the first size, as torch's default
        self.pre_hooks: list[Callable[[], None]] = []

    def __call__(self, *args, **kwargs):
        for hook in self.pre_hooks:
            hook()
        if _SPECIALISED.get():
            return self.specialised(*args, **kwargs)
        for where, dims in self.size_dims.items():
            value = (args[where] if where < len(args) else None) if isinstance(where, int) else kwargs.get(where)
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    torch._dynamo.maybe_mark_dynamic(tensor, dims)
        return self.general(*args, **kwargs)
