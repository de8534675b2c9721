"""Measure stacks one at a time through the server, like the seed benchmark, and write its table.

For each stack in turn: load it (explicit model control), record the load time, warm up (the first warm-up
request is the fixed-seed reference image), send N requests at concurrency C, record client latency, Triton's
queue and compute time (statistics API), the model's own time, peak GPU memory and steps computed from INFO,
then unload it; with `--reload`, load it once more and record that second load's time (torch.compile's caches
warm). Optionally also measure stacks in-process without the server (`--direct`), as rows named
`<stack> (direct)`: the model's own request handler without Triton, right after the same stack's served run.

Writes under the results folder (default perf/results/<gpu-slug>/, `cpu` without a GPU):
  results.csv       one row per measured stack and configuration, appended as soon as the stack is measured
  results.md        the seed's table for this configuration, plus steps, load time, memory, speed-up, PSNR
  latency.png       horizontal P50 bars sorted by latency, coloured by family, with P90 marks and P99 whiskers, the
                    baseline marked, steps computed for step-cache stacks (the numbers are also in the PNG's
                    `fluxserve` text chunk); `python -m perf.merge FOLDER` draws it again from results.csv
  images/           the fixed-seed reference image of each stack
  environment.json  every run's command line, date and versions

Rows already in results.csv for the same configuration are skipped, so an interrupted sweep resumes.

  python -m perf.sweep --models fp16,bf16,bf16-fa2,bf16-fbcache-0.3 --requests 10
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from client import (
    DEFAULT_URLS, LIMITS, PROTOCOLS, FluxClient, GenerateRequest, GenerateResult, InferenceServerException,
    input_arrays,
)
from fluxserve.stacks import CATALOG, catalog_by_name
from fluxserve.serve import resolve_weights
from fluxserve.weights import ENV_VAR
from perf import LatencySummary, load_prompts, markdown_table

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
DIRECT_SUFFIX = " (direct)"
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "torchao", "tritonclient", "numpy")
MEASURE_OUTPUTS = ("IMAGE_PNG",)  # what a real client asks for; STEPS_COMPUTED and INFO always come back

Generate = Callable[[GenerateRequest, tuple], GenerateResult]


@dataclass(frozen=True)
class Config:
    """What makes two measurements comparable; a row is skipped on rerun when its name and Config match."""

    protocol: str
    height: int
    width: int
    steps: int
    guidance: float
    requests: int
    concurrency: int
    seed: int
    prompts: str  # digest of the prompt set

    def describe(self) -> str:
        return (f"{self.height}x{self.width}, {self.steps} steps, guidance {self.guidance:g}, {self.requests} requests "
                f"at concurrency {self.concurrency} over {self.protocol}, seeds from {self.seed}, "
                f"prompt set {self.prompts}")

    def image_name(self, name: str) -> str:
        """File name of a stack's reference image: it depends on the request settings, not on the load."""
        slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
        return (f"{slug}_{self.height}x{self.width}_{self.steps}steps_g{self.guidance:g}_seed{self.seed}_"
                f"{self.prompts}.png")


