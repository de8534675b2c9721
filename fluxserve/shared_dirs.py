"""Directories in places shared by every server, checkout and environment of a user (the cache), made once and then
only read: a running server maps their files, so a launcher beside it must never write into them."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fluxserve"
# torch.compile's on-disk cache (Inductor, AOTAutograd): a compiled stack's second load reuses it.
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
PARTIAL = ".partial-"  # directories being written; never used, and removed once stale
STALE_PARTIAL_S = 24 * 3600


def content_keyed_directory(folder: Path, prefix: str, key: str, fill, rekey=None) -> Path:
    """`folder/<prefix>-<key>`, made once and then only read: written by `fill` into a temporary directory and
    renamed into place (atomic), so a server never sees it half-written and a launcher beside it never writes
    into it; an existing one is reused as is. `rekey`, if given, computes the key again from the filled
    directory (its sources may have changed while being copied), so that the name always matches the content."""
    final = folder / f"{prefix}-{key}"
    if final.is_dir():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(folder)
    staged = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{prefix}-", dir=folder))
    try:
        fill(staged)
        if rekey is not None:
            final = folder / f"{prefix}-{rekey(staged)}"
        staged.chmod(0o755)  # mkdtemp makes it 0700: the server may run as another user of the same cache
        try:
            os.rename(staged, final)
        except OSError:
            if not final.is_dir():  # not a launcher beside us having made the same directory first
                raise
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return final


def _remove_stale_partials(folder: Path) -> None:
    """Temporary directories of launchers that died while writing them (none is ever used by a server)."""
    for path in folder.glob(f"{PARTIAL}*"):
        try:
            if time.time() - path.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
