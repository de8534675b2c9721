"""Where a pipeline's weights come from.

A weights source is one string, read from `--weights` / `FLUXSERVE_WEIGHTS`:
  /path/to/folder        a diffusers-format FLUX.1 folder (has model_index.json)
  owner/name             a hub id already in the local Hugging Face cache (loaded offline)
  synthetic:tiny         toy-size FLUX with random weights (tests, CPU demo)
  synthetic:full         exact FLUX.1-dev architecture with random weights, built on the GPU (benchmarks)
"""

from __future__ import annotations

import logging
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
    """Load a FluxPipeline from `source` in `dtype` onto `device`."""
    from diffusers import FluxPipeline

    if source.kind == "synthetic":
        from .synthetic import build_synthetic_pipeline

        if source.location == "full" and device.type != "cuda":
            raise WeightsError("synthetic:full is built directly on a CUDA GPU; use synthetic:tiny on CPU")
        return build_synthetic_pipeline(source.location, dtype, device)
    try:
        pipe = FluxPipeline.from_pretrained(
            source.location, dtype=dtype, local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        where = "folder" if source.kind == "folder" else "hub id (offline, local Hugging Face cache)"
        raise WeightsError(
            f"cannot load FLUX weights from {where} {source.location!r}: expected a complete diffusers-format "
            f"FLUX.1 pipeline (transformer, vae, text_encoder, text_encoder_2, tokenizers, scheduler): {exc}"
        ) from exc
    return pipe.to(device)
