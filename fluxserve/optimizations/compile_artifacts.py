"""Portable compile artifacts: what torch.compile made for a stack, written once per stack, GPU and versions and read
back before the next load compiles, so a fresh machine (an empty Inductor cache, a new pod) starts without compiling.

PyTorch's own mechanism (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`, the "mega cache"): the FX
graph, AOTAutograd and autotuning cache entries, with the Triton kernels inside, in one byte string. Loading it
fills the local caches, so compilation then hits them (Dynamo still traces: seconds, not minutes). Here only the
keying and the failure handling are the project's own: a file per key (the stack, the device and capability, the
library versions and this package's source digest, as the ahead-of-time packages are keyed) beside a small JSON
of its key and checksum. An artifact made for another GPU or other versions, a damaged one, or one torch refuses is
ignored with a warning naming it; the load then compiles as without artifacts and writes its own.

    FLUXSERVE_COMPILE_ARTIFACTS=off | DIR   (default: beside the compile cache, TORCHINDUCTOR_CACHE_DIR/../artifacts)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .aot_blocks import describe_environment, environment
from ..shared_dirs import CACHE_HOME, COMPILE_CACHE_ENV
from ..stacks import Stack

log = logging.getLogger(__name__)

ARTIFACTS_ENV = "FLUXSERVE_COMPILE_ARTIFACTS"
OFF = "off"
SUFFIX = ".bin"


def artifacts_folder() -> Path | None:
    """Where artifacts live (FLUXSERVE_COMPILE_ARTIFACTS: a folder, or off); by default beside the compile cache,
    so that a mounted cache volume carries them too."""
    value = os.environ.get(ARTIFACTS_ENV, "").strip()
    if value.lower() == OFF:
        return None
    if value:
        return Path(value)
    compile_cache = os.environ.get(COMPILE_CACHE_ENV)
    return Path(compile_cache).parent / "artifacts" if compile_cache else CACHE_HOME / "artifacts"


def artifact_key(stack: Stack, device: torch.device) -> dict[str, str]:
    """What the compiled code depends on: the stack, the device and the library versions, this package's source."""
    return {"stack": stack.name, **environment(device)}


def key_digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Artifact:
    """One stack's artifact file and the JSON beside it (key, sha256, size)."""

    data: Path

    @property
    def meta(self) -> Path:
        return self.data.with_suffix(".json")

    @classmethod
    def for_key(cls, folder: Path, key: dict[str, str]) -> Artifact:
        return cls(folder / key["stack"] / f"{key_digest(key)}{SUFFIX}")


def load_artifact(stack: Stack, device: torch.device, folder: Path | None = None) -> Path | None:
    """Fill the compile caches from this stack's artifact, when there is a sound one for this key; returns its path.
    Every other file of the stack (another GPU or versions) and any damaged one is named in a warning."""
    folder = artifacts_folder() if folder is None else folder
    if folder is None:
        return None
    key = artifact_key(stack, device)
    wanted = Artifact.for_key(folder, key)
    for meta in sorted(wanted.data.parent.glob("*.json")) if wanted.data.parent.is_dir() else []:
        if meta != wanted.meta:
            log.warning("compile artifact %s ignored: %s", meta.with_suffix(SUFFIX), _how_it_differs(meta, key))
    if not wanted.data.exists():
        return None
    try:
        recorded = json.loads(wanted.meta.read_text())
        data = wanted.data.read_bytes()
        if recorded.get("key") != key:
            raise ValueError(f"its key is {describe_environment(recorded.get('key') or {})}")
        if hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
            raise ValueError(f"its checksum does not match {wanted.meta.name} (damaged or partly written)")
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as error:  # noqa: BLE001 (any unusable artifact means: compile as without one)
        log.warning("compile artifact %s ignored, compiling instead: %s", wanted.data, error)
        return None
    log.info("stack %s: compile caches filled from %s (%s)", stack.name, wanted.data, _entries(info))
    return wanted.data


def save_artifact(stack: Stack, device: torch.device, folder: Path | None = None) -> Path | None:
    """Write what this process compiled (and read from the caches) as the stack's artifact for this key; the file is
    replaced atomically, so a load beside this one never reads half of it. None when off or nothing was compiled."""
    folder = artifacts_folder() if folder is None else folder
    saved = torch.compiler.save_cache_artifacts() if folder is not None else None
    if saved is None:
        return None
    data, info = saved
    key = artifact_key(stack, device)
    artifact = Artifact.for_key(folder, key)
    meta = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    try:
        artifact.data.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(artifact.data, data)
        _write_atomically(artifact.meta, json.dumps(meta, indent=2).encode())
    except OSError as error:
        log.warning("stack %s: could not write its compile artifact to %s: %s", stack.name, artifact.data, error)
        return None
    log.info("stack %s: compile artifact written to %s (%d bytes; %s)", stack.name, artifact.data, len(data),
             _entries(info))
    return artifact.data


def _how_it_differs(meta: Path, key: dict[str, str]) -> str:
    try:
        other = json.loads(meta.read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its key file is unreadable"
    differing = {name: value for name, value in other.items() if key.get(name) != value}
    return f"made for {describe_environment(differing)}; this process has {describe_environment(key)}"


def _entries(info) -> str:
    """A CacheInfo's entry counts per cache (e.g. inductor 12, aot_autograd 12)."""
    counts = {name: len(keys) for name, keys in (info.artifacts if info is not None else {}).items() if keys}
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "no entries"


def _write_atomically(path: Path, data: bytes) -> None:
    handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
