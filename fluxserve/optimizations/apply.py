"""One small function per optimization, each applied with the library that owns it (diffusers, torchao,
torch.compile). `build_pipeline` calls them in order; a stack switches each one on or off."""

from __future__ import annotations

import importlib.util
import logging
import types

import torch

from .activations import gelu_tanh_as_sigmoid
from .compile_shapes import BLOCK_SIZE_DIMS, TRANSFORMER_SIZE_DIMS, VAE_DECODE_SIZE_DIMS, SizeRouted
from .cuda_graph import apply_cuda_graph
from .scheduled_cache import apply_scheduled_cache, scheduled_cache
from ..stacks import FIXED_SCHEDULE_CACHES, FP8_MATMULS, FP8_QUANTIZATIONS, Stack

log = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StackUnsupported(RuntimeError):
    """The stack cannot run on this hardware or software; the message says why."""


def check_supported(stack: Stack, device: torch.device) -> None:
    """Fail before loading any weights when the stack cannot run on `device`."""
    if stack.attention == "cudnn" and device.type != "cuda":
        raise StackUnsupported(f"stack {stack.name}: cuDNN attention needs a CUDA GPU, this instance runs on {device}")
    if stack.cuda_graph and device.type != "cuda":
        raise StackUnsupported(f"stack {stack.name}: CUDA graphs need a CUDA GPU, this instance runs on {device}")
    if stack.quantization in FP8_QUANTIZATIONS and device.type != "cuda":
        raise StackUnsupported(f"stack {stack.name}: {FP8_MATMULS.feature} needs a CUDA GPU of compute capability "
                               f"{FP8_MATMULS.version}+, not {device}")
    if device.type == "cuda":
        _check_gpu(stack, device)


def _check_gpu(stack: Stack, device: torch.device) -> None:
    """The GPU against the stack's capability need (fp8 attention off a GPU is emulated, so it is checked only here),
    then the cuDNN frontend that fp8 attention calls."""
    need = stack.capability_need
    capability = torch.cuda.get_device_capability(device)
    if need is not None and capability < need.capability:
        raise StackUnsupported(f"stack {stack.name}: {need}; {torch.cuda.get_device_name(device)} has "
                               f"{capability[0]}.{capability[1]}")
    if stack.attention == "fp8attn":
        from .fp8_attention import CUDNN_FRONTEND_PACKAGE, cudnn_frontend_available

        if not cudnn_frontend_available():
            raise StackUnsupported(f"stack {stack.name}: fp8 attention needs the cuDNN frontend: pip install "
                                   f"{CUDNN_FRONTEND_PACKAGE} (see build/requirements-gpu.txt)")


def attention_backend(attention: str, device: torch.device) -> str:
    """The diffusers attention backend for a stack's attention choice on this device.

    FlashAttention-2 uses the flash-attn package when it is importable on a GPU, else PyTorch's SDPA flash
    kernel (`_native_flash`, which also exists on CPU). fp8 attention is no diffusers backend but the project's
    attention processor: the cuDNN frontend's kernel on a GPU, an emulation of its arithmetic elsewhere."""
    if attention == "fp8attn":
        return "fp8 cuDNN frontend" if device.type == "cuda" else "fp8 emulated (no GPU)"
    if attention == "fa2":
        has_flash_attn = importlib.util.find_spec("flash_attn") is not None
        return "flash" if has_flash_attn and device.type == "cuda" else "_native_flash"
    return {"sdpa": "native", "cudnn": "_native_cudnn"}[attention]


def apply_attention(transformer, attention: str, device: torch.device) -> str:
    """Set the attention backend on every attention module; returns the backend name.

    The default stack sets `native` explicitly too: diffusers also records the last backend set as a
    process-wide default, which must not leak from one pipeline into another."""
    backend = attention_backend(attention, device)
    if attention == "fp8attn":
        from .fp8_attention import Fp8AttnProcessor

        transformer.set_attention_backend("native")
        transformer.set_attn_processor(Fp8AttnProcessor())
    else:
        transformer.set_attention_backend(backend)
    return backend


SEPARATE_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def apply_fused_qkv(transformer) -> None:
    """Fuse the Q, K and V projections of every attention into one matmul (diffusers' own fusion), then drop the
    separate projections, which diffusers keeps beside the fused ones only to unfuse again: on FLUX.1-dev 2.15 B
    parameters (4.0 GiB in bf16, measured as the fused stacks' extra peak memory on the H200) that a server never
    reads, and that quantization would otherwise quantize too."""
    transformer.fuse_qkv_projections()
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for name in SEPARATE_PROJECTIONS:
                if hasattr(module, name):
                    delattr(module, name)


