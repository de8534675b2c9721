"""The stack catalog: every optimization stack the project serves, as validated frozen values.

A stack's model name is derived from its fields, so the catalog cannot disagree with itself; the
repository generator writes one Triton model per stack, with the fields as `config.pbtxt` parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("bf16", "fp16")
ATTENTIONS = ("sdpa", "fa2", "cudnn", "fp8attn")
CACHES = ("none", "fbcache", "teacache", "magcache", "taylorseer")
THRESHOLD_CACHES = ("fbcache", "teacache", "magcache")  # skip while a measured change stays below a threshold
INTERVAL_CACHES = ("taylorseer",)  # compute one step in every `cache_interval`, forecast the others
QUANTIZATIONS = ("none", "fp8", "fp8row", "int8")
FP8_QUANTIZATIONS = ("fp8", "fp8row")  # torchao's fp8 matmuls
COMPILES = ("none", "regional", "full")
PARALLELS = ("none", "ulysses", "ring")  # context parallelism: one image's tokens split over several GPUs
# Caches that decide from the activations: under context parallelism each rank holds only its share of the tokens,
# so ranks would decide differently and fall out of step. TaylorSeer (interval) and MagCache (calibrated ratios)
# decide from the step number alone.
ACTIVATION_DECIDED_CACHES = ("fbcache", "teacache")
# The others' schedule is fixed before the first step: the caches a CUDA graph per kind of step can replay.
FIXED_SCHEDULE_CACHES = tuple(cache for cache in CACHES if cache not in ("none", *ACTIVATION_DECIDED_CACHES))
# Ring attention merges partial results with the attention kernel's log-sum-exp, which diffusers' `native` backend
# does not return.
RING_ATTENTIONS = ("fa2", "cudnn")

ATTENTION_LABELS = {
    "sdpa": "PyTorch SDPA, default dispatch", "fa2": "FlashAttention-2", "cudnn": "cuDNN attention",
    "fp8attn": "fp8 attention (cuDNN frontend, per-tensor scales)",
}
PARALLEL_LABELS = {"ulysses": "Ulysses", "ring": "ring"}
QUANTIZATION_LABELS = {
    "fp8": "torchao fp8 dynamic per-tensor",
    "fp8row": "torchao fp8 dynamic per-row",
    "int8": "torchao int8 dynamic",
}
NUMBER_TYPES = {"float": float, "int": int}  # stack fields parsed from Triton's string parameters


class StackError(ValueError):
    """A stack definition that is invalid (unknown value or impossible combination)."""


@dataclass(frozen=True)
class CapabilityNeed:
    """The lowest NVIDIA compute capability a stack's kernels run on, and the feature that sets it: one rule that
    the loader (`optimizations.apply.check_supported`) and the deploy generator (`deployment.plan_for`) both read."""

    feature: str
    capability: tuple[int, int]
    architectures: str  # the GPU generations from `capability` on

    @property
    def version(self) -> str:
        """The capability as NVIDIA writes it, e.g. "8.9"."""
        return ".".join(map(str, self.capability))

    def __str__(self) -> str:
        return f"{self.feature} needs compute capability {self.version}+ ({self.architectures})"


# torchao's fp8 matmuls use the e4m3 tensor-core instructions that Ada introduced; cuDNN's fp8 SDPA forward runs on
# Hopper and newer only.
FP8_MATMULS = CapabilityNeed("fp8", (8, 9), "Ada, Hopper or newer")
FP8_ATTENTION = CapabilityNeed("cuDNN's fp8 attention", (9, 0), "Hopper or newer")


@dataclass(frozen=True)
class Stack:
    """One optimization stack. `seed_row` names the row of the seed benchmark it reproduces ("" if new)."""

    dtype: str = "bf16"
    attention: str = "sdpa"
    cache: str = "none"
    cache_threshold: float = 0.0
    cache_interval: int = 0
    quantization: str = "none"
    fuse_gelu_quant: bool = False
    fuse_qkv: bool = False
    compile: str = "none"
    cuda_graph: bool = False
    parallel: str = "none"
    parallel_degree: int = 1
    seed_row: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        for field, allowed in (
            ("dtype", DTYPES), ("attention", ATTENTIONS), ("cache", CACHES),
            ("quantization", QUANTIZATIONS), ("compile", COMPILES), ("parallel", PARALLELS),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise StackError(f"stack field '{field}' is {value!r}; allowed: {', '.join(allowed)}")
        if self.cache not in THRESHOLD_CACHES and self.cache_threshold != 0.0:
            raise StackError(f"stack field 'cache_threshold' is set but cache '{self.cache}' has no threshold")
        if self.cache in THRESHOLD_CACHES and not self.cache_threshold >= 0.0:
            raise StackError(f"stack field 'cache_threshold' must be >= 0, got {self.cache_threshold}")
        if self.cache not in INTERVAL_CACHES and self.cache_interval != 0:
            raise StackError(f"stack field 'cache_interval' is set but cache '{self.cache}' has no interval")
        if self.cache in INTERVAL_CACHES and self.cache_interval < 1:
            raise StackError(f"stack field 'cache_interval' must be >= 1, got {self.cache_interval}")
        if self.quantization != "none" and self.dtype != "bf16":
            raise StackError(f"quantization '{self.quantization}' runs with bf16 activations; dtype is {self.dtype}")
        if self.fuse_gelu_quant and self.quantization != "fp8row":
            raise StackError("fuse_gelu_quant moves GELU into the per-row fp8 quantization of the linear after it; "
                             f"it needs quantization 'fp8row', not '{self.quantization}'")
        if self.compile == "full" and self.cache != "none":
            raise StackError(
                "compile 'full' cannot be combined with a step cache: the cache's skip decision breaks the "
                "full graph; use compile 'regional'"
            )
        if self.cuda_graph and self.compile == "full":
            raise StackError("cuda_graph captures the compiled blocks of compile 'regional'; with compile 'full' "
                             "use torch.compile's own CUDA graphs instead")
        if self.cuda_graph and self.cache in ACTIVATION_DECIDED_CACHES:
            raise StackError(
                f"cuda_graph cannot be combined with cache '{self.cache}': it decides from each step's activations, "
                "on the host, whether to run the blocks, and a CUDA graph replays fixed work; use "
                f"{' or '.join(FIXED_SCHEDULE_CACHES)}, whose schedule is fixed before the first step"
            )
        if self.cuda_graph and self.cache != "none" and self.parallel != "none":
            raise StackError(f"cuda_graph with cache '{self.cache}' runs on one GPU; parallel is '{self.parallel}'")
        self._check_parallel()

    def _check_parallel(self) -> None:
        if self.parallel == "none":
            if self.parallel_degree != 1:
                raise StackError(f"stack field 'parallel_degree' is {self.parallel_degree} but parallel is 'none'")
            return
        if self.parallel_degree < 2:
            raise StackError(f"stack field 'parallel_degree' must be >= 2 with parallel '{self.parallel}', "
                             f"got {self.parallel_degree}")
        if self.cache in ACTIVATION_DECIDED_CACHES:
            raise StackError(
                f"cache '{self.cache}' cannot run context parallel: it decides from activations, of which each GPU "
                "holds only its share, so the GPUs would decide differently; use taylorseer or magcache"
            )
        if self.attention == "fp8attn":
            raise StackError("attention 'fp8attn' cannot run context parallel: it replaces the attention call that "
                             "diffusers' context parallelism splits over the GPUs")
        if self.parallel == "ring" and self.attention not in RING_ATTENTIONS:
            raise StackError(f"parallel 'ring' needs attention {' or '.join(RING_ATTENTIONS)} (it merges partial "
                             f"results with the kernel's log-sum-exp); attention is '{self.attention}'")

    @property
    def capability_need(self) -> CapabilityNeed | None:
        """The strictest compute capability the stack's kernels need on a GPU, or None when no kernel sets one."""
        needs = [need for need, used in ((FP8_MATMULS, self.quantization in FP8_QUANTIZATIONS),
                                         (FP8_ATTENTION, self.attention == "fp8attn")) if used]
        return max(needs, key=lambda need: need.capability, default=None)

    @property
    def gpus(self) -> int:
        """GPUs one instance of the stack uses (1, or the context-parallel degree)."""
        return self.parallel_degree

    @property
    def name(self) -> str:
        """Model name, derived from the fields: dtype first, then each optimization that is on."""
        parts = [self.dtype]
        if self.attention != "sdpa":
            parts.append(self.attention)
        if self.cache in THRESHOLD_CACHES:
            parts.append(f"{self.cache}-{_plain_number(self.cache_threshold)}")
        if self.cache in INTERVAL_CACHES:
            parts.append(f"{self.cache}-interval{self.cache_interval}")
        if self.quantization != "none":
            parts.append(self.quantization)
        if self.fuse_gelu_quant:
            parts.append("fusedgelu")
        if self.fuse_qkv:
            parts.append("fusedqkv")
        if self.compile != "none":
            parts.append(f"compile-{self.compile}")
        if self.cuda_graph:
            parts.append("cudagraph")
        if self.parallel != "none":
            parts.append(f"{'cp' if self.parallel == 'ulysses' else 'ring'}{self.parallel_degree}")
        return "-".join(parts)

    @property
    def description(self) -> str:
        """What the stack applies, in words (for the README's stack table and INFO)."""
        parts = [self.dtype, ATTENTION_LABELS[self.attention]]
        if self.cache in THRESHOLD_CACHES:
            parts.append(f"{self.cache} threshold {self.cache_threshold:g}")
        if self.cache in INTERVAL_CACHES:
            parts.append(f"{self.cache} interval {self.cache_interval}")
        if self.quantization != "none":
            parts.append(QUANTIZATION_LABELS[self.quantization])
        if self.fuse_gelu_quant:
            parts.append("GELU fused into the per-row quantization kernel")
        if self.fuse_qkv:
            parts.append("fused QKV projections")
        if self.compile != "none":
            parts.append(f"torch.compile ({self.compile})")
        if self.cuda_graph:
            parts.append(f"CUDA graph per {'step' if self.cache == 'none' else 'kind of step'} and text encoder")
        if self.parallel != "none":
            parts.append(f"context parallel over {self.parallel_degree} GPUs ({PARALLEL_LABELS[self.parallel]})")
        return ", ".join(parts)

    def to_parameters(self) -> dict[str, str]:
        """The stack as Triton `parameters` (string values)."""
        parameters = {}
        for f in dataclasses.fields(self):
            if f.name != "seed_row":
                value = getattr(self, f.name)
                parameters[f.name] = str(value).lower() if isinstance(value, bool) else str(value)
        return parameters

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> Stack:
        """Inverse of `to_parameters`; unknown keys are ignored (they belong to limits or the model)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name == "seed_row" or f.name not in parameters:
                continue
            raw = parameters[f.name]
            if f.type == "bool":
                if raw.lower() not in ("true", "false"):
                    raise StackError(f"stack field '{f.name}' must be true or false, got {raw!r}")
                kwargs[f.name] = raw.lower() == "true"
            elif f.type in NUMBER_TYPES:
                try:
                    kwargs[f.name] = NUMBER_TYPES[f.type](raw)
                except ValueError:
                    raise StackError(f"stack field '{f.name}' must be a number ({f.type}), got {raw!r}") from None
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)


def _plain_number(value: float) -> str:
    """0.15 -> '0.15', 1e6 -> '1000000': no '+' or 'e', so model names stay URL-safe."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _seed(row: str, **fields) -> Stack:
    return Stack(seed_row=row, **fields)


