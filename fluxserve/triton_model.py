"""The Triton Python-backend model every stack runs; its stack comes from `config.pbtxt` parameters.

Imported only inside Triton's Python backend stub (it needs `triton_python_backend_utils`)."""

from __future__ import annotations

import json
import traceback

import triton_python_backend_utils as pb_utils

from .contract import INPUTS, InvalidInput
from .serving import StackService, instance_device


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        device = instance_device(args["model_instance_kind"], int(args["model_instance_device_id"]))
        self.service = StackService(args["model_name"], parameters, device, notify=pb_utils.Logger.log_warn)

    def execute(self, requests: list) -> list:
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            inputs = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            outputs = self.service.infer(inputs, set(request.requested_output_names()), request.is_cancelled)
        except InvalidInput as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        except Exception as exc:  # the request fails; the model keeps serving
            pb_utils.Logger.log_error(f"{self.service.model_name}: {traceback.format_exc()}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()]
        )