def apply_quantization(transformer, quantization: str) -> None:
    """Quantize the linear layers of the transformer's blocks with torchao (activations stay bf16 between layers;
    the layers outside the blocks stay bf16, see `UNQUANTIZED_TOP_LEVEL`).

    `fp8` is torchao's default granularity, one scale per tensor (what the seed's "TorchAO FP8" ran); `fp8row`
    one scale per row of activations and weights (finer, more quantization work per matmul). torchao would also
    set its recommended Inductor options process-wide; they do not pay here (see `apply_compile`) and would leak
    into every stack built later in the same process."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    configs = {
        "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False),
        "fp8row": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
        "int8": lambda: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
    }
    quantize_(transformer, configs[quantization](), filter_fn=quantized_layer)


def apply_fused_gelu_quantization(transformer) -> None:
    """Move each GELU of FLUX's blocks into the per-row fp8 quantization of the linear after it: one hand-written
    kernel per linear (`fp8_rows`) reads the input rows once, where torchao's arithmetic as Inductor compiles it
    reads them twice. For the double blocks' feed-forwards (image and text) and the single blocks' output, whose
    attention output and MLP the kernel reads apart (`fp8_rows.single_block_forward`). After `apply_quantization`
    with fp8row: the linears keep torchao's e4m3 weights and scales."""
    from diffusers.models.activations import GELU

    from .fp8_rows import RowwiseFp8Linear, single_block_forward

    for block in transformer.transformer_blocks:
        for feed_forward in (block.ff, block.ff_context):
            activation = feed_forward.net[0]
            if not (isinstance(activation, GELU) and activation.approximate == "tanh"):
                raise StackUnsupported(f"fuse_gelu_quant expects FLUX's tanh GELU in feed-forwards, found {activation}")
            feed_forward.net[0] = activation.proj
            feed_forward.net[2] = RowwiseFp8Linear.from_torchao(feed_forward.net[2])
    for block in transformer.single_transformer_blocks:
        block.proj_out = RowwiseFp8Linear.from_torchao(block.proj_out)
        del block.act_mlp
        block.forward = types.MethodType(single_block_forward, block)


# FLUX's layers outside its repeated blocks: the embedders of the latents, the text, the time and the guidance, and
# the output layer. Each step they see one row (time, guidance, pooled text), 512 text tokens or 64 channels: under
# 1% of a step's compute, but they run eagerly even in regionally compiled stacks, where a torchao fp8 linear costs
# 0.33 ms of dispatch against bf16's 0.05 ms (perf.diagnostics.quantized_linear on the H200), time that a step
# cache's per-step read-back exposes on every step, skipped or computed.
UNQUANTIZED_TOP_LEVEL = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


def quantized_layer(module: torch.nn.Module, name: str) -> bool:
    """Whether `apply_quantization` quantizes this layer: every linear layer but FLUX's top-level ones."""
    return isinstance(module, torch.nn.Linear) and name.split(".")[0] not in UNQUANTIZED_TOP_LEVEL


