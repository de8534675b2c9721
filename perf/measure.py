"""Measuring one stack: load it on the server (or build it in-process, `--direct`), warm up, send the timed
requests and summarise them, with its reference image's PSNR, as a results row."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from client import FluxClient, GenerateRequest, GenerateResult, InferenceServerException, input_arrays
from fluxserve.stacks import catalog_by_name
from perf import LatencySummary
from perf.rows import DIRECT_SUFFIX, Config, Row

MEASURE_OUTPUTS = ("IMAGE_PNG",)  # what a real client asks for; STEPS_COMPUTED and INFO always come back

Generate = Callable[[GenerateRequest, tuple], GenerateResult]


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
