"""The measurements every derived number comes from: served rows of one H200 (perf/results/h200/README.md) and
the cold starts measured there."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..stacks import Stack

ROOT = Path(__file__).resolve().parents[2]  # the repository root, which holds fluxserve/
RESULTS_DIR = ROOT / "perf" / "results" / "h200"
RESULTS_CSV = RESULTS_DIR / "results.csv"
REFERENCE_STACK = "bf16"  # the stack whose latency scales the H200's numbers to another GPU


@dataclass(frozen=True)
class Measurement:
    """A served row of results.csv (seconds, GiB)."""

    p50_s: float
    p99_s: float
    load_s: float
    peak_gib: float


def measurements(path: Path = RESULTS_CSV) -> dict[str, Measurement]:
    """Served rows by stack name."""
    with path.open(newline="") as file:
        return {
            row["name"]: Measurement(float(row["p50_s"]), float(row["p99_s"]), float(row["load_s"]),
                                     float(row["peak_memory_gib"]))
            for row in csv.DictReader(file) if row["mode"] == "server"
        }


def cold_start_loads(results: Path = RESULTS_DIR) -> dict[str, float]:
    """Seconds each stack took to load in a served cold start (empty compile caches, every warm-up size compiled and
    graphed: what the first pod on an empty cache volume does), the slowest of every run that measured it
    (`perf/fresh_starts.sh` writes loads.json)."""
    loads: dict[str, float] = {}
    for path in results.glob("*/cold-start*/loads.json"):
        for model, load in json.loads(path.read_text()).items():
            loads[model] = max(loads.get(model, 0.0), float(load["load_seconds"]))
    return loads


def startup_load_s(stack: Stack, measured: dict[str, Measurement], cold: dict[str, float]) -> float:
    """The load a stack's startup probe must allow: its served cold start where one was measured; else, for a stack
    that compiles or captures CUDA graphs, whose warm-up at every size the loads in results.csv predate, the slowest
    cold start measured; else its load in results.csv (by its one-GPU twin for a context-parallel stack)."""
    name = measured_as(stack)
    if name in cold:
        return cold[name]
    if (stack.compile != "none" or stack.cuda_graph) and cold:
        return max(measured[name].load_s, *cold.values())
    return measured[name].load_s


def measured_as(stack: Stack) -> str:
    """The measured stack that stands for `stack`: itself, or for a context-parallel stack (not yet measured on
    GPUs) its one-GPU twin, whose weights each of its GPUs holds and whose load each of its workers repeats."""
    if stack.parallel == "none":
        return stack.name
    return dataclasses.replace(stack, parallel="none", parallel_degree=1).name
