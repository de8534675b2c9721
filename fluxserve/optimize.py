"""One small function per optimization, each applied with the library that owns it (diffusers, torchao,
torch.compile). `build_pipeline` calls them in order; a stack switches each one on or off."""

from __future__ import annotations

import importlib.util

import torch

from .stacks import Stack

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP8_MIN_CAPABILITY = (8, 9)


class StackUnsupported(RuntimeError):
    """The stack cannot run on this hardware or software; the message says why."""


def check_supported(stack: Stack, device: torch.device) -> None:
    """Fail before loading any weights when the stack cannot run on `device`."""
    if stack.attention == "cudnn" and device.type != "cuda":
        raise StackUnsupported(f"stack {stack.name}: cuDNN attention needs a CUDA GPU, this instance runs on {device}")
    if stack.quantization == "fp8":
        if device.type != "cuda":
            raise StackUnsupported(f"stack {stack.name}: fp8 needs a CUDA GPU of compute capability 8.9+, not {device}")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise StackUnsupported(
                f"stack {stack.name}: fp8 needs compute capability 8.9+ (Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
            )


def attention_backend(attention: str, device: torch.device) -> str:
    """The diffusers attention backend for a stack's attention choice on this device.

    FlashAttention-2 uses the flash-attn package when it is importable on a GPU, else PyTorch's SDPA flash
    kernel (`_native_flash`, which also exists on CPU)."""
    if attention == "fa2":
        has_flash_attn = importlib.util.find_spec("flash_attn") is not None
        return "flash" if has_flash_attn and device.type == "cuda" else "_native_flash"
    return {"sdpa": "native", "cudnn": "_native_cudnn"}[attention]


def apply_attention(transformer, attention: str, device: torch.device) -> str:
    """Set the attention backend on every attention module; returns the backend name.

    The default stack sets `native` explicitly too: diffusers also records the last backend set as a
    process-wide default, which must not leak from one pipeline into another."""
    backend = attention_backend(attention, device)
    transformer.set_attention_backend(backend)
    return backend


def apply_fused_qkv(transformer) -> None:
    """Fuse the Q, K and V projections of every attention into one matmul (diffusers' own fusion)."""
    transformer.fuse_qkv_projections()


def apply_quantization(transformer, quantization: str) -> None:
    """Quantize the transformer's linear layers with torchao (activations stay bf16 between layers)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )

    configs = {
        "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "int8": Int8DynamicActivationInt8WeightConfig,
    }
    quantize_(transformer, configs[quantization]())


def apply_cache(transformer, cache: str, threshold: float) -> None:
    """Enable a step cache through diffusers' hook system."""
    from diffusers import FirstBlockCacheConfig

    configs = {"fbcache": FirstBlockCacheConfig}
    transformer.enable_cache(configs[cache](threshold=threshold))


def apply_compile(transformer, mode: str, has_cache: bool) -> None:
    """torch.compile the transformer: `regional` compiles each repeated block (fast to compile, keeps a step
    cache's skip decision eager), `full` the whole forward as one graph."""
    if mode == "regional":
        transformer.compile_repeated_blocks(fullgraph=not has_cache)
    else:
        transformer.compile(fullgraph=True)


def optimize_transformer(transformer, stack: Stack, device: torch.device) -> str:
    """Apply every optimization the stack switches on, in the order they compose; returns the attention
    backend name."""
    backend = apply_attention(transformer, stack.attention, device)
    if stack.fuse_qkv:
        apply_fused_qkv(transformer)
    if stack.quantization != "none":
        apply_quantization(transformer, stack.quantization)
    if stack.cache != "none":
        apply_cache(transformer, stack.cache, stack.cache_threshold)
    if stack.compile != "none":
        apply_compile(transformer, stack.compile, has_cache=stack.cache != "none")
    return backend
