"""GELU's tanh approximation written as a sigmoid: the form the compiled stacks and the fp8 row kernel compute."""

from __future__ import annotations

import math

import torch

GELU_TANH_COEFFICIENT = 0.044715
GELU_TANH_SLOPE = 2 * (2 / math.pi) ** 0.5  # twice tanh's sqrt(2/pi): 0.5 (1 + tanh(z)) = sigmoid(2z)


def gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, 0.5 x (1 + tanh(z)), written as x sigmoid(2z): the same function, computed in
    float32 like torch's own and returned in x's dtype."""
    x32 = x.float()
    return (x32 * torch.sigmoid(GELU_TANH_SLOPE * (x32 + GELU_TANH_COEFFICIENT * x32 * x32 * x32))).to(x.dtype)
