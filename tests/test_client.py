"""The client CLI and library against the real tritonserver (synthetic:tiny on CPU), over HTTP and gRPC."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from client import ADMIN_KEY_ENV, DEFAULT_OUTPUTS, FluxClient, GenerateRequest
from conftest import ROOT, start_server
from fluxserve.contract import INPUTS, OUTPUTS

# A bound on a CLI that hangs, not on a slow one: the longest run, --load, loads a stack (about 10 s on 2 CPU
# cores, half a minute while other tests load theirs beside it).
CLI_TIMEOUT_S = 240
SMALL = ["--steps", "2", "--height", "64", "--width", "80"]
ADMIN_KEY = "test-admin-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server whose model-repository API (list, load, unload) needs the admin key."""
    server = start_server(tmp_path_factory.mktemp("client-server"), ["bf16"], env_extra={ADMIN_KEY_ENV: ADMIN_KEY})
    yield server
    server.stop()


def url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def cli(*args: str, admin_key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != ADMIN_KEY_ENV}
    if admin_key:
        env[ADMIN_KEY_ENV] = admin_key
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)


def cli_on(server, protocol: str, *args: str, admin_key: str | None = ADMIN_KEY) -> subprocess.CompletedProcess:
    return cli("--protocol", protocol, "--url", url(server, protocol), *args, admin_key=admin_key)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_writes_a_png_and_prints_the_telemetry(server, tmp_path, protocol):
    output = tmp_path / f"{protocol}.png"
    done = cli_on(server, protocol, "--model", "bf16", "--prompt", "a red fox", "--seed", "3", *SMALL,
                  "-o", str(output))
    assert done.returncode == 0, done.stderr
    image = Image.open(output)
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (80, 64)
    assert "steps computed: 2 of 2" in done.stdout
    assert "attention kernel: aten::" in done.stdout
    assert "latency:" in done.stdout and "seed 3" in done.stdout


def test_same_seed_gives_the_same_png_over_http_and_grpc(server, tmp_path):
    pngs = []
    for protocol in ("http", "grpc"):
        output = tmp_path / f"{protocol}.png"
        done = cli_on(server, protocol, "--model", "bf16", "--prompt", "a lighthouse", "--seed", "9", *SMALL,
                      "-o", str(output))
        assert done.returncode == 0, done.stderr
        pngs.append(output.read_bytes())
    assert pngs[0] == pngs[1]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "bf16", "--prompt", "ok", "--steps", "0"], "STEPS must be in [1, 100], got 0"),
        (["--model", "bf16", "--prompt", "ok", "--height", "72"], "a multiple of 16, got 72"),
        (["--model", "no-such-stack", "--prompt", "ok"], "no-such-stack"),
    ],
    ids=["steps", "height", "unknown model"],
)
def test_cli_shows_the_server_message_for_a_bad_request(server, tmp_path, protocol, args, message):
    done = cli_on(server, protocol, *args, "-o", str(tmp_path / "never.png"))
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "never.png").exists()


def test_cli_reports_an_unreachable_server_without_a_traceback(server):
    done = cli("--url", "127.0.0.1:9", "--list")
    assert done.returncode == 1 and "cannot reach the server at 127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [[], ["--prompt", "no model"], ["--list", "--load", "bf16"]])
def test_cli_usage_errors_exit_2(args):
    assert cli(*args).returncode == 2


def test_cli_loads_lists_and_unloads_a_stack_over_either_protocol(server):
    def state_of(model: str, protocol: str) -> str:
        listing = cli_on(server, protocol, "--list")
        assert listing.returncode == 0, listing.stderr
        return next(line.split(maxsplit=2)[2] for line in listing.stdout.splitlines() if line.split()[0] == model)

    assert state_of("bf16", "grpc") == "READY" and state_of("fp16", "http") == "NOT LOADED"
    loaded = cli_on(server, "http", "--load", "fp16")
    assert loaded.returncode == 0 and "loaded fp16 in" in loaded.stdout, loaded.stderr
    assert state_of("fp16", "grpc") == "READY"
    unloaded = cli_on(server, "grpc", "--unload", "fp16")
    assert unloaded.returncode == 0 and "unloaded fp16" in unloaded.stdout, unloaded.stderr
    assert state_of("fp16", "http") == "UNAVAILABLE  (unloaded)"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("admin_key", [None, "wrong-key"])
def test_model_control_needs_the_admin_key(server, protocol, admin_key):
    for args in (["--list"], ["--load", "fp16"], ["--unload", "bf16"]):
        done = cli_on(server, protocol, *args, admin_key=admin_key)
        assert done.returncode == 1 and "is restricted, expecting header" in done.stderr, done.stderr
    generated = cli_on(server, protocol, "--model", "bf16", "--prompt", "x", *SMALL, "-o", os.devnull,
                       admin_key=admin_key)
    assert generated.returncode == 0, generated.stderr  # inference stays open


def test_cli_load_failure_shows_the_reason(server):
    done = cli("--url", server.http_url, "--load", "bf16-fp8")
    assert done.returncode == 1 and "compute capability 8.9" in done.stderr


def settled_statistics(client: FluxClient, model: str):
    """Triton counts a request just after responding: wait until earlier tests' requests are all counted. Nothing
    marks the last count (the statistics have no in-flight figure), so this waits for two reads half a second apart
    to agree: the gap it covers is the server thread's, from sending a response to counting it (microseconds), and
    the earlier tests' clients have exited by then; half a second stays far above it on a machine 3x slower."""
    previous, current = None, client.statistics(model)
    while current != previous:
        time.sleep(0.5)
        previous, current = current, client.statistics(model)
    return current


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_library_reads_image_telemetry_and_statistics(server, protocol):
    client = FluxClient(url(server, protocol), protocol)
    started = time.perf_counter()
    before = settled_statistics(client, "bf16")
    request = GenerateRequest("a bowl of ramen", seed=5, steps=2, height=64, width=64)
    result = client.generate("bf16", request, outputs=("IMAGE", "IMAGE_PNG"))
    assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.png))), result.image)
    assert result.steps_computed == result.info["steps_computed"] == 2 and result.info["seed"] == 5
    assert result.latency_s >= result.info["latency_ms"] / 1000 > 0
    served = client.statistics_since("bf16", before, 1)
    between_reads_s = time.perf_counter() - started
    # The handler runs inside Triton's compute, and the request was computed between the two reads of the
    # statistics (not bounded by the client's latency: Triton counts output time after the response is sent).
    assert served.success == 1, served
    assert result.info["latency_ms"] / 1000 <= served.compute_ns / 1e9 <= between_reads_s, (served, between_reads_s)
    client.close()


@pytest.mark.parametrize("batched,shape", [(False, [1]), (True, [1, 1])])
def test_input_shapes_follow_the_model_config(batched, shape):
    client = FluxClient("127.0.0.1:9", "http")  # no request is sent
    client._batched["bf16"] = batched
    tensors = client.inputs("bf16", GenerateRequest("x", seed=1))
    assert {tensor.name(): tensor.shape() for tensor in tensors} == {name: shape for name in INPUTS}
    assert "SEED" not in {tensor.name() for tensor in client.inputs("bf16", GenerateRequest("x"))}


def test_request_fields_are_the_contract_inputs():
    assert {name.upper() for name in GenerateRequest.__dataclass_fields__} == set(INPUTS)
    assert set(DEFAULT_OUTPUTS) <= set(OUTPUTS)
