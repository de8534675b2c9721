"""Regional compilation done ahead of time: each repeated block class of the transformer (FLUX: 19 double-stream
and 38 single-stream blocks) exported once with torch.export, compiled by AOTInductor into a package, kept on disk
per GPU model and versions, and loaded by every later start instead of compiling again.

A package holds code, not weights: every block of a class runs its class's package over its own weights, handed
over without a copy (`load_constants(user_managed=True)`), so one package serves any weights of the same
architecture. The image's token count is a dynamic dimension (any size the contract allows); the batch (1) and the
text length (512 T5 tokens) are fixed, and a call outside them runs the block's own forward.

Packages are built by the first load that finds none for its key (as long as torch.compile's regional compilation
takes) and written atomically. A package that does not load (built for another GPU, other versions, damaged) and a
folder that cannot be written fall back to torch.compile with a warning, never a failed load.

Hand-written because no library does this part: torch gives export, AOTInductor and the package loader; which
inputs are dynamic, where packages live and how every block reuses its class's package is this module's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
from collections import Counter
from itertools import chain
from pathlib import Path

import torch

from ..contract import MAX_SEQUENCE_LENGTH
from ..interpreter import PACKAGE_ROOT, child_environment, python_executable
from ..shared_dirs import CACHE_HOME, COMPILE_CACHE_ENV, content_keyed_directory

log = logging.getLogger(__name__)

# Packages are opt-in: FLUXSERVE_AOT_PACKAGES=on keeps them beside the compile cache (TORCHINDUCTOR_CACHE_DIR's
# parent), =<folder> there; unset or off, regional stacks compile with torch.compile (the README says why).
PACKAGES_ENV = "FLUXSERVE_AOT_PACKAGES"
ON, OFF = "on", "off"
MANIFEST = "manifest.json"
UNUSABLE = "UNUSABLE"  # in a folder whose packages failed the check in a child process: why
CHECK_TIMEOUT_S = 300
PATCH = 16  # pixels per image token side: 8x VAE downsampling, then 2x2 latent patches
MIN_IMAGE_TOKENS = 4  # export needs a lower bound above 1; the contract's smallest image (64x64) has 16 tokens
MAX_IMAGE_TOKENS = (2048 // PATCH) ** 2
SAMPLE_SIZE = 272  # pixels per side of the forward that records block inputs: 289 image tokens, unlike any other dim
SAMPLE_TOKENS = (SAMPLE_SIZE // PATCH) ** 2
SAMPLE_ROTARY = SAMPLE_TOKENS + MAX_SEQUENCE_LENGTH  # the rotary embedding covers text and image tokens
VERSIONED_PACKAGES = ("torch", "torchao", "diffusers", "nvidia-cudnn-frontend")
# Stack fields that change the code inside a block (caches, CUDA graphs and the step counter sit outside it).
CODE_FIELDS = ("dtype", "attention", "fuse_qkv", "quantization")

AHEAD_OF_TIME = "ahead_of_time_forward"  # attribute of a block running a package: its BlockForward
counters: Counter = Counter()  # process-wide, like torch.compile's own: blocks_loaded, packages_built, fallbacks


class PackagesUnavailable(RuntimeError):
    """No usable package and none can be built here; the message says why. The caller compiles instead."""


def packages_folder() -> Path | None:
    """Where packages live (FLUXSERVE_AOT_PACKAGES: on = beside the compile cache, or a folder); None when off."""
    value = os.environ.get(PACKAGES_ENV, "").strip()
    if value.lower() in ("", OFF):
        return None
    if value.lower() != ON:
        return Path(value)
    compile_cache = os.environ.get(COMPILE_CACHE_ENV)
    return Path(compile_cache).parent / "aot" if compile_cache else CACHE_HOME / "aot"


def environment(device: torch.device) -> dict[str, str]:
    """What a package's compiled code depends on besides the model: the device and the library versions."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        hardware = {"device": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
                    "cuda": str(torch.version.cuda)}
    else:
        hardware = {"device": f"{device.type} {platform.machine()}"}
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {**hardware, **versions, "fluxserve": source_digest()}


