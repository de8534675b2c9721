"""The Triton Python-backend model every stack runs; its stack comes from `config.pbtxt` parameters.

Imported only inside Triton's Python backend stub (it needs `triton_python_backend_utils`)."""

from __future__ import annotations

import json
import locale
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from .contract import INPUTS, InvalidInput
from .parallel import WorkerFault
from .server.serving import OutOfMemory, RequestCancelled, StackService, instance_devices

REQUEST_ERRORS = (InvalidInput, RequestCancelled, OutOfMemory, WorkerFault)


def error_code(exc: Exception):
    """Triton's error code for a request error (pb_utils' codes exist only once the stub is running)."""
    return {
        InvalidInput: pb_utils.TritonError.INVALID_ARG,
        RequestCancelled: pb_utils.TritonError.CANCELLED,
        OutOfMemory: pb_utils.TritonError.UNAVAILABLE,
        WorkerFault: pb_utils.TritonError.UNAVAILABLE,
    }[type(exc)]


def model_counters(model_name: str, counters: dict[str, str]) -> tuple[list, list]:
    """Prometheus counters on Triton's metrics endpoint (name -> description), one metric each for the model: the
    families, which must outlive their metrics (Triton deletes a family's metrics with it), and the metrics."""
    families = [pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
                for name, description in counters.items()]
    return families, [family.Metric(labels={"model": model_name}) for family in families]


class StepMetrics:
    """Denoising steps computed and skipped per model."""

    def __init__(self, model_name: str) -> None:
        self.families, (self.computed, self.skipped) = model_counters(model_name, {
            "fluxserve_steps_computed_total": "Transformer steps really computed (cache-skipped excluded)",
            "fluxserve_steps_skipped_total": "Transformer steps a step cache skipped (reused, not computed)",
        })

    def observe(self, request, generation) -> None:
        self.computed.increment(generation.steps_computed)
        self.skipped.increment(generation.steps_run - generation.steps_computed)


class PromptCacheMetrics:
    """The prompt cache per model: prompts it served and prompts the text encoders encoded (both stay at zero while
    the cache is off)."""

    def __init__(self, model_name: str) -> None:
        self.families, (self.hits, self.misses) = model_counters(model_name, {
            "fluxserve_prompt_cache_hits_total": "Requests whose prompt embeddings the prompt cache served",
            "fluxserve_prompt_cache_misses_total": "Requests whose prompt the text encoders encoded (cache on)",
        })

    def observe(self, request, generation) -> None:
        if generation.prompt_cache is not None:
            (self.hits if generation.prompt_cache["hit"] else self.misses).increment(1)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # The stub embeds Python without taking the locale from the environment, so files opened as text are
        # ASCII, and torch.compile's Inductor fails on its UTF-8 kernel templates. Do what `python` does.
        locale.setlocale(locale.LC_CTYPE, "")
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        devices = instance_devices(args["model_instance_kind"], int(args["model_instance_device_id"]), parameters)
        self.metrics = (StepMetrics(args["model_name"]), PromptCacheMetrics(args["model_name"]))
        self.service = StackService(
            args["model_name"], parameters, devices, notify=pb_utils.Logger.log_warn, observe=self._observe,
            trace=pb_utils.Logger.log_info,
        )

    def _observe(self, request, generation) -> None:
        for metrics in self.metrics:
            metrics.observe(request, generation)

    def finalize(self) -> None:
        if hasattr(self, "service"):  # not when initialize failed
            self.service.close()

    def execute(self, requests: list) -> list:
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            inputs = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            outputs = self.service.infer(inputs, set(request.requested_output_names()), request.is_cancelled,
                                         request.request_id())
        except REQUEST_ERRORS as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), error_code(exc)))
        except Exception as exc:  # the request fails; the model keeps serving
            pb_utils.Logger.log_error(f"{self.service.model_name}: {traceback.format_exc()}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))
        # max_batch_size 1: every output carries a leading batch dimension of one.
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, array[np.newaxis]) for name, array in outputs.items()]
        )