@dataclass(frozen=True)
class Row:
    """One measured stack: a line of results.csv (latencies in seconds, memory in GiB), its Config flattened."""

    name: str
    mode: str  # "server", or "direct": in-process, no server
    config: Config
    count: int
    average_s: float
    min_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    images_per_s: float | None  # measured requests / the wall time they took, at the configured concurrency
    steps_computed: float  # mean over the measured requests
    load_s: float
    second_load_s: float | None  # a second load right after the first (--reload): torch.compile's caches warm
    queue_s: float | None  # Triton's mean queue time per request (server rows)
    compute_s: float | None  # Triton's mean compute time per request (server rows)
    model_s: float | None  # mean time in the model's request handler (INFO.latency_ms); the rest is serving
    denoise_s: float | None  # mean time of the denoising loop alone (INFO.timings_ms), to split model from overhead
    text_encode_s: float | None  # mean time of the text encoders (INFO.timings_ms; results.csv only)
    vae_decode_s: float | None  # mean time of the VAE's decoding: with text_encode_s, most of what the loop leaves
    peak_memory_gib: float | None
    psnr_db: float | None  # reference image vs the baseline's: numerical deviation, not quality
    psnr_one_gpu_db: float | None  # a multi-GPU stack's image vs the same stack's on one GPU, when measured
    image: str
    device: str
    weights: str
    attention_kernel: str
    cudnn_version: int | None  # the cuDNN the model's process loaded (INFO), None without a GPU
    measured_at: str
    run: str | None = None  # a headline row (perf.headline): the run folder it was measured in
    baseline_p50_s: float | None = None  # a headline row: the baseline's P50 in that same run, its speed-up's base

    @staticmethod
    def columns() -> list[dataclasses.Field]:
        """The CSV columns: the row's fields with `config` replaced by the Config's fields."""
        fields = []
        for f in dataclasses.fields(Row):
            fields += dataclasses.fields(Config) if f.name == "config" else [f]
        return fields

    def to_csv(self) -> dict[str, str]:
        config = dataclasses.asdict(self.config)
        return {f.name: _format(config[f.name] if f.name in config else getattr(self, f.name)) for f in self.columns()}

    @classmethod
    def from_csv(cls, record: dict[str, str]) -> Row:
        # .get: a column added since an older results.csv was written reads as empty (None).
        values = {f.name: _parse(record.get(f.name, ""), f.type) for f in cls.columns()}
        config = Config(**{f.name: values.pop(f.name) for f in dataclasses.fields(Config)})
        return cls(config=config, **values)


def _format(value) -> str:
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _parse(text: str, annotation: str):
    if text == "" and "None" in annotation:
        return None
    return {"int": int, "float": float, "str": str}[annotation.split(" ")[0]](text)


# ---------------------------------------------------------------- results folder


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


def read_rows(path: Path) -> list[Row]:
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return [Row.from_csv(record) for record in csv.DictReader(file)]


def write_rows(path: Path, rows: list[Row]) -> None:
    """results.csv holding exactly `rows`, in the current columns."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[f.name for f in Row.columns()])
        writer.writeheader()
        writer.writerows(row.to_csv() for row in rows)


def append_row(path: Path, row: Row) -> None:
    """Write one stack's row at once, so an interrupted sweep keeps what it measured. A results.csv written
    with other columns (an older version) is rewritten with the current ones, this row added."""
    columns = [f.name for f in Row.columns()]
    if path.exists():
        with path.open(newline="") as file:
            header = next(csv.reader(file), [])
        if header == columns:
            with path.open("a", newline="") as file:
                csv.DictWriter(file, fieldnames=columns).writerow(row.to_csv())
            return
    write_rows(path, [*read_rows(path), row])


# ---------------------------------------------------------------- measuring


def progress(label: str, message: str) -> None:
    print(f"{label} {message}", flush=True)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images (inf when identical)."""
    error = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return math.inf if error == 0 else float(10 * np.log10(255.0**2 / error))


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def measured_requests(config: Config, prompts: list[str]) -> list[GenerateRequest]:
    """The timed requests: prompts in turn, seeds counting up from the configured one."""
    return [
        GenerateRequest(prompts[i % len(prompts)], config.seed + i, config.steps, config.guidance,
                        config.height, config.width)
        for i in range(config.requests)
    ]


def run_requests(
    generate: Generate, requests: list[GenerateRequest], concurrency: int, label: str
) -> list[GenerateResult]:
    """Send the requests, `concurrency` at a time, reporting each as it completes; the first failure cancels
    the rest and is raised."""
    results = []
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(generate, request, MEASURE_OUTPUTS) for request in requests]
        try:
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                progress(label, f"request {len(results)}/{len(requests)}: {result.latency_s:.3f} s, "
                                f"{result.steps_computed}/{result.info['steps_total']} steps computed")
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def warm_up(generate: Generate, config: Config, prompts: list[str], count: int, label: str) -> GenerateResult:
    """Untimed requests before measuring; the first one is the stack's reference image (first prompt, the
    configured seed)."""
    request = GenerateRequest(prompts[0], config.seed, config.steps, config.guidance, config.height, config.width)
    progress(label, f"warming up: {count} request(s), the first is the reference image")
    reference = generate(request, ("IMAGE_PNG",))
    for _ in range(count - 1):
        generate(request, ())
    return reference