def cache_config(stack: Stack):
    """The stack's step cache as a diffusers-style config.

    MagCache uses diffusers' FLUX magnitude ratios and its authors' FLUX profile for the rest (at most 5 steps
    skipped in a row, the first 10% always computed). TaylorSeer runs diffusers' lite mode: on a forecast step
    every block is skipped and only the output projection is forecast (order 2 after 3 computed steps, as
    TaylorSeer's FLUX setup); the default mode forecasts attention only and still runs the MLPs, which would
    make a forecast step count as computed."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    from .teacache import TeaCacheConfig

    configs = {
        "fbcache": lambda: FirstBlockCacheConfig(threshold=stack.cache_threshold),
        "teacache": lambda: TeaCacheConfig(threshold=stack.cache_threshold),
        "magcache": lambda: MagCacheConfig(
            threshold=stack.cache_threshold, max_skip_steps=5, retention_ratio=0.1, mag_ratios=FLUX_MAG_RATIOS
        ),
        "taylorseer": lambda: TaylorSeerCacheConfig(
            cache_interval=stack.cache_interval, disable_cache_before_step=3, max_order=2,
            taylor_factors_dtype=torch.float32, use_lite_mode=True,
        ),
    }
    return configs[stack.cache]()


def apply_cache(transformer, stack: Stack) -> None:
    """Enable the stack's step cache through diffusers' hook system. Every cache here skips a step without
    calling the last block's forward, which is what `StepCounter` counts. A stack replaying CUDA graphs runs its
    cache (one whose schedule is fixed before the first step) in the scheduled form graphs can replay
    (`scheduled_cache`), with the same configuration."""
    from .teacache import TeaCacheConfig, apply_teacache

    config = cache_config(stack)
    if stack.cuda_graph and stack.cache in FIXED_SCHEDULE_CACHES:
        apply_scheduled_cache(transformer, stack.cache, config)
    elif isinstance(config, TeaCacheConfig):
        apply_teacache(transformer, config)
    else:
        transformer.enable_cache(config)


def set_cache_steps(transformer, steps: int) -> None:
    """Tell the step cache how many steps the coming generation runs: TeaCache and TaylorSeer always compute the
    last one (the image's final detail comes from it), MagCache reads a magnitude ratio per step. Call before every
    generation."""
    from diffusers import MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp

    from .teacache import TeaCacheConfig

    scheduled = scheduled_cache(transformer)
    # where diffusers, and apply_teacache, keep the enabled cache's config
    config = scheduled.config if scheduled is not None else transformer._cache_config
    last_step = steps - 1
    if isinstance(config, TeaCacheConfig):
        config.num_inference_steps = steps
    elif isinstance(config, MagCacheConfig):
        config.num_inference_steps = steps
        config.mag_ratios = nearest_interp(FLUX_MAG_RATIOS, steps)
    if scheduled is not None:
        scheduled.start(steps, compute_from=last_step if isinstance(config, TaylorSeerCacheConfig) else None)
    elif isinstance(config, TaylorSeerCacheConfig):
        _compute_taylorseer_from_step(transformer, last_step)


def _compute_taylorseer_from_step(transformer, step: int) -> None:
    """Make TaylorSeer compute every step from `step` on. Its config's `disable_cache_after_step` is copied into
    each module's hook when the cache is enabled, so the hooks are where it is set per generation."""
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_TAYLORSEER_CACHE_HOOK) if registry is not None else None
        if hook is not None:
            hook.disable_cache_after_step = step


def apply_context_parallel(transformer, stack: Stack, device: torch.device) -> None:
    """Split every image's tokens over the GPUs of the running process group with diffusers' own context parallelism
    (`enable_parallelism`): Ulysses exchanges heads for tokens around each attention (all-to-all), ring passes the
    keys and values around. The process group must be up (`fluxserve.parallel` starts one per stack instance).

    diffusers derives a device as `rank % torch.accelerator.device_count()`, which divides by zero on a host
    without an accelerator; that device is not used by context parallelism, so on CPU the count reads as one."""
    import contextlib
    from unittest import mock

    from diffusers import ContextParallelConfig

    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        raise StackUnsupported(f"stack {stack.name} runs over {stack.gpus} GPUs: start it through fluxserve.parallel "
                               "(one process per GPU), not in a single process")
    if distributed.get_world_size() != stack.parallel_degree:
        raise StackUnsupported(f"stack {stack.name} needs a process group of {stack.parallel_degree}, this one has "
                               f"{distributed.get_world_size()}")
    heads = transformer.config.num_attention_heads
    if stack.parallel == "ulysses" and heads % stack.parallel_degree:
        raise StackUnsupported(f"stack {stack.name}: Ulysses splits the {heads} attention heads over "
                               f"{stack.parallel_degree} GPUs, which must divide them")
    degree = {"ulysses_degree" if stack.parallel == "ulysses" else "ring_degree": stack.parallel_degree}
    no_accelerator = mock.patch("torch.accelerator.device_count", return_value=1)
    with no_accelerator if device.type == "cpu" else contextlib.nullcontext():
        transformer.enable_parallelism(config=ContextParallelConfig(**degree))


def apply_sigmoid_gelu(transformer) -> None:
    """Make every tanh-approximated GELU (FLUX's feed-forwards and single blocks) compute through a sigmoid.

    For compiled stacks only: Inductor emits tanh as libdevice's accurate tanhf, and the fp8 stacks compute each
    GELU twice inside the kernel that quantizes its output per row (once for the row's maximum, once to cast),
    where a sigmoid costs an exponential. On the H200 the single blocks' output quantization went from 0.590 to
    0.540 ms a call and the feed-forwards' from 0.450 to 0.424 ms (perf.diagnostics.activation_quantization);
    images differ from tanh's by float32 rounding (2e-5 at most in the activation)."""
    from diffusers.models.activations import GELU

    for module in transformer.modules():
        if isinstance(module, GELU) and module.approximate == "tanh":
            module.gelu = gelu_tanh_as_sigmoid
        elif isinstance(module, torch.nn.GELU) and module.approximate == "tanh":
            module.forward = gelu_tanh_as_sigmoid


