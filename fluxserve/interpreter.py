"""How a model process starts Python children (context-parallel workers, the ahead-of-time package check): with this
interpreter, also inside Triton's Python backend stub (whose sys.executable is the stub, not python), and with this
package importable."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # holds fluxserve/: children import it from here


def python_executable() -> str:
    """This interpreter when sys.executable is a python, else the python3 on PATH (the stub's case)."""
    executable = Path(sys.executable or "")
    if executable.name.startswith("python") and executable.is_file():
        return str(executable)
    found = shutil.which("python3")
    if found is None:
        raise RuntimeError("no python3 on PATH to start a child process of the model with")
    return found


def child_environment() -> dict[str, str]:
    """This process's environment with the package root first on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