@dataclass
class Measurement:
    """What measuring one stack produced, before it becomes a Row."""

    load_s: float
    reference: GenerateResult
    results: list[GenerateResult]
    queue_s: float | None = None
    compute_s: float | None = None
    second_load_s: float | None = None
    wall_s: float | None = None  # the measured requests, first sent to last answered


def per_thread_generate(url: str, protocol: str, model: str) -> Generate:
    """A generate function safe to call from several threads: each thread makes its own client on first use
    (tritonclient's HTTP client runs on the gevent hub of the thread that made it) and drops it with itself."""
    local = threading.local()

    def generate(request: GenerateRequest, outputs: tuple) -> GenerateResult:
        if not hasattr(local, "client"):
            local.client = FluxClient(url, protocol)
        return local.client.generate(model, request, outputs)

    return generate


def per_request_s(nanoseconds: int, count: int) -> float | None:
    return nanoseconds / count / 1e9 if count else None


def measure_on_server(client: FluxClient, model: str, config: Config, prompts: list[str], warmup: int,
                      label: str, reload: bool = False) -> Measurement:
    """Load, warm up, measure and unload one stack on the server; with `reload`, then time a second load."""
    if any(m.name == model and m.state == "READY" for m in client.models()):
        progress(label, "already loaded: unloading first, so that the load time is real")
        client.unload(model)
    progress(label, "loading")
    load_s = client.load(model)
    progress(label, f"loaded in {load_s:.1f} s")
    generate = per_thread_generate(client.url, client.protocol, model)
    try:
        start = client.statistics(model)
        reference = warm_up(generate, config, prompts, warmup, label)
        before = start + client.statistics_since(model, start, warmup)  # the warm-up counted, not measured
        started = time.perf_counter()
        results = run_requests(generate, measured_requests(config, prompts), config.concurrency, label)
        wall_s = time.perf_counter() - started
        served = client.statistics_since(model, before, len(results))
    finally:
        progress(label, "unloading")
        client.unload(model)
    second_load_s = None
    if reload:
        progress(label, "loading again (second load, compile caches warm)")
        second_load_s = client.load(model)
        progress(label, f"second load in {second_load_s:.1f} s; unloading")
        client.unload(model)
    return Measurement(load_s, reference, results, per_request_s(served.queue_ns, served.success),
                       per_request_s(served.compute_ns, served.success), second_load_s, wall_s)


def in_process_generate(service) -> Generate:
    """A generate function over the model's own request handler (`StackService.infer`: validation,
    generation, PNG, telemetry), without Triton: the latency is that call alone."""

    def generate(request: GenerateRequest, outputs: tuple) -> GenerateResult:
        started = time.perf_counter()
        arrays = service.infer(input_arrays(request), {*outputs, "STEPS_COMPUTED", "INFO"})
        latency = time.perf_counter() - started

        def scalar(name: str):
            return arrays[name].reshape(-1)[0] if name in arrays else None

        return GenerateResult(int(scalar("STEPS_COMPUTED")), json.loads(scalar("INFO")), latency,
                              scalar("IMAGE_PNG"), arrays.get("IMAGE"))

    return generate


def measure_direct(stack_name: str, weights: str, config: Config, prompts: list[str], warmup: int,
                   label: str) -> Measurement:
    """Build the stack in this process as the server's model does (no server) and measure it with the same
    requests, one at a time. The model is dropped on return; `release_memory` then gives its GPU memory back."""
    import torch

    from fluxserve.server.serving import StackService, instance_devices

    stack = catalog_by_name().get(stack_name)
    if stack is None:
        raise ValueError(f"--direct takes catalog stacks; {stack_name!r} is not one")
    parameters = {**stack.to_parameters(), "weights": weights}
    devices = instance_devices("GPU" if torch.cuda.is_available() else "CPU", 0, parameters)
    progress(label, f"building in-process on {', '.join(map(str, devices))} (weights {weights})")
    started = time.perf_counter()
    service = StackService(stack_name, parameters, devices, notify=lambda message: progress(label, message))
    load_s = time.perf_counter() - started
    progress(label, f"built in {load_s:.1f} s")
    generate = in_process_generate(service)
    reference = warm_up(generate, config, prompts, warmup, label)
    started = time.perf_counter()
    results = run_requests(generate, measured_requests(config, prompts), 1, label)
    return Measurement(load_s, reference, results, wall_s=time.perf_counter() - started)


