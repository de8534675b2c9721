"""A small library over tritonclient (HTTP or gRPC) for the fluxserve models.

The one place that builds a request from the contract (`fluxserve.contract`) and reads its outputs back;
the CLI (`python -m client`), the Locust users (`perf/locustfile.py`) and the sweep (`python -m perf.sweep`)
all go through `FluxClient`. Server errors surface as tritonclient's `InferenceServerException`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from fluxserve.contract import ADMIN_KEY_ENV, INPUTS, Limits, admin_headers

__all__ = ["FluxClient", "GenerateRequest", "GenerateResult", "InferenceServerException", "ModelState", "input_arrays"]

PROTOCOLS = {"http": httpclient, "grpc": grpcclient}
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
DEFAULT_OUTPUTS = ("IMAGE_PNG", "STEPS_COMPUTED", "INFO")
LIMITS = Limits()
# Loading a stack (weights, warm-up, compile) can take minutes: HTTP must not give up on it or on a queued
# request; gRPC waits without a deadline by default.
HTTP_NETWORK_TIMEOUT_S = 3600.0
UNLOAD_POLL_S = 0.2
STATISTICS_POLL_S = 0.05


@dataclass(frozen=True)
class GenerateRequest:
    """What a client asks for; defaults are the contract's. A `seed` of None lets the server pick one."""

    prompt: str
    seed: int | None = None
    steps: int = LIMITS.default_steps
    guidance: float = LIMITS.default_guidance
    height: int = LIMITS.default_size
    width: int = LIMITS.default_size

    def values(self) -> dict[str, object]:
        """Contract input name (the field's name in capitals) -> value, leaving out what the server defaults."""
        values = {f.name.upper(): getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in values.items() if value is not None}


@dataclass
class GenerateResult:
    """One response: the outputs asked for (None when not asked), telemetry, and the client's own latency."""

    steps_computed: int
    info: dict
    latency_s: float
    png: bytes | None = None
    image: np.ndarray | None = None


@dataclass(frozen=True)
class ModelState:
    name: str
    version: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Statistics:
    """Triton's cumulative statistics of one model: successful requests and their queue and compute time."""

    success: int = 0
    queue_ns: int = 0
    compute_ns: int = 0

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(self.success + other.success, self.queue_ns + other.queue_ns,
                          self.compute_ns + other.compute_ns)

    def __sub__(self, other: Statistics) -> Statistics:
        return Statistics(self.success - other.success, self.queue_ns - other.queue_ns,
                          self.compute_ns - other.compute_ns)


