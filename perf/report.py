"""results.md: the seed benchmark's table of a sweep's rows, and both reports (with latency.png) drawn again from
results.csv."""

from __future__ import annotations

import math
from pathlib import Path

from fluxserve.stacks import CATALOG
from perf import markdown_table
from perf.chart import write_chart
from perf.rows import DIRECT_SUFFIX, Config, Row, read_rows, speedup

SEED_ROWS = {stack.name: stack.seed_row for stack in CATALOG}


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _psnr_cell(value: float | None) -> str:
    return "" if value is None else ("inf" if math.isinf(value) else f"{value:.1f}")


def table(rows: list[Row], baseline: str) -> str:
    """The seed's table (Average, Min, P50, P90, P99 seconds) plus this project's columns, and the run each row
    comes from when the rows name one (a headline merged from several runs)."""
    base = next((row for row in rows if row.name == baseline), None)
    with_runs = any(row.run for row in rows)
    header = ["Optimization Technique", "Seed row", "Average Time (s)", "Min Time (s)", "P50 Time (s)",
              "P90 Time (s)", "P99 Time (s)", "Images/s", "Steps computed", "Load (s)", "Second load (s)", "Triton queue (s)",
              "Triton compute (s)", "In model (s)", "Denoise (s)", "Peak memory (GiB)", f"Speed-up vs {baseline}",
              f"PSNR vs {baseline} (dB)", "PSNR vs one GPU (dB)", "Measured (UTC)", *(["Run"] if with_runs else [])]
    cells = []
    for row in rows:
        ratio = speedup(row, base)
        memory = "" if row.peak_memory_gib is None else f"{row.peak_memory_gib:.2f}"
        cells.append([
            row.name, SEED_ROWS.get(row.name.removesuffix(DIRECT_SUFFIX), ""),
            *(_seconds(v) for v in (row.average_s, row.min_s, row.p50_s, row.p90_s, row.p99_s)),
            "" if row.images_per_s is None else f"{row.images_per_s:.3f}", f"{row.steps_computed:.1f}/{row.config.steps}", f"{row.load_s:.1f}",
            "" if row.second_load_s is None else f"{row.second_load_s:.1f}", _seconds(row.queue_s),
            _seconds(row.compute_s), _seconds(row.model_s), _seconds(row.denoise_s), memory,
            "n/a" if ratio is None else f"{ratio:.2f}x", _psnr_cell(row.psnr_db), _psnr_cell(row.psnr_one_gpu_db),
            row.measured_at.replace("T", " ")[:16], *([row.run or ""] if with_runs else []),
        ])
    return markdown_table(header, cells)


def markdown(rows: list[Row], config: Config, baseline: str, run: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in run["versions"].items() if version)
    gpu = run["gpu"] or "no GPU on the client host"
    driver = f", driver {run['driver']}" if run["driver"] else ""
    return (
        f"# FLUX.1-dev stacks through Triton: {gpu}\n\n"
        f"Configuration: {config.describe()}.\n\n"
        f"Last run: `{run['command']}` on {run['date']}; Triton server {run['triton_server']}; {versions}"
        f"{driver}. Every run is in environment.json.\n\n"
        + table(rows, baseline)
        + f"\nLatency is client-side, per request, in seconds. Speed-up: {baseline}'s P50 / the row's P50. "
        f"PSNR: the fixed-seed reference image against {baseline}'s (images/), a measure of numerical "
        "deviation, not of quality (inf: identical); for a multi-GPU stack also against the same stack on one "
        "GPU. Images/s: the measured requests over the time they took, at the row's concurrency. Triton queue and compute: the server's own mean per "
        "request. In model: the model's request handler (validation, generation, PNG), so P50 minus it is "
        "the serving overhead; Denoise: the denoising loop within it. Second load: loading the stack again "
        f"right after, compile caches warm. Rows named `<stack>{DIRECT_SUFFIX}` ran the same handler "
        "in-process without the server, one request at a time."
        "\n\n![latency per stack](latency.png)\n"
    )


def write_reports(folder: Path, config: Config, baseline: str, run: dict) -> list[Row]:
    """results.md and latency.png for this configuration, from results.csv (the one source of numbers)."""
    rows = [row for row in read_rows(folder / "results.csv") if row.config == config]
    (folder / "results.md").write_text(markdown(rows, config, baseline, run))
    if rows:
        write_chart(folder / "latency.png", rows, f"{run['gpu'] or 'CPU'}: {config.describe()}", baseline)
    return rows