def reporting_failure(label: str, measure: Callable[..., Measurement], *args) -> Measurement | None:
    """Run one stack's measurement; on failure print why (the server's own message) and return None, so the
    sweep goes on with the next stack."""
    try:
        return measure(*args)
    except InferenceServerException as exc:
        progress(label, f"FAILED: {exc.message()}")
    except (RuntimeError, ValueError) as exc:  # in-process: unsupported stack, bad weights, out of memory
        progress(label, f"FAILED: {type(exc).__name__}: {exc}")
    return None


def release_memory() -> None:
    """Free what an in-process stack held, so the next one (or the server) starts from an empty GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- rows and reports


def mean_timing_s(results: list[GenerateResult], phase: str) -> float:
    """Mean of one phase of the model's own timings (INFO.timings_ms), in seconds."""
    return float(np.mean([result.info["timings_ms"][phase] for result in results])) / 1000


def make_row(name: str, mode: str, config: Config, measurement: Measurement, folder: Path, baseline: str) -> Row:
    """Summarise a measurement; save its reference image and compare it with the baseline's and, for a multi-GPU
    stack, the same stack's on one GPU, where those were measured."""
    images = folder / "images"
    image_path = images / config.image_name(name)
    image_path.write_bytes(measurement.reference.png)
    reference = read_png(measurement.reference.png)

    def deviation_from(stack_name: str | None) -> float | None:
        path = images / config.image_name(stack_name) if stack_name else None
        return psnr(reference, read_png(path.read_bytes())) if path is not None and path.exists() else None

    deviation = deviation_from(baseline)
    one_gpu_deviation = deviation_from(one_gpu_counterpart(name.removesuffix(DIRECT_SUFFIX)))
    results = measurement.results
    latency = LatencySummary.of([result.latency_s for result in results])
    peaks = [r.info["peak_memory_gib"] for r in (measurement.reference, *results)]
    peaks = [peak for peak in peaks if peak is not None]  # None: no GPU
    info = results[-1].info
    return Row(
        name=name, mode=mode, config=config, count=latency.count, average_s=latency.average,
        min_s=latency.min, p50_s=latency.p50, p90_s=latency.p90, p99_s=latency.p99,
        images_per_s=len(results) / measurement.wall_s if measurement.wall_s else None,
        steps_computed=float(np.mean([result.steps_computed for result in results])),
        load_s=measurement.load_s, second_load_s=measurement.second_load_s, queue_s=measurement.queue_s,
        compute_s=measurement.compute_s, model_s=float(np.mean([result.info["latency_ms"] for result in results])) / 1000,
        denoise_s=mean_timing_s(results, "denoise"), text_encode_s=mean_timing_s(results, "text_encode"),
        vae_decode_s=mean_timing_s(results, "vae_decode"),
        peak_memory_gib=max(peaks) if peaks else None, psnr_db=deviation, psnr_one_gpu_db=one_gpu_deviation,
        image=str(image_path.relative_to(folder)), device=info["device"], weights=info["weights"],
        attention_kernel=info["attention_kernel"], cudnn_version=info.get("cudnn_version"),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def one_gpu_counterpart(name: str) -> str | None:
    """The one-GPU stack a multi-GPU catalog stack splits (bf16-cp2 -> bf16), whose image it should reproduce."""
    stack = catalog_by_name().get(name)
    if stack is None or stack.gpus == 1:
        return None
    return dataclasses.replace(stack, parallel="none", parallel_degree=1).name


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _psnr_cell(value: float | None) -> str:
    return "" if value is None else ("inf" if math.isinf(value) else f"{value:.1f}")


SEED_ROWS = {stack.name: stack.seed_row for stack in CATALOG}


def speedup(row: Row, base: Row | None) -> float | None:
    """The baseline's P50 over the row's: the baseline of the row's own run when it names one (headline rows),
    else the table's."""
    reference = row.baseline_p50_s if row.baseline_p50_s is not None else (base.p50_s if base else None)
    return None if reference is None else reference / row.p50_s


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


# Families of the chart, in legend order, with their colours (derived from the catalog's Stack fields).
FAMILIES = {
    "eager": "#4c72b0",
    "step cache": "#55a868",
    "fp8 / int8, eager": "#c44e52",
    "compiled": "#8172b3",
    "compiled + fp8": "#dd8452",
    "multi-GPU": "#64b5cd",
    "other": "#b0b0b0",  # a name outside the catalog
}


def chart_family(name: str) -> str:
    """The chart's family of a row: its catalog stack's (a `<stack> (direct)` row is its stack's), checked in
    this order: several GPUs (context parallel), compiled (with fp8: `compiled + fp8`), quantized without
    compilation, a step cache, else eager (any dtype, attention kernel or CUDA graph); `other` outside the
    catalog."""
    stack = catalog_by_name().get(name.removesuffix(DIRECT_SUFFIX))
    if stack is None:
        return "other"
    if stack.gpus > 1:
        return "multi-GPU"
    if stack.compile != "none":
        return "compiled + fp8" if stack.quantization in ("fp8", "fp8row") else "compiled"
    if stack.quantization != "none":
        return "fp8 / int8, eager"
    return "step cache" if stack.cache != "none" else "eager"


def _has_step_cache(name: str) -> bool:
    stack = catalog_by_name().get(name.removesuffix(DIRECT_SUFFIX))
    return stack is not None and stack.cache != "none"


def _steps_label(row: Row) -> str:
    steps = row.steps_computed
    return f"{steps:.0f}/{row.config.steps}" if abs(steps - round(steps)) < 0.05 else f"{steps:.1f}/{row.config.steps}"


def write_chart(path: Path, rows: list[Row], title: str, baseline: str = "bf16") -> None:
    """Horizontal P50 bars, fastest at the top, coloured by family (`chart_family`), with P90 marks and P99
    whiskers; each bar labelled with its P50, its speed-up against the baseline (whose P50 is a dashed line) and,
    for step-cache stacks, the steps computed (`9/28`). Log scale when the latencies span more than 10x (eager
    int8 at 40 s would flatten the 2-5 s rows that matter). About 1200 px wide; the plotted numbers go into the
    PNG's `fluxserve` text, by row in results.csv order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ordered = sorted(rows, key=lambda row: row.p50_s)
    y = np.arange(len(ordered))
    p50, p90, p99 = (np.array([getattr(row, key) for row in ordered]) for key in ("p50_s", "p90_s", "p99_s"))
    families = [chart_family(row.name) for row in ordered]
    base = next((row for row in rows if row.name == baseline), None)
    log = p99.max() / p50.min() > 10
    legend_in = 0.6  # inches below the axes for the legend
    height = 1.9 + legend_in + 0.28 * len(ordered)
    figure = Figure(figsize=(10, height))
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots()
    bars = axes.barh(y, p50, height=0.7, color=[FAMILIES[family] for family in families], edgecolor="white",
                     linewidth=0.5)
    for bar, row in zip(bars, ordered):
        if row.name.endswith(DIRECT_SUFFIX):
            bar.set_hatch("///")
        if row.name == baseline:
            bar.set_edgecolor("black")
            bar.set_linewidth(1.5)
    axes.errorbar(p50, y, xerr=[np.zeros_like(p50), p99 - p50], fmt="none", ecolor="black", elinewidth=0.8,
                  capsize=3)
    axes.scatter(p90, y, marker="|", s=90, color="black", linewidths=1.5, zorder=3)
    notes = []
    for position, row, end in zip(y, ordered, p99):
        parts = [f"{row.p50_s:.2f} s"]
        ratio = speedup(row, base)
        if ratio is not None:
            parts.append(f"{ratio:.2f}x")
        if _has_step_cache(row.name):
            parts.append(f"{_steps_label(row)} steps")
        notes.append(axes.annotate("   ".join(parts), (end, position), textcoords="offset points", xytext=(5, 0),
                                   va="center", fontsize=8, zorder=4,  # over the baseline's line
                                   bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"}))
    labels = [f"{row.name} (baseline)" if row.name == baseline else row.name for row in ordered]
    axes.set_yticks(y, labels, fontsize=8)
    for label, row in zip(axes.get_yticklabels(), ordered):
        if row.name == baseline:
            label.set_fontweight("bold")
    axes.set_ylim(len(ordered) - 0.5, -0.5)  # fastest at the top
    if log:
        axes.set_xscale("log")
        axes.set_xlim(10 ** np.floor(np.log10(p50.min())), p99.max() * 1.5)
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    else:
        axes.set_xlim(0, p99.max() * 1.5)
    axes.grid(axis="x", which="major", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.set_xlabel("latency per request (s" + (", log scale" if log else "") + "): bar P50, tick P90, whisker P99")
    handles = [Patch(color=color, label=family) for family, color in FAMILIES.items() if family in families]
    handles += [Line2D([], [], color="black", marker="|", linestyle="none", markersize=9, label="P90"),
                Line2D([], [], color="black", linewidth=0.8, label="P99")]
    if any(row.name.endswith(DIRECT_SUFFIX) for row in ordered):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="in-process, no server"))
    if base is not None:
        axes.axvline(base.p50_s, color="black", linestyle="--", linewidth=0.8, zorder=1)
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=0.8,
                              label=f"baseline {baseline}: {base.p50_s:.2f} s"))
    figure.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    if any(row.baseline_p50_s is not None for row in rows):
        ratio_note = f"; Nx: speed-up against the {baseline} P50 of the row's own run"
    else:
        ratio_note = f"; Nx: speed-up against {baseline}'s P50" if base is not None else ""
    figure.suptitle(textwrap.fill(f"{title}{ratio_note}; N/M steps: steps computed by step-cache stacks", 110),
                    fontsize=9)
    figure.tight_layout(rect=(0, legend_in / height, 1, 1))
    # a label that would run past the axes goes inside its bar instead (the slowest rows)
    renderer = canvas.get_renderer()
    right = axes.get_window_extent(renderer).x1
    for note, value in zip(notes, p50):
        if note.get_window_extent(renderer).x1 > right:
            note.xy = (value, note.xy[1])
            note.set_position((-5, 0))
            note.set_horizontalalignment("right")
            note.set_color("white")
            note.set_fontweight("bold")
            note.get_bbox_patch().set_visible(False)
    rank = {id(row): index for index, row in enumerate(ordered)}
    data = {row.name: {"p50_s": row.p50_s, "p90_s": row.p90_s, "p99_s": row.p99_s, "family": chart_family(row.name),
                       "rank": rank[id(row)]} for row in rows}
    figure.savefig(path, format="png", dpi=120, metadata={"fluxserve": json.dumps(data)})


def write_reports(folder: Path, config: Config, baseline: str, run: dict) -> list[Row]:
    """results.md and latency.png for this configuration, from results.csv (the one source of numbers)."""
    rows = [row for row in read_rows(folder / "results.csv") if row.config == config]
    (folder / "results.md").write_text(markdown(rows, config, baseline, run))
    if rows:
        write_chart(folder / "latency.png", rows, f"{run['gpu'] or 'CPU'}: {config.describe()}", baseline)
    return rows


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="http")
    parser.add_argument("--url", help=f"server address (default {DEFAULT_URLS['http']} / {DEFAULT_URLS['grpc']})")
    parser.add_argument("--models", default=",".join(stack.name for stack in CATALOG),
                        help="comma-separated stacks to measure through the server (default: the whole catalog)")
    parser.add_argument("--direct", default="", help="comma-separated catalog stacks to measure in-process too")
    parser.add_argument("--reload", default="",
                        help="comma-separated stacks whose second load to time, right after measuring them")
    parser.add_argument("--weights", default=os.environ.get(ENV_VAR),
                        help=f"weights source for --direct (default: ${ENV_VAR}, else the launcher's default)")
    parser.add_argument("--baseline", default="bf16", help="stack the speed-up and PSNR compare with (default bf16)")
    parser.add_argument("--requests", type=positive, default=10, help="timed requests per stack (default 10)")
    parser.add_argument("--concurrency", type=positive, default=1, help="requests in flight (default 1)")
    parser.add_argument("--warmup", type=positive, default=1,
                        help="untimed requests first (default 1); the first is the reference image")
    parser.add_argument("--steps", type=int, default=LIMITS.default_steps)
    parser.add_argument("--guidance", type=float, default=LIMITS.default_guidance)
    parser.add_argument("--height", type=int, default=LIMITS.default_size)
    parser.add_argument("--width", type=int, default=LIMITS.default_size)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the reference image (default 0); timed requests count up from it")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line (default: perf/prompts.txt)")
    parser.add_argument("--output", type=Path, help="results folder (default perf/results/<gpu-slug>)")
    return parser.parse_args(argv)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def baseline_first(models: list[str], baseline: str) -> list[str]:
    """The baseline goes first, so every later row's PSNR can be computed as soon as it is measured."""
    return sorted(models, key=lambda name: name != baseline)


def run_jobs(
    client: FluxClient, args: argparse.Namespace, config: Config, prompts: list[str], folder: Path
) -> list[str]:
    """Measure each stack not yet in results.csv for this configuration, writing its row at once; returns the
    names of the stacks that failed."""
    served, direct = baseline_first(names(args.models), args.baseline), names(args.direct)
    reload = names(args.reload)
    jobs = []
    for model in served:  # a stack's direct run right after its served one, so one deadline cannot split them
        jobs += [(model, "server")] + ([(model, "direct")] if model in direct else [])
    jobs += [(stack, "direct") for stack in baseline_first(direct, args.baseline) if stack not in served]
    done = {(row.name, row.config) for row in read_rows(folder / "results.csv")}
    weights = resolve_weights(args.weights) if args.direct else None
    print(f"sweep: {len(jobs)} stack(s); {config.describe()}; results in {folder}", flush=True)
    failed = []
    for number, (model, mode) in enumerate(jobs, 1):
        name = model + DIRECT_SUFFIX if mode == "direct" else model
        label = f"[{number}/{len(jobs)}] {name}:"
        if (name, config) in done:
            progress(label, "already in results.csv for this configuration: skipped")
            continue
        if mode == "server":
            measurement = reporting_failure(label, measure_on_server, client, model, config, prompts, args.warmup,
                                            label, model in reload)
        else:
            measurement = reporting_failure(label, measure_direct, model, weights, config, prompts, args.warmup,
                                            label)
            release_memory()
        if measurement is None:
            failed.append(name)
            continue
        row = make_row(name, mode, config, measurement, folder, args.baseline)
        append_row(folder / "results.csv", row)
        progress(label, f"P50 {row.p50_s:.3f} s, P90 {row.p90_s:.3f} s, P99 {row.p99_s:.3f} s, "
                        f"{row.steps_computed:.1f}/{row.config.steps} steps, load {row.load_s:.1f} s")
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    prompts = load_prompts(args.prompts_file)
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:8]
    config = Config(args.protocol, args.height, args.width, args.steps, args.guidance, args.requests,
                    args.concurrency, args.seed, digest)
    client = FluxClient(args.url, args.protocol)
    try:
        server_version = client.server_version()
    except (InferenceServerException, ConnectionError) as exc:
        message = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
        print(f"error: cannot reach the server at {client.url}: {message}", file=sys.stderr)
        return 1
    gpu = gpu_name()
    folder = args.output or RESULTS_ROOT / gpu_slug(gpu)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    run = environment(argv, server_version, gpu)
    record_environment(folder, run)
    try:
        failed = run_jobs(client, args, config, prompts, folder)
    except KeyboardInterrupt:
        print("sweep: interrupted; the same command resumes after the last stack measured", file=sys.stderr)
        return 130
    client.close()
    rows = write_reports(folder, config, args.baseline, run)
    print(f"sweep: {len(rows)} row(s) for this configuration in {folder / 'results.md'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
