"""Performance tools for the fluxserve models: Locust users (`locustfile.py`) and the stack sweep (`sweep.py`).

Shared here: the built-in prompt set, the latency summary both report (Average, Min, P50, P90, P99) and the
argument types of the command lines (`sweep.py`, `mixed_traffic.py`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.txt"


def load_prompts(path: Path | None = None) -> list[str]:
    """One prompt per non-empty line of `path` (default: the built-in set)."""
    lines = (path or PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path or PROMPTS_FILE}")
    return prompts


@dataclass(frozen=True)
class LatencySummary:
    """Exact latency statistics in seconds (percentiles linearly interpolated, as numpy does)."""

    count: int
    average: float
    min: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, latencies: list[float]) -> LatencySummary:
        if not latencies:
            return cls(0, *[float("nan")] * 5)
        values = np.asarray(latencies, dtype=float)
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(len(values), float(values.mean()), float(values.min()), float(p50), float(p90), float(p99))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table, in the layout of the seed benchmark's tables."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(name) + 2) for name in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def positive(text: str) -> int:
    """An argparse type for counts (requests, concurrency): at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def names(text: str) -> list[str]:
    """A comma-separated argument's names (`--models a,b`), blanks dropped."""
    return [name.strip() for name in text.split(",") if name.strip()]
