"""Where and how a sweep ran: this host's GPU (the results folder's name) and environment.json, every run's command
line, date and versions, so that a results folder says what produced its rows."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "torchao", "tritonclient", "numpy")


def nvidia_smi(field: str) -> str | None:
    """One field of the first GPU from nvidia-smi (no CUDA context in this process), None without it."""
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"]
    done = subprocess.run(query, capture_output=True, text=True, timeout=30)
    lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return lines[0].strip() if lines else None


def gpu_name() -> str | None:
    """This host's first GPU (the server runs on the same host in the benchmark setup), None without one."""
    import torch

    return nvidia_smi("name") or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def gpu_slug(name: str | None) -> str:
    """'NVIDIA H200' -> 'h200': the results folder's name; 'cpu' without a GPU."""
    if not name:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").removeprefix("nvidia-")


def environment(argv: list[str], server_version: str, gpu: str | None) -> dict:
    """This run's command line, date and versions, for environment.json and the Markdown header."""
    import torch

    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "command": shlex.join(["python", "-m", "perf.sweep", *argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "versions": versions,
        "triton_server": server_version,
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "driver": nvidia_smi("driver_version"),
    }


def read_runs(folder: Path) -> list[dict]:
    """The runs recorded in a results folder's environment.json, none if it has none."""
    path = folder / "environment.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def write_runs(folder: Path, runs: list[dict]) -> None:
    (folder / "environment.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def record_environment(folder: Path, run: dict) -> None:
    """Append this run to environment.json (rows of one results.csv may come from several runs)."""
    write_runs(folder, [*read_runs(folder), run])
