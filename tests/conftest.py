"""Fixtures: the real tritonserver (through the project's launcher) serving synthetic:tiny on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxserve.repository import MODEL_PY, QueuePolicy, config_pbtxt  # noqa: E402
from fluxserve.stacks import Stack  # noqa: E402

# Models the tests load besides catalog ones: FBCache and TeaCache at the extremes of their thresholds.
FBCACHE_NEVER_SKIPS = Stack(cache="fbcache", cache_threshold=0.0)
FBCACHE_ALWAYS_SKIPS = Stack(cache="fbcache", cache_threshold=1e6)
TEACACHE_NEVER_SKIPS = Stack(cache="teacache", cache_threshold=0.0)
TEACACHE_ALWAYS_SKIPS = Stack(cache="teacache", cache_threshold=1e6)
TEST_STACKS = (FBCACHE_NEVER_SKIPS, FBCACHE_ALWAYS_SKIPS, TEACACHE_NEVER_SKIPS, TEACACHE_ALWAYS_SKIPS)
# A bound on a server that never gets ready, not on a slow one: a session server loads eight stacks (about a
# minute on 2 CPU cores), a compiled stack's server took up to 190 s on 2 busy cores, and one that fails exits at
# once (start_server sees it). 3x slower still fits, and under pytest.ini's per-test timeout a server that never
# gets ready fails with its log rather than pytest-timeout's stack dump.
SERVER_START_TIMEOUT_S = 600
WARMUP_SIZE = "64"  # the servers' warm-up generation, square (the default, 1024, takes a minute and a half on 2 cores)
COMPILED_STACK = "bf16-fusedqkv-compile-regional"  # compiles at load, inside the backend's stub
QUEUE_OF_FOUR = "bf16-queue4"  # the bf16 stack behind a queue of 4, for the overload test
OOM_PROMPT = "__inject_out_of_memory__"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class ServerExited(RuntimeError):
    """The launcher (or the tritonserver it became) exited before the server was ready."""

    def __init__(self, returncode: int, log: str) -> None:
        super().__init__(f"tritonserver exited with {returncode}:\n{log[-5000:]}")
        self.returncode = returncode
        self.log = log


def start_server(tmp: Path, models: list[str], repository: Path | None = None, extra_args=(), env_extra=None,
                 cwd: Path = ROOT) -> Server:
    """Start the launcher (`python -m fluxserve.serve`) on free ports and wait until it is ready. Raises
    ServerExited when it exits first, RuntimeError when it is still unready after SERVER_START_TIMEOUT_S."""
    import tritonclient.http as httpclient

    ports = [free_port() for _ in range(3)]
    log_path = tmp / f"tritonserver-{ports[0]}.log"
    command = [
        sys.executable, "-m", "fluxserve.serve", "--models", ",".join(models), "--http-port", str(ports[0]),
        "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--warmup-size", WARMUP_SIZE,
    ]
    if repository is not None:
        command += ["--repository", str(repository)]
    command += list(extra_args)
    env = {**os.environ, "FLUXSERVE_WEIGHTS": "synthetic:tiny", **(env_extra or {})}
    if cwd != ROOT:  # the launcher itself still runs from this checkout
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, *ports, log_path)
    client = httpclient.InferenceServerClient(server.http_url)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerExited(process.returncode, server.log())
        try:
            if client.is_server_ready():
                client.close()
                return server
        except Exception:
            pass
        time.sleep(0.5)
    client.close()
    server.stop()
    raise RuntimeError(f"tritonserver not ready after {SERVER_START_TIMEOUT_S} s:\n{server.log()[-5000:]}")


@pytest.fixture(scope="session")
def test_repository(tmp_path_factory) -> Path:
    """The committed model repository plus the test-only stacks."""
    repository = tmp_path_factory.mktemp("repo") / "model_repository"
    shutil.copytree(ROOT / "model_repository", repository)
    for stack in TEST_STACKS:
        (repository / stack.name / "1").mkdir(parents=True)
        (repository / stack.name / "config.pbtxt").write_text(config_pbtxt(stack))
        (repository / stack.name / "1" / "model.py").write_text(MODEL_PY)
    queued = repository / QUEUE_OF_FOUR
    (queued / "1").mkdir(parents=True)
    config = config_pbtxt(Stack(), queue=QueuePolicy(max_queue_size=4))
    (queued / "config.pbtxt").write_text(config.replace('name: "bf16"', f'name: "{QUEUE_OF_FOUR}"'))
    (queued / "1" / "model.py").write_text(MODEL_PY)
    return repository


@pytest.fixture(scope="session")
def server(tmp_path_factory, test_repository):
    """One server for the whole session (per test worker) with the baseline, catalog stacks and step caches at their
    extremes; the compiled stack is loaded by its test."""
    models = ["bf16", "bf16-fa2-fbcache-0.3-int8", "fp16", QUEUE_OF_FOUR, *(stack.name for stack in TEST_STACKS)]
    server = start_server(tmp_path_factory.mktemp("server"), models, repository=test_repository,
                          env_extra={"FLUXSERVE_INJECT_OOM_PROMPT": OOM_PROMPT})
    yield server
    server.stop()


def make_inputs(module, prompt="a red fox in snow", **fields):
    """Contract inputs for tritonclient `module` (tritonclient.http or .grpc), batch of one; fields are
    SEED=..., etc."""
    types = {"SEED": ("INT64", np.int64), "STEPS": ("INT32", np.int32), "HEIGHT": ("INT32", np.int32),
             "WIDTH": ("INT32", np.int32), "GUIDANCE": ("FP32", np.float32)}
    inputs = []
    if prompt is not None:
        tensor = module.InferInput("PROMPT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[prompt.encode() if isinstance(prompt, str) else prompt]], dtype=np.object_))
        inputs.append(tensor)
    for name, value in fields.items():
        datatype, dtype = types[name]
        tensor = module.InferInput(name, [1, 1], datatype)
        tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
        inputs.append(tensor)
    return inputs


def unit_scale_pipeline():
    """synthetic:tiny with each of the transformer's linears at 1/sqrt(fan_in): the synthetic 0.02 leaves the tiny
    blocks' contributions below bf16's resolution of the residual stream, so no block change would show (in a
    served 96x128 image, zeroing one single block's output moves the PSNR from inf to about 31 dB here)."""
    import torch

    from fluxserve.pipeline import build_pipeline
    from fluxserve.weights import parse_source

    pipe = build_pipeline(Stack(), parse_source("synthetic:tiny"), torch.device("cpu")).pipe
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in pipe.transformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5, generator=generator)
    return pipe


def unit_scale_flux_transformer():
    """The unit-scale pipeline's transformer alone (see unit_scale_pipeline)."""
    return unit_scale_pipeline().transformer


@pytest.fixture(scope="session")
def unit_scale_weights(tmp_path_factory) -> Path:
    """The unit-scale pipeline saved as a diffusers-format folder, for servers whose images must show every block
    (`FLUXSERVE_WEIGHTS` or `--weights`: the real folder loader reads it)."""
    folder = tmp_path_factory.mktemp("unit-scale") / "FLUX-tiny-unit-scale"
    unit_scale_pipeline().save_pretrained(folder)
    return folder


def flux_transformer_inputs(transformer) -> dict:
    """One step's inputs for a tiny FLUX transformer: 16 image and 8 text tokens, bf16."""
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn((1, 16, transformer.config.in_channels), generator=generator),
                  encoder_hidden_states=torch.randn((1, 8, transformer.config.joint_attention_dim), generator=generator),
                  pooled_projections=torch.randn((1, transformer.config.pooled_projection_dim), generator=generator),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=torch.randn((16, 3), generator=generator), txt_ids=torch.zeros((8, 3)), return_dict=False)
    return {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