# Step caches whose hooks on the blocks are compiled badly inside the blocks' call, so that the blocks' own forwards
# are compiled beneath them instead (`compile_block_forwards`): diffusers' MagCache, whose hooks run under
# `@torch.compiler.disable`, the block's forward included (its scheduled form, `scheduled_cache`, wraps every block's
# forward too, eagerly); and TaylorSeer, whose hook graph-breaks into its step decision and resumes in code guarded
# per block, past Dynamo's recompile limit by the ninth block, which then ran eagerly (on the H200, in-process,
# 1.74 s against 0.99 s compiled beneath the hooks: perf/results/h200/s13-graphed-caches).
EAGER_BLOCK_HOOK_CACHES = ("magcache", "taylorseer")
COUNTED_FORWARD = "_fluxserve_counted_forward"  # a block's attribute: its compiled forward below any step cache


def apply_compile(transformer, mode: str, cache: str = "none", dynamic: bool = True) -> None:
    """torch.compile the transformer: `regional` compiles each repeated block (fast to compile, keeps a step
    cache's skip decision eager), `full` the whole forward. Not `fullgraph`: the step counter's hook and the
    caches' skip decisions run eagerly, each a graph break. Under a step cache of `EAGER_BLOCK_HOOK_CACHES`,
    `regional` compiles the blocks' own forwards instead, before the cache hooks them (`compile_block_forwards`).

    `dynamic`: one graph for every image size (the dimensions that follow the size symbolic), compiled at load,
    plus code specialised to the sizes the load lists (`compile_shapes`), so that no request compiles. Without it,
    torch.compile's default: code specialised to the first size seen, compiled again (with the dimensions that
    changed made dynamic) for the next size, on the request path: 20-40 s on the H200.

    Compiled code is guarded on module hooks too (torch skips those guards by default): regional compilation
    reuses one block's code for every block of its class, so without them the step counter's hook on the last
    block never ran once another block's code served it (0 steps counted on the full-size model).
    Quantized transformers compile with Inductor's defaults too, not torchao's recommended options: on the
    H200 their coordinate-descent tuning took a compiled fp8 stack's load from 35 s to 278 s (and 15 s to
    120 s with warm caches) for the same latency (perf/results/h200, session 4)."""
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    distinct_size_symbols()
    if mode == "full":
        transformer._compiled_call_impl = SizeRouted(transformer._call_impl, TRANSFORMER_SIZE_DIMS, dynamic)
    elif cache in EAGER_BLOCK_HOOK_CACHES:
        compile_block_forwards(transformer, dynamic)
    else:
        compile_block_calls(transformer, dynamic, below_cache=cache == "none")


def distinct_size_symbols() -> None:
    """Give every dynamic dimension its own symbol: by default ("duck sizing") dimensions equal at the first compile
    share one, so a size whose token count happened to equal another dimension (a head's width, a channel count),
    or a square latent's height its width, was guarded on staying equal, and the next size compiled again (seen on
    synthetic:tiny at 64x64: 16 image tokens, 16 per head)."""
    torch.fx.experimental._config.use_duck_shape = False


def compile_block_calls(transformer, dynamic: bool = True, below_cache: bool = False) -> None:
    """Regional compilation as diffusers' `compile_repeated_blocks`: each repeated block's module call (hooks
    included, so a step cache's hook inside it is compiled too), here through `SizeRouted`. `below_cache`: no step
    cache decides above it, so the step counter may count its calls (`counted_forward`)."""
    from .aot_blocks import repeated_blocks

    for members in repeated_blocks(transformer).values():
        for block in members:
            block._compiled_call_impl = SizeRouted(block._call_impl, BLOCK_SIZE_DIMS, dynamic)
            if below_cache:
                setattr(block, COUNTED_FORWARD, block._compiled_call_impl)


