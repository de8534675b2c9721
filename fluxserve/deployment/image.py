"""The image every pod runs (build/Dockerfile), its launcher, and the launcher's ports and exit timeout."""

from __future__ import annotations

import inspect

from ..serve import server_command

# The image (build/Dockerfile): its CMD runs this launcher from this folder; a site's overlay sets the registry.
IMAGE = "fluxserve"
IMAGE_WORKDIR = "/opt/fluxserve"
LAUNCHER = ("python3", "-m", "fluxserve.serve")
# Triton's P50/P99 per model for the dashboard (nv_inference_request_summary_us), passed through to tritonserver.
# One model loads at a time: each load holds its bf16 weights before quantizing (45-49 GiB on the H200), and three
# loading at once on one GPU ran out of memory (perf/results/h200/s12-specialised-sizes); the startup probe sums
# the loads accordingly.
TRITON_FLAGS = ("--metrics-config=summary_latencies=true", "--model-load-thread-count=1")

# Ports: the launcher's defaults (fluxserve/serve.py), never restated here.
_LAUNCHER_DEFAULTS = inspect.signature(server_command).parameters
HTTP_PORT = _LAUNCHER_DEFAULTS["http_port"].default
GRPC_PORT = _LAUNCHER_DEFAULTS["grpc_port"].default
METRICS_PORT = _LAUNCHER_DEFAULTS["metrics_port"].default
EXIT_TIMEOUT_S = _LAUNCHER_DEFAULTS["exit_timeout_s"].default
