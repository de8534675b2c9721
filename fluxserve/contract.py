"""The request contract shared by the Triton model, the client and the perf harness.

Inputs:  PROMPT (BYTES [1], required), SEED (INT64 [1]), STEPS (INT32 [1]), GUIDANCE (FP32 [1]),
         HEIGHT and WIDTH (INT32 [1], multiples of 16).
Outputs: IMAGE (UINT8 [H, W, 3], RGB), IMAGE_PNG (BYTES [1]), STEPS_COMPUTED (INT32 [1]),
         INFO (BYTES [1], JSON telemetry).
Every check fails with `InvalidInput`, whose message names the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np

# name -> (config datatype, optional)
INPUTS = {
    "PROMPT": ("TYPE_STRING", False),
    "SEED": ("TYPE_INT64", True),
    "STEPS": ("TYPE_INT32", True),
    "GUIDANCE": ("TYPE_FP32", True),
    "HEIGHT": ("TYPE_INT32", True),
    "WIDTH": ("TYPE_INT32", True),
}
# name -> (config datatype, dims)
OUTPUTS = {
    "IMAGE": ("TYPE_UINT8", [-1, -1, 3]),
    "IMAGE_PNG": ("TYPE_STRING", [1]),
    "STEPS_COMPUTED": ("TYPE_INT32", [1]),
    "INFO": ("TYPE_STRING", [1]),
}
MAX_SEQUENCE_LENGTH = 512  # T5 tokens of the PROMPT FLUX.1-dev reads; the rest is truncated, with a warning
# The control API: with FLUXSERVE_ADMIN_KEY set, load/unload and the other admin endpoints need this header
# (Triton reads a gRPC client's header with a protocol prefix). Here, torch-free, for the client.
ADMIN_KEY_ENV = "FLUXSERVE_ADMIN_KEY"
ADMIN_HEADER = "admin-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
SIZE_MULTIPLE = 16
PIXELS_PER_TOKEN_SIDE = 16  # FLUX: VAE downsampling (8) x 2x2 latent packing: one token per 16x16 pixels
SEED_MAX = 2**63 - 1
# The usual FLUX.1 aspect-ratio buckets near one megapixel, and 512x512: what a compiled or graphed stack runs once
# at load by default (after its default size), so that no request at these sizes compiles or captures a graph.
WARMUP_BUCKETS = ((512, 512), (768, 1344), (1344, 768), (832, 1216), (1216, 832), (896, 1152), (1152, 896))


def admin_headers(protocol: str, admin_key: str) -> dict[str, str]:
    """Request headers that unlock the restricted APIs over `protocol` ('http' or 'grpc')."""
    return {(GRPC_HEADER_PREFIX if protocol == "grpc" else "") + ADMIN_HEADER: admin_key}


class InvalidInput(ValueError):
    """A request input outside the contract; the message names the field and what is allowed."""


@dataclass(frozen=True)
class Limits:
    """Per-model request limits: `config.pbtxt` parameter `limit_<field>` overrides each field."""

    default_steps: int = 28
    min_steps: int = 1
    max_steps: int = 100
    default_guidance: float = 3.5
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    default_size: int = 1024
    min_size: int = 64
    max_size: int = 2048
    max_pixels: int = 2**21  # 2 megapixels: 1024x2048 passes, 2048x2048 does not
    max_prompt_chars: int = 2000

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> Limits:
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f"limit_{f.name}"
            if key in parameters:
                convert = float if f.type == "float" else int
                try:
                    kwargs[f.name] = convert(parameters[key])
                except ValueError:
                    raise ValueError(f"parameter '{key}' must be a number, got {parameters[key]!r}") from None
        return cls(**kwargs)


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    height: int
    width: int


def _scalar(inputs: dict, name: str) -> np.generic | None:
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise InvalidInput(f"{name} must hold exactly one value (shape [1]), got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _integer(inputs: dict, name: str, default: int, low: int, high: int, multiple: int = 1) -> int:
    value = _scalar(inputs, name)
    if value is None:
        return default
    if not np.issubdtype(type(value), np.integer):
        raise InvalidInput(f"{name} must be an integer, got {type(value).__name__}")
    return check_range(name, int(value), low, high, multiple)


def check_range(name: str, value: int, low: int, high: int, multiple: int = 1) -> int:
    """`value` of field `name` within [low, high] and a multiple of `multiple`, or an error naming both."""
    if not low <= value <= high or value % multiple:
        step = f" and a multiple of {multiple}" if multiple > 1 else ""
        raise InvalidInput(f"{name} must be in [{low}, {high}]{step}, got {value}")
    return value


def _prompt(inputs: dict, limits: Limits) -> str:
    value = _scalar(inputs, "PROMPT")
    if value is None:
        raise InvalidInput("PROMPT is required (BYTES, shape [1], UTF-8 text)")
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("PROMPT must be UTF-8 text") from None
    if not isinstance(value, str):
        raise InvalidInput(f"PROMPT must be UTF-8 text (BYTES), got {type(value).__name__}")
    if not value.strip():
        raise InvalidInput("PROMPT must be a non-empty string")
    if len(value) > limits.max_prompt_chars:
        raise InvalidInput(f"PROMPT must be at most {limits.max_prompt_chars} characters, got {len(value)}")
    return value


def check_token_split(height: int, width: int, parts: int) -> None:
    """A context-parallel model splits the image's tokens evenly over its GPUs: their count must divide."""
    tokens = (height // PIXELS_PER_TOKEN_SIDE) * (width // PIXELS_PER_TOKEN_SIDE)
    if tokens % parts:
        raise InvalidInput(
            f"HEIGHT x WIDTH must make a number of image tokens (HEIGHT/16 x WIDTH/16) divisible by {parts}: this "
            f"model splits them over {parts} GPUs; got {height}x{width} ({tokens} tokens)"
        )


def check_area(height: int, width: int, limits: Limits, token_parts: int = 1) -> None:
    """HEIGHT x WIDTH within the model's pixel budget, with a token count its GPUs split evenly."""
    if height * width > limits.max_pixels:
        raise InvalidInput(f"HEIGHT x WIDTH must be at most {limits.max_pixels} pixels, got {height}x{width}")
    check_token_split(height, width, token_parts)


def parse_sizes(text: str, limits: Limits, token_parts: int = 1, field: str = "warmup_sizes") -> list[tuple[int, int]]:
    """'HxW,HxW,...' -> [(height, width), ...], each size one a request could ask for; a ValueError names `field`."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            height, width = (int(side) for side in item.lower().split("x"))
            bounds = (limits.min_size, limits.max_size, SIZE_MULTIPLE)
            check_area(check_range("HEIGHT", height, *bounds), check_range("WIDTH", width, *bounds), limits, token_parts)
        except (ValueError, InvalidInput) as error:
            detail = str(error) if isinstance(error, InvalidInput) else "expected HEIGHTxWIDTH, e.g. 1024x768"
            raise ValueError(f"{field}: size {item!r}: {detail}") from None
        sizes.append((height, width))
    if not sizes:
        raise ValueError(f"{field}: no size in {text!r} (expected HEIGHTxWIDTH[,HEIGHTxWIDTH...])")
    return sizes


def parse_request(inputs: dict, limits: Limits = Limits(), token_parts: int = 1) -> GenerationRequest:
    """Validate raw input arrays (name -> numpy array, absent = None) into a GenerationRequest; `token_parts`
    is the number of GPUs the model splits an image's tokens over."""
    prompt = _prompt(inputs, limits)
    seed = _integer(inputs, "SEED", random.randint(0, 2**31 - 1), 0, SEED_MAX)
    steps = _integer(inputs, "STEPS", limits.default_steps, limits.min_steps, limits.max_steps)
    size = (limits.default_size, limits.min_size, limits.max_size, SIZE_MULTIPLE)
    height = _integer(inputs, "HEIGHT", *size)
    width = _integer(inputs, "WIDTH", *size)
    check_area(height, width, limits, token_parts)
    guidance = _scalar(inputs, "GUIDANCE")
    if guidance is None:
        guidance = limits.default_guidance
    else:
        if not np.issubdtype(type(guidance), np.floating):
            raise InvalidInput(f"GUIDANCE must be a float (FP32), got {type(guidance).__name__}")
        guidance = float(guidance)
        if not math.isfinite(guidance) or not limits.min_guidance <= guidance <= limits.max_guidance:
            raise InvalidInput(f"GUIDANCE must be a finite number in [{limits.min_guidance}, {limits.max_guidance}], got {guidance}")
    return GenerationRequest(prompt=prompt, seed=seed, steps=steps, guidance=guidance, height=height, width=width)