def wire_datatype(config_datatype: str) -> str:
    """A config.pbtxt data type (TYPE_STRING) -> its wire name (BYTES)."""
    name = config_datatype.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _as_array(value: object, datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
    return np.array([value], dtype=triton_to_np_dtype(datatype))


def input_arrays(request: GenerateRequest) -> dict[str, np.ndarray]:
    """The request as the contract's input arrays (shape [1]), as the model receives them."""
    arrays = {}
    for name, value in request.values().items():
        arrays[name] = _as_array(value, wire_datatype(INPUTS[name][0]))
    return arrays


@dataclass
class FluxClient:
    """A connection to one Triton server. Not thread-safe (tritonclient's HTTP client is not): one per thread."""

    url: str | None = None
    protocol: str = "http"
    admin_key: str | None = field(default_factory=lambda: os.environ.get(ADMIN_KEY_ENV) or None, repr=False)
    _batched: dict[str, bool] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        self.url = self.url or DEFAULT_URLS[self.protocol]
        self.module = PROTOCOLS[self.protocol]
        if self.protocol == "http":
            self.triton = httpclient.InferenceServerClient(self.url, network_timeout=HTTP_NETWORK_TIMEOUT_S)
        else:
            self.triton = grpcclient.InferenceServerClient(self.url)

    def close(self) -> None:
        """Close once. tritonclient's gRPC client closes its channel again when it is collected; under gevent
        (Locust) that second close unbalances grpc's count of gevent channels and hangs the process at exit."""
        self.triton.close()
        if self.protocol == "grpc":
            self.triton.close = lambda: None  # what its __del__ calls

    def _json(self, method: str, *args, **kwargs):
        """Call a tritonclient method; gRPC answers as JSON too (its int64 fields arrive as strings)."""
        if self.protocol == "grpc":
            kwargs["as_json"] = True
        return getattr(self.triton, method)(*args, **kwargs)

    def _admin_headers(self) -> dict[str, str] | None:
        return admin_headers(self.protocol, self.admin_key) if self.admin_key else None

    def server_version(self) -> str:
        return self._json("get_server_metadata")["version"]

    def models(self) -> list[ModelState]:
        """Every model of the repository with its state (READY, UNAVAILABLE, ...) and why."""
        index = self._json("get_model_repository_index", headers=self._admin_headers())
        entries = index.get("models", []) if isinstance(index, dict) else index
        return [ModelState(e["name"], e.get("version", ""), e.get("state", ""), e.get("reason", "")) for e in entries]

    def load(self, model: str) -> float:
        """Load (or reload) a model in explicit mode; returns the seconds it took (weights and warm-up)."""
        started = time.perf_counter()
        self.triton.load_model(model, headers=self._admin_headers())
        self._batched.pop(model, None)
        return time.perf_counter() - started

    def unload(self, model: str) -> None:
        """Unload a model and wait until it is gone, so its memory is free for the next one."""
        self.triton.unload_model(model, headers=self._admin_headers())
        self._batched.pop(model, None)
        while any(m.name == model and m.state in ("READY", "UNLOADING") for m in self.models()):
            time.sleep(UNLOAD_POLL_S)

    def batched(self, model: str) -> bool:
        """Whether the model's config batches (max_batch_size > 0): its tensors then carry a batch dim."""
        if model not in self._batched:
            config = self._json("get_model_config", model)
            config = config.get("config", config)
            self._batched[model] = int(config.get("max_batch_size", 0)) > 0
        return self._batched[model]

    def statistics(self, model: str) -> Statistics:
        """Triton's statistics for the model (all versions summed); compute = input + infer + output."""
        total = Statistics()
        for entry in self._json("get_inference_statistics", model).get("model_stats", []):
            stats = entry.get("inference_stats", {})

            def ns(key: str) -> int:
                return int(stats.get(key, {}).get("ns", 0))

            total += Statistics(
                success=int(stats.get("success", {}).get("count", 0)),
                queue_ns=ns("queue"),
                compute_ns=ns("compute_input") + ns("compute_infer") + ns("compute_output"),
            )
        return total

    def statistics_since(self, model: str, before: Statistics, count: int, timeout: float = 10.0) -> Statistics:
        """Statistics of the `count` requests since `before`. Triton counts a request just after it responds,
        so this waits (up to `timeout` seconds) until all of them are counted."""
        deadline = time.monotonic() + timeout
        while True:
            served = self.statistics(model) - before
            if served.success >= count or time.monotonic() > deadline:
                return served
            time.sleep(STATISTICS_POLL_S)

    def inputs(self, model: str, request: GenerateRequest) -> list:
        """The request as contract inputs, shaped for the model's config ([1], or [1, 1] when batched)."""
        shape = [1, 1] if self.batched(model) else [1]
        tensors = []
        for name, array in input_arrays(request).items():
            tensor = self.module.InferInput(name, shape, wire_datatype(INPUTS[name][0]))
            tensor.set_data_from_numpy(array.reshape(shape))
            tensors.append(tensor)
        return tensors

    def generate(self, model: str, request: GenerateRequest, outputs=DEFAULT_OUTPUTS) -> GenerateResult:
        """Send one request and read the outputs asked for (STEPS_COMPUTED and INFO always come back)."""
        wanted = {*outputs, "STEPS_COMPUTED", "INFO"}
        batched = self.batched(model)
        inputs = self.inputs(model, request)
        started = time.perf_counter()
        result = self.triton.infer(model, inputs, outputs=[self.module.InferRequestedOutput(n) for n in wanted])
        latency = time.perf_counter() - started

        def output(name: str):
            array = result.as_numpy(name)
            if array is None:
                return None
            return array[0] if batched else array

        def scalar(name: str):
            array = output(name)
            return None if array is None else array.reshape(-1)[0]

        return GenerateResult(
            steps_computed=int(scalar("STEPS_COMPUTED")),
            info=json.loads(scalar("INFO")),
            latency_s=latency,
            png=scalar("IMAGE_PNG"),
            image=output("IMAGE"),
        )
