"""Where a pipeline's weights come from.

A weights source is one string, read from `--weights` / `FLUXSERVE_WEIGHTS`:
  /path/to/folder        a diffusers-format FLUX.1 folder (has model_index.json)
  owner/name             a hub id already in the local Hugging Face cache (loaded offline)
  synthetic:tiny         toy-size FLUX with random weights (tests, CPU demo)
  synthetic:full         exact FLUX.1-dev architecture with random weights, built on the GPU (benchmarks)
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLUX_DEV_HUB_ID = "black-forest-labs/FLUX.1-dev"
SYNTHETIC_SIZES = ("tiny", "full")
ENV_VAR = "FLUXSERVE_WEIGHTS"


class WeightsError(ValueError):
    """A weights source that is missing, malformed or cannot be loaded."""


@dataclass(frozen=True)
class WeightsSource:
    """A parsed weights source. `kind` is 'synthetic', 'folder' or 'hub'."""

    kind: str
    location: str

    def __str__(self) -> str:
        return f"synthetic:{self.location}" if self.kind == "synthetic" else self.location


def parse_source(spec: str) -> WeightsSource:
    """Parse a weights-source string; fails with what was expected when it names nothing usable."""
    spec = spec.strip()
    if spec.startswith("synthetic:"):
        size = spec.split(":", 1)[1]
        if size not in SYNTHETIC_SIZES:
            raise WeightsError(f"weights source {spec!r}: synthetic size must be one of {', '.join(SYNTHETIC_SIZES)}")
        return WeightsSource("synthetic", size)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "model_index.json").is_file():
            raise WeightsError(
                f"weights folder {str(path)!r} is not a diffusers-format pipeline: expected "
                f"{str(path / 'model_index.json')!r} (e.g. from `hf download {FLUX_DEV_HUB_ID} --local-dir DIR`)"
            )
        return WeightsSource("folder", str(path.resolve()))
    if spec.count("/") == 1 and all(spec.split("/")):
        return WeightsSource("hub", spec)
    raise WeightsError(
        f"weights source {spec!r} is neither an existing folder, a hub id (owner/name) nor synthetic:tiny|full"
    )


def hub_id_is_cached(hub_id: str) -> bool:
    """True when the hub id has a snapshot with model_index.json in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "model_index.json")
    return isinstance(found, str)


def default_source() -> tuple[WeightsSource, str]:
    """The source used when none is given, and why: cached FLUX.1-dev, else synthetic by hardware."""
    if hub_id_is_cached(FLUX_DEV_HUB_ID):
        return WeightsSource("hub", FLUX_DEV_HUB_ID), f"found {FLUX_DEV_HUB_ID} in the local Hugging Face cache"
    if torch.cuda.is_available():
        return WeightsSource("synthetic", "full"), "no weights given: full-size FLUX.1-dev with RANDOM weights"
    return WeightsSource("synthetic", "tiny"), "no weights given and no GPU: toy-size FLUX with RANDOM weights"


def load_pipeline(source: WeightsSource, dtype: torch.dtype, device: torch.device):
    """Load a FluxPipeline from `source` in `dtype` onto `device`: onto a GPU straight from the files
    (`load_onto_device`), onto the CPU through diffusers' pipeline loader."""
    if source.kind == "synthetic":
        from .synthetic import build_synthetic_pipeline

        if source.location == "full" and device.type != "cuda":
            raise WeightsError("synthetic:full is built directly on a CUDA GPU; use synthetic:tiny on CPU")
        return build_synthetic_pipeline(source.location, dtype, device)
    if device.type == "cuda":
        return load_onto_device(source, dtype, device)
    return load_to_cpu(source, dtype).to(device)


def load_to_cpu(source: WeightsSource, dtype: torch.dtype, **components):
    """diffusers' FluxPipeline.from_pretrained, offline, into host memory (`components`: modules already loaded)."""
    from diffusers import FluxPipeline

    with weights_errors(source):
        return FluxPipeline.from_pretrained(source.location, dtype=dtype, local_files_only=True, **components)


READ_AHEAD_THREADS = 8


def load_onto_device(source: WeightsSource, dtype: torch.dtype, device: torch.device,
                     timings: dict[str, float] | None = None, read_ahead_threads: int = READ_AHEAD_THREADS):
    """Each model of the pipeline (transformer, text encoders, VAE) read straight onto `device`, one
    `from_pretrained(device_map=device)` each: shard by shard, each shard's tensors copied to the device as it is
    read, instead of all ~32 GB of FLUX.1-dev into host memory first and then copied again by `pipe.to(device)`,
    while `read_ahead_threads` readers bring the files into the page cache ahead of the loader (0: none).
    perf/diagnostics/cold_load.py times the variants. Per model, not diffusers' pipeline-level
    `device_map="cuda"`: transformers reads "cuda" as cuda:$LOCAL_RANK, not as `device`. Tokenizers and scheduler
    come from `load_to_cpu`. `timings`: seconds per model, when given."""
    from .read_ahead import ReadAhead, weight_files

    files = weight_files(Path(source.location)) if read_ahead_threads and source.kind == "folder" else []
    reader = ReadAhead(files, threads=read_ahead_threads).start() if files else None
    try:
        models = _models_onto_device(source, dtype, device, timings)
    finally:
        if reader is not None:
            reader.stop()
            reader.join()
    return load_to_cpu(source, dtype, **models)


def _models_onto_device(source: WeightsSource, dtype: torch.dtype, device: torch.device,
                        timings: dict[str, float] | None) -> dict[str, torch.nn.Module]:
    import importlib

    from diffusers import FluxPipeline
    from diffusers.utils import is_transformers_version

    # transformers >= 4.56 takes `dtype`, older ones `torch_dtype` (as diffusers' own pipeline loader does).
    dtype_kwarg = "dtype" if is_transformers_version(">=", "4.56.0") else "torch_dtype"
    with weights_errors(source):
        index = FluxPipeline.load_config(source.location, local_files_only=True)
        models = {}
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2 or None in entry:
                continue
            library, class_name = entry
            if library not in ("diffusers", "transformers"):
                continue
            model_class = getattr(importlib.import_module(library), class_name, None)
            if not (isinstance(model_class, type) and issubclass(model_class, torch.nn.Module)):
                continue  # tokenizers, scheduler
            started = time.perf_counter()
            models[name] = model_class.from_pretrained(
                source.location, subfolder=name, local_files_only=True, device_map=device,
                **{dtype_kwarg if library == "transformers" else "torch_dtype": dtype},
            )
            # One device, no accelerate hooks (dispatch_model only moved it): placed like `.to(device)`, so the
            # mark of a device_map placement goes (diffusers refuses e.g. tensor parallelism on a marked model).
            if not any(hasattr(module, "_hf_hook") for module in models[name].modules()):
                models[name].__dict__.pop("hf_device_map", None)
            if timings is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timings[name] = round(time.perf_counter() - started, 3)
    return models


@contextmanager
def weights_errors(source: WeightsSource):
    """diffusers' and transformers' load errors (they name the file) as a WeightsError naming the source."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, WeightsError):
            raise
        where = "folder" if source.kind == "folder" else "hub id (offline, local Hugging Face cache)"
        raise WeightsError(
            f"cannot load FLUX weights from {where} {source.location!r}: expected a complete diffusers-format "
            f"FLUX.1 pipeline (transformer, vae, text_encoder, text_encoder_2, tokenizers, scheduler): {exc}"
        ) from exc