# Every row of the seed benchmark's tables, then the caches diffusers ships that fit guidance-distilled FLUX.
# Where the seed leaves the dtype implicit (FlashAttention2, FBCache, TeaCache, TorchAO rows) we use bf16: the
# seed's best configs are bf16, and fp16 appears only as its baseline. That makes the seed's "TeaCache+FA2 (0.6)"
# the same stack as its "BF16+FA2+TeaCache (0.6)": one model serves both rows.
CATALOG: tuple[Stack, ...] = (
    _seed("Baseline (FP16)", dtype="fp16"),
    _seed("BF16"),
    _seed("FlashAttention2", attention="fa2"),
    _seed("FBCache (0.15)", cache="fbcache", cache_threshold=0.15),
    _seed("FBCache (0.2)", cache="fbcache", cache_threshold=0.2),
    _seed("FBCache (0.3)", cache="fbcache", cache_threshold=0.3),
    _seed("FBCache (0.35)", cache="fbcache", cache_threshold=0.35),
    _seed("FBCache (0.4)", cache="fbcache", cache_threshold=0.4),
    _seed("FBCache+FA2 (0.2)", attention="fa2", cache="fbcache", cache_threshold=0.2),
    _seed("TorchAO FP8", quantization="fp8"),
    _seed("BF16+FA2+FBCache (0.3)", attention="fa2", cache="fbcache", cache_threshold=0.3),
    _seed("BF16+FA2+FBCache (0.3)+TorchAO FP8", attention="fa2", cache="fbcache", cache_threshold=0.3,
          quantization="fp8"),
    _seed("BF16+FA2+FBCache (0.3)+TorchAO INT8", attention="fa2", cache="fbcache", cache_threshold=0.3,
          quantization="int8"),
    _seed("TeaCache (0.2)", cache="teacache", cache_threshold=0.2),
    _seed("TeaCache (0.4)", cache="teacache", cache_threshold=0.4),
    _seed("TeaCache (0.6)", cache="teacache", cache_threshold=0.6),
    _seed("BF16+FA2+TeaCache (0.6)", attention="fa2", cache="teacache", cache_threshold=0.6),
    _seed("BF16+FA2+TeaCache (0.6)+TorchAO FP8", attention="fa2", cache="teacache", cache_threshold=0.6,
          quantization="fp8"),
    _seed("BF16+FA2+TeaCache (0.6)+TorchAO INT8", attention="fa2", cache="teacache", cache_threshold=0.6,
          quantization="int8"),
    # MagCache: diffusers' default error budget (conservative), then its authors' FLUX profile (aggressive).
    Stack(cache="magcache", cache_threshold=0.06),
    Stack(cache="magcache", cache_threshold=0.24),
    # TaylorSeer: a computed step in every 3 (conservative) or every 5 (aggressive, diffusers' default).
    Stack(cache="taylorseer", cache_interval=3),
    Stack(cache="taylorseer", cache_interval=5),
    # Beyond the seed: kernels and compilation (the fastest uncached stacks), then compilation with a cache.
    Stack(attention="cudnn"),
    Stack(compile="regional"),
    Stack(fuse_qkv=True, compile="regional"),
    Stack(attention="cudnn", fuse_qkv=True, compile="regional"),
    Stack(quantization="fp8", fuse_qkv=True, compile="regional"),
    Stack(attention="cudnn", quantization="fp8", fuse_qkv=True, compile="regional"),
    Stack(attention="cudnn", quantization="fp8row", fuse_qkv=True, compile="regional"),
    Stack(attention="cudnn", cache="fbcache", cache_threshold=0.3, quantization="fp8", fuse_qkv=True,
          compile="regional"),
    # Each cache family at a setting the catalog has, on the fastest compiled stack that can skip steps (per-row fp8,
    # regional compile; a CUDA graph replays fixed work, so none here).
    *(Stack(attention="cudnn", quantization="fp8row", fuse_qkv=True, compile="regional", **cache) for cache in (
        dict(cache="taylorseer", cache_interval=5), dict(cache="taylorseer", cache_interval=3),
        dict(cache="teacache", cache_threshold=0.6), dict(cache="magcache", cache_threshold=0.24),
        dict(cache="fbcache", cache_threshold=0.3),
    )),
    # fp8 attention (cuDNN frontend): eager beside bf16 for its deviation, then on the fastest uncached stack with and
    # without its CUDA graph, and under the fastest cache.
    Stack(attention="fp8attn"),
    *(Stack(attention="fp8attn", quantization="fp8row", fuse_qkv=True, compile="regional", cuda_graph=graph)
      for graph in (False, True)),
    Stack(attention="fp8attn", cache="taylorseer", cache_interval=5, quantization="fp8row", fuse_qkv=True,
          compile="regional"),
    # GELU and the per-row fp8 quantization after it as one kernel (fp8_rows): the fastest uncached stack, and the
    # fastest cache on the fastest stack without a CUDA graph (cuDNN's attention: without a graph, the fp8 attention
    # op's host work per call made MagCache 0.24 slower on it, 1.14 s against 0.92 s, perf/results/h200 session 10).
    Stack(attention="fp8attn", quantization="fp8row", fuse_gelu_quant=True, fuse_qkv=True, compile="regional",
          cuda_graph=True),
    Stack(attention="cudnn", cache="magcache", cache_threshold=0.24, quantization="fp8row", fuse_gelu_quant=True,
          fuse_qkv=True, compile="regional"),
    # The caches whose schedule is fixed before the first step, replayed from a CUDA graph per kind of step
    # (`scheduled_cache`): MagCache beside its ungraphed stack above, then with fp8 attention, whose host work per
    # call the graph hides, and TaylorSeer the same way.
    *(Stack(attention=attention, cache="magcache", cache_threshold=0.24, quantization="fp8row", fuse_gelu_quant=True,
            fuse_qkv=True, compile="regional", cuda_graph=True) for attention in ("cudnn", "fp8attn")),
    Stack(attention="fp8attn", cache="taylorseer", cache_interval=5, quantization="fp8row", fuse_gelu_quant=True,
          fuse_qkv=True, compile="regional", cuda_graph=True),
    # Each step replayed as one CUDA graph: no host work per kernel (eager, eager fp8, compiled fp8).
    Stack(attention="cudnn", cuda_graph=True),
    Stack(attention="cudnn", quantization="fp8row", fuse_qkv=True, cuda_graph=True),
    Stack(attention="cudnn", quantization="fp8", fuse_qkv=True, compile="regional", cuda_graph=True),
    Stack(attention="cudnn", quantization="fp8row", fuse_qkv=True, compile="regional", cuda_graph=True),
    # One image over several GPUs (context parallelism, diffusers' own): bf16 eager, the fastest uncached stack
    # with and without its CUDA graph, a step cache, and ring attention beside Ulysses to compare.
    *(Stack(parallel="ulysses", parallel_degree=gpus) for gpus in (2, 4, 8)),
    *(Stack(attention="cudnn", quantization="fp8row", fuse_qkv=True, compile="regional", cuda_graph=True,
            parallel="ulysses", parallel_degree=gpus) for gpus in (2, 4, 8)),
    *(Stack(attention="cudnn", quantization="fp8row", fuse_qkv=True, compile="regional", parallel="ulysses",
            parallel_degree=gpus) for gpus in (2, 4)),
    *(Stack(cache="taylorseer", cache_interval=5, parallel="ulysses", parallel_degree=gpus) for gpus in (2, 4)),
    *(Stack(attention="cudnn", parallel="ring", parallel_degree=gpus) for gpus in (2, 4)),
)

DEFAULT_STACK = "bf16"


def catalog_by_name() -> dict[str, Stack]:
    """The catalog keyed by model name; fails if two stacks would share a name."""
    stacks = {}
    for stack in CATALOG:
        if stack.name in stacks:
            raise StackError(f"two catalog stacks share the name {stack.name!r}")
        stacks[stack.name] = stack
    return stacks