@functools.cache
def source_digest() -> str:
    """A digest of this package's own source, which decides what a block computes too (how GELU is written, how
    fp8 attention scales its operands): packages built by other code are not reused."""
    digest = hashlib.sha256()
    package = PACKAGE_ROOT / "fluxserve"
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def plain_constants(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The block's weights under the names its package knows them by. Export turns a tensor-subclass weight
    (torchao's quantized ones) into its plain inner tensors, named `<module>.parametrizations.<name>.original<i>`
    in the order torch's own unwrapping (`UnwrapTensorSubclass`) lists them."""
    from torch._functorch._aot_autograd.subclass_parametrization import UnwrapTensorSubclass
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    constants = {}
    for name, tensor in chain(block.named_parameters(), block.named_buffers()):
        if not is_traceable_wrapper_subclass(tensor):
            constants[name] = tensor
            continue
        owner, _, leaf = name.rpartition(".")
        prefix = f"{owner}.parametrizations.{leaf}" if owner else f"parametrizations.{leaf}"
        for index, inner in enumerate(UnwrapTensorSubclass().right_inverse(tensor)):
            constants[f"{prefix}.original{index}"] = inner
    return constants


class BlockForward:
    """Stands in for one block's `forward`: runs its class's package over this block's weights when the call has
    the package's fixed shapes, else the block's own forward (with a warning, once). `pre_hooks` run before every
    call (what a module pre-hook inside the block would see: the step counter's)."""

    def __init__(self, package, fixed_shapes: dict[str, list], forward) -> None:
        self.package = package
        self.fixed_shapes = fixed_shapes  # input name -> shape(s), the image-token dimensions as None
        self.forward = forward
        self.pre_hooks: list = []
        self.paused = False
        self.warned = False

    def __call__(self, *args, **kwargs):
        for hook in self.pre_hooks:
            hook()
        if self.paused:
            return self.forward(*args, **kwargs)
        if args or kwargs.get("joint_attention_kwargs") or not self._fits(kwargs):
            if not self.warned:
                log.warning("a block call outside its ahead-of-time package's shapes runs eagerly: %s",
                            {n: tuple(v.shape) for n, v in kwargs.items() if isinstance(v, torch.Tensor)})
                self.warned = True
            return self.forward(*args, **kwargs)
        return self.package(**{name: kwargs[name] for name in self.fixed_shapes})

    def _fits(self, kwargs) -> bool:
        return all(_fit(_shapes(kwargs.get(name)), expected) for name, expected in self.fixed_shapes.items())


def _shapes(value) -> list | None:
    """A tensor's shape, or a tuple of tensors' shapes (the rotary embedding's cos and sin); None otherwise."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, tuple) and all(isinstance(item, torch.Tensor) for item in value):
        return [list(item.shape) for item in value]
    return None


def _fit(shape, expected) -> bool:
    """`shape` matches `expected` (nested lists alike), where None in `expected` matches any size."""
    if isinstance(expected, list):
        return (isinstance(shape, list) and len(shape) == len(expected)
                and all(_fit(size, want) for size, want in zip(shape, expected)))
    return expected is None or shape == expected


def record_block_inputs(transformer, device: torch.device) -> dict[str, dict]:
    """One eager transformer forward on a small image, keeping the keyword inputs of the first block of each
    repeated class: the example inputs to export them with."""
    config = transformer.config
    dtype = transformer.dtype
    tokens, text = SAMPLE_TOKENS, MAX_SEQUENCE_LENGTH
    inputs = {
        "hidden_states": torch.randn(1, tokens, config.in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=device, dtype=dtype),
        "timestep": torch.ones(1, device=device, dtype=dtype),
        "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
        "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=dtype) if config.guidance_embeds else None,
        "return_dict": False,
    }
    recorded: dict[str, dict] = {}

    def record(module, args, kwargs) -> None:
        recorded.setdefault(type(module).__name__, dict(kwargs))

    handles = [members[0].register_forward_pre_hook(record, with_kwargs=True)
               for members in repeated_blocks(transformer).values()]
    try:
        with torch.no_grad():  # not inference mode: export cannot take inference tensors as example inputs
            transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: {k: v for k, v in kwargs.items() if k != "joint_attention_kwargs"} for name, kwargs in recorded.items()}


def fixed_shapes(sample: dict) -> dict[str, list]:
    """The recorded inputs' shapes with the image-token dimensions (and image + text tokens) as None."""
    def free(shape):
        return [free(item) for item in shape] if isinstance(shape[0], list) else [
            None if size in (SAMPLE_TOKENS, SAMPLE_ROTARY) else size for size in shape]

    return {name: free(_shapes(value)) for name, value in sample.items() if _shapes(value) is not None}


def dynamic_shapes(sample: dict) -> dict:
    """torch.export's spec for the recorded inputs: the image-token dimension free within the contract's sizes."""
    from torch.export import Dim

    image = Dim("image_tokens", min=MIN_IMAGE_TOKENS, max=MAX_IMAGE_TOKENS)
    sizes = {SAMPLE_TOKENS: image, SAMPLE_ROTARY: image + MAX_SEQUENCE_LENGTH}

    def spec(value):
        if isinstance(value, tuple):
            return tuple(spec(item) for item in value)
        return {axis: sizes[size] for axis, size in enumerate(value.shape) if size in sizes} or None

    return {name: spec(value) for name, value in sample.items()}


def package_key(stack, device: torch.device, samples: dict[str, dict], blocks: dict[str, list]) -> dict:
    """Everything a package's code depends on: the stack's code fields, the device and versions, each block class's
    input shapes and dtypes, and its weights' names, shapes and dtypes (the architecture, not the values)."""
    def describe(value):
        if isinstance(value, tuple):
            return [describe(item) for item in value]
        return [list(value.shape), str(value.dtype)] if isinstance(value, torch.Tensor) else repr(value)

    return {
        "stack": {field: getattr(stack, field) for field in CODE_FIELDS},
        "environment": environment(device),
        "inputs": {name: {key: describe(value) for key, value in sample.items()} for name, sample in samples.items()},
        "weights": {name: {key: describe(tensor) for key, tensor in plain_constants(members[0]).items()}
                    for name, members in blocks.items()},
    }


def repeated_blocks(transformer) -> dict[str, list[torch.nn.Module]]:
    """Each repeated block class (diffusers' `_repeated_blocks`, what `compile_repeated_blocks` compiles) and its
    blocks in order."""
    return {name: [module for module in transformer.modules() if type(module).__name__ == name]
            for name in transformer._repeated_blocks}


def build_packages(staged: Path, samples: dict[str, dict], blocks: dict[str, list], key: dict,
                   device: torch.device) -> None:
    """Export each block class's first block and compile it into `<class>.pt2` without its weights, then check that
    the packages load here (`check_in_child`): a folder that fails keeps the reason in UNUSABLE."""
    with inductor_config_kept():
        for name, sample in samples.items():
            exported = torch.export.export(blocks[name][0], (), sample, dynamic_shapes=dynamic_shapes(sample),
                                           strict=False)
            torch._inductor.aoti_compile_and_package(
                exported, package_path=str(staged / f"{name}.pt2"),
                inductor_configs={"aot_inductor.package_constants_in_so": False},
            )
    (staged / MANIFEST).write_text(json.dumps(key, indent=1, sort_keys=True))
    failure = check_in_child(staged, device)
    if failure is not None:
        (staged / UNUSABLE).write_text(failure + "\n")


@contextlib.contextmanager
def inductor_config_kept():
    """Inductor's process-wide config as it was, after the block: AOTInductor writes its package metadata into it
    (`aot_inductor.metadata`), and the config is part of torch.compile's cache key, so a fallback to torch.compile
    after a build missed the Inductor cache that every other load of the stack fills and reads."""
    saved = torch._inductor.config.save_config()
    try:
        yield
    finally:
        torch._inductor.config.load_config(saved)


def check_in_child(folder: Path, device: torch.device) -> str | None:
    """Load and run each package of `folder` once in a child process, so that a loader that crashes (on the H200
    here, torch 2.11's segfaults on any CUDA package) takes the child down, not the server. None when they ran."""
    command = [python_executable(), "-m", "fluxserve.optimizations.aot_blocks", str(folder), str(device)]
    try:
        done = subprocess.run(command, env=child_environment(), cwd=PACKAGE_ROOT, capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"loading them in a child process took over {CHECK_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    last = done.stderr.strip().splitlines()[-1:]
    return f"loading them in a child process failed ({how}{': ' + last[0] if last else ''})"


def run_packages(folder: Path, device: torch.device) -> None:
    """The child's side of `check_in_child`: each package over zero weights, run once on random inputs of the
    recorded shapes."""
    from . import fp8_attention  # noqa: F401  (registers the custom op a package of an fp8 attention stack calls)

    key = json.loads((folder / MANIFEST).read_text())
    for name, inputs in key["inputs"].items():
        package = _load_package(folder / f"{name}.pt2", device)
        weights = {fqn: _example(spec, device, torch.zeros) for fqn, spec in key["weights"][name].items()}
        package.load_constants(weights, check_full_update=True, user_managed=True)  # as the server loads them
        with torch.no_grad():
            package(**{input_name: _example(spec, device, torch.randn) for input_name, spec in inputs.items()})
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _example(spec, device: torch.device, fill):
    """A tensor (or tuple of tensors) of `package_key`'s recorded [shape, dtype]."""
    if isinstance(spec[1], str):
        dtype = getattr(torch, spec[1].removeprefix("torch."))
        return fill(spec[0], device=device).to(dtype) if dtype.is_floating_point else torch.zeros(spec[0], dtype=dtype, device=device)
    return tuple(_example(item, device, fill) for item in spec)


def _load_package(path: Path, device: torch.device):
    index = device.index if device.type == "cuda" and device.index is not None else -1
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=index)


def load_packages(folder: Path, samples: dict[str, dict], blocks: dict[str, list], key: dict,
                  device: torch.device) -> dict[torch.nn.Module, BlockForward]:
    """One loaded package per block, each over that block's weights; raises when the folder was built for another
    key or a package does not load."""
    if (folder / UNUSABLE).is_file():
        raise PackagesUnavailable(f"the packages in {folder} do not work here: {(folder / UNUSABLE).read_text().strip()}")
    built_for = json.loads((folder / MANIFEST).read_text())
    if built_for != key:
        differing = sorted(part for part in key if built_for.get(part) != key[part])
        raise PackagesUnavailable(f"{folder} was built for another {' and '.join(differing)}")
    forwards = {}
    for name, members in blocks.items():
        shapes = fixed_shapes(samples[name])
        for block in members:
            package = _load_package(folder / f"{name}.pt2", device)
            package.load_constants(plain_constants(block), check_full_update=True, user_managed=True)
            forwards[block] = BlockForward(package, shapes, block.forward)
    return forwards


def describe_environment(env: dict[str, str]) -> str:
    return ", ".join(f"{name} {value}" for name, value in env.items())


def other_builds(folder: Path, label: str, key: dict) -> list[str]:
    """What packages of the same stack in `folder` were built for instead (another GPU, other versions)."""
    found = []
    for manifest in sorted(folder.glob(f"{label}-*/{MANIFEST}")):
        try:
            env = json.loads(manifest.read_text())["environment"]
        except (OSError, ValueError, KeyError):
            continue
        differing = {name: value for name, value in env.items() if key["environment"].get(name) != value}
        if differing:
            found.append(f"{manifest.parent.name} ({describe_environment(differing)})")
    return found


def compile_blocks_ahead_of_time(transformer, stack, device: torch.device, folder: Path) -> Path:
    """Make every repeated block run its class's ahead-of-time package, building the packages into `folder` when
    none exist for this key; returns the packages' folder. Raises PackagesUnavailable, leaving the transformer as
    it was, when they can be neither loaded nor built."""
    samples = record_block_inputs(transformer, device)
    blocks = repeated_blocks(transformer)
    key = package_key(stack, device, samples, blocks)
    label = "-".join([stack.dtype, stack.attention, stack.quantization, "fusedqkv" if stack.fuse_qkv else "qkv"])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    target = folder / f"{label}-{digest}"
    if not target.is_dir():
        others = other_builds(folder, label, key) if folder.is_dir() else []
        if others:
            log.warning("ahead-of-time packages for %s in %s were built for another GPU or versions: %s; this process "
                        "has %s: building its own", label, folder, "; ".join(others), describe_environment(key["environment"]))
        try:
            target = content_keyed_directory(folder, label, digest, lambda staged: build_packages(staged, samples, blocks, key, device))
        except Exception as error:  # noqa: BLE001 (any failure to build means: compile instead)
            raise PackagesUnavailable(f"could not build ahead-of-time packages in {folder}: {error}") from error
        counters["packages_built"] += 1
    try:
        forwards = load_packages(target, samples, blocks, key, device)
    except PackagesUnavailable:
        raise
    except Exception as error:  # noqa: BLE001
        raise PackagesUnavailable(f"the ahead-of-time packages in {target} do not load here "
                                  f"({describe_environment(key['environment'])}): {error}") from error
    for block, forward in forwards.items():
        block.forward = forward
        setattr(block, AHEAD_OF_TIME, forward)
    counters["blocks_loaded"] += len(forwards)
    return target


def block_forward(block: torch.nn.Module) -> BlockForward | None:
    """The ahead-of-time forward running `block`, if one does (a step cache may have wrapped it since)."""
    return getattr(block, AHEAD_OF_TIME, None)


@contextlib.contextmanager
def paused(transformer):
    """A context in which every block runs its own forward instead of its package (to profile its kernels)."""
    forwards = [forward for forward in map(block_forward, transformer.modules()) if forward is not None]
    for forward in forwards:
        forward.paused = True
    try:
        yield
    finally:
        for forward in forwards:
            forward.paused = False


if __name__ == "__main__":  # the child of check_in_child: python -m fluxserve.optimizations.aot_blocks FOLDER DEVICE
    run_packages(Path(sys.argv[1]), torch.device(sys.argv[2]))