def compile_block_forwards(transformer, dynamic: bool = True) -> None:
    """Regional compilation for a step cache whose block hooks run eagerly: compile each repeated block's own
    `forward`, which the cache, enabled afterwards, wraps and calls on a computed step (so the step counter counts
    its calls: `counted_forward`).

    `compile_repeated_blocks` compiles each block's module call, and the cache's hook sits inside it. diffusers'
    MagCache hooks are `@torch.compiler.disable`d, which covers everything they call: Dynamo graph-breaks into
    the hook and the block's forward under it runs eagerly (each compiled frame is empty; no graph at all on
    synthetic:tiny). On the H200 a computed MagCache step cost 266 ms where TaylorSeer's, compiled, cost 105 ms.
    As under `compile_repeated_blocks` (and from the same `_repeated_blocks`), all blocks of a class share one
    compiled code: Dynamo caches it per code object (the class's `forward`), guards on the module's type and
    hooks, not on which block it is, and takes the weights as graph inputs (tests/test_compiled_caches.py checks
    this with more blocks than Dynamo's recompile limit)."""
    from .aot_blocks import repeated_blocks

    for members in repeated_blocks(transformer).values():
        for block in members:
            block.forward = SizeRouted(block.forward, BLOCK_SIZE_DIMS, dynamic)
            setattr(block, COUNTED_FORWARD, block.forward)


def counted_forward(block: torch.nn.Module):
    """The block's forward when no step cache decides inside or under it (compiled code: `SizeRouted`; an
    ahead-of-time package: `aot_blocks.BlockForward`): its `pre_hooks` run once per computed step, outside the
    compiled graph (a hook inside the block would compile that block apart, with a graph break)."""
    return getattr(block, COUNTED_FORWARD, None)


def apply_ahead_of_time(transformer, stack: Stack, device: torch.device) -> bool:
    """Regional compilation from ahead-of-time packages (`aot_blocks`), when packages are switched on and the stack
    compiles regionally on one device; True when the blocks now run packages. A package that can be neither loaded
    nor built is a warning: the stack then compiles with torch.compile, as without packages."""
    from . import aot_blocks

    folder = aot_blocks.packages_folder()
    if stack.compile != "regional" or stack.parallel != "none" or folder is None:
        return False
    try:
        used = aot_blocks.compile_blocks_ahead_of_time(transformer, stack, device, folder)
    except aot_blocks.PackagesUnavailable as error:
        aot_blocks.counters["fallbacks"] += 1
        log.warning("stack %s: %s; compiling with torch.compile instead", stack.name, error)
        return False
    for block in transformer.modules():  # a package runs below any step cache: the step counter may count it
        forward = aot_blocks.block_forward(block)
        if forward is not None:
            setattr(block, COUNTED_FORWARD, forward)
    log.info("stack %s: blocks run the ahead-of-time packages in %s", stack.name, used)
    return True


def apply_vae_compile(vae, dynamic: bool = True) -> None:
    """torch.compile the VAE's decode, the compiled stacks' last eager stage. On the H200 a 1024x1024 decode took
    36 ms compiled against 85 ms eager; channels_last was slower eager (130 ms) and no faster compiled (35.5 ms), so
    it is not used (perf/results/h200, session 8: perf/diagnostics/vae_decode.py). `dynamic` as in `apply_compile`:
    compiled for one size, the first request at another size recompiled the decode for 40 s on the H200."""
    vae.decode = SizeRouted(vae.decode, VAE_DECODE_SIZE_DIMS, dynamic)


def optimize_transformer(transformer, stack: Stack, device: torch.device, dynamic_shapes: bool = True) -> str:
    """Apply every optimization the stack switches on, in the order they compose; returns the attention
    backend name. `dynamic_shapes`: compile one graph for every image size (`apply_compile`)."""
    backend = apply_attention(transformer, stack.attention, device)
    if stack.fuse_qkv:
        apply_fused_qkv(transformer)
    if stack.quantization != "none":
        apply_quantization(transformer, stack.quantization)
    if stack.fuse_gelu_quant:
        apply_fused_gelu_quantization(transformer)
    if stack.compile != "none":
        apply_sigmoid_gelu(transformer)
    # Step caches wrap the blocks' forwards: packages must be in place first, and a cache whose block hooks run
    # eagerly must wrap blocks already compiled (see compile_block_forwards).
    ahead_of_time = apply_ahead_of_time(transformer, stack, device)
    compile_first = not ahead_of_time and stack.compile == "regional" and stack.cache in EAGER_BLOCK_HOOK_CACHES
    if compile_first:
        apply_compile(transformer, stack.compile, stack.cache, dynamic_shapes)
    if stack.cache != "none":
        apply_cache(transformer, stack)
    if stack.parallel != "none":
        apply_context_parallel(transformer, stack, device)
    if stack.compile != "none" and not (compile_first or ahead_of_time):
        apply_compile(transformer, stack.compile, stack.cache, dynamic_shapes)
    if stack.cuda_graph:  # below a scheduled step cache, whose step function the graphs replay
        apply_cuda_graph(scheduled_cache(transformer) or transformer)
    return backend
