"""Production hardening through the real tritonserver: overload, cancellation, out-of-memory, load faults,
the locked-down control API, graceful shutdown and health. Every test is bounded and talks to loopback."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import (
    FBCACHE_ALWAYS_SKIPS, OOM_PROMPT, QUEUE_OF_FOUR, ROOT, make_inputs, start_server,
)
from fluxserve.contract import admin_headers
from test_serving import infer, info_of, output

ADMIN_KEY = "test-admin-key"


def good_request_succeeds(server, model="bf16") -> bool:
    return output(infer(server, model, SEED=1, STEPS=1, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)


def test_burst_beyond_the_queue_is_rejected_fast_and_nothing_hangs(server):
    def one(seed):
        started = time.monotonic()
        try:
            infer(server, QUEUE_OF_FOUR, outputs=("STEPS_COMPUTED",), SEED=seed, STEPS=8, HEIGHT=128, WIDTH=128)
            return "ok", time.monotonic() - started, ""
        except InferenceServerException as exc:
            return str(exc.status()), time.monotonic() - started, exc.message()

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    rejected = [result for result in results if result[0] != "ok"]
    assert len(results) - len(rejected) >= 5  # one executing + four queued, at least
    assert rejected, "a burst of 50 against a queue of 4 must overflow"
    for status, seconds, message in rejected:
        assert status == "503" and "Exceeds maximum queue size" in message, (status, message)
        assert seconds < 10, f"overload error took {seconds:.1f} s"
    assert good_request_succeeds(server, QUEUE_OF_FOUR)


@pytest.mark.parametrize("how", ["cancel", "client timeout"])
def test_cancelled_request_stops_early_and_the_next_succeeds(server, how):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    done = queue.Queue()
    inputs = make_inputs(grpcclient, f"a long request ({how})", SEED=3, STEPS=100, HEIGHT=1024, WIDTH=1024)
    before = server.log().count("request cancelled by the client")
    if how == "cancel":
        call = client.async_infer("bf16", inputs, callback=lambda result, error: done.put(error))
        time.sleep(1.5)
        call.cancel()
    else:
        client.async_infer("bf16", inputs, callback=lambda result, error: done.put(error), client_timeout=1.5)
    error = done.get(timeout=60)
    assert error is not None and ("CANCELLED" in str(error.status()) or "DEADLINE" in str(error.status()))
    deadline = time.monotonic() + 60
    while server.log().count("request cancelled by the client") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    line = server.log().split("request cancelled by the client after ")[-1]
    computed, total = int(line.split(" of ")[0]), int(line.split(" of ")[1].split()[0])
    assert total == 100 and computed < 100
    assert good_request_succeeds(server)


def test_out_of_memory_fails_that_request_only(server):
    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(infer, server, "bf16", prompt=OOM_PROMPT, SEED=1, STEPS=4, HEIGHT=64, WIDTH=64)
        fine = pool.submit(infer, server, "bf16", SEED=2, STEPS=4, HEIGHT=64, WIDTH=64)
        with pytest.raises(InferenceServerException) as error:
            doomed.result(timeout=120)
        assert output(fine.result(timeout=120), "IMAGE").shape == (64, 64, 3)
    assert "out of memory" in error.value.message() and str(error.value.status()) == "503"
    assert "out of memory" in server.log()
    assert good_request_succeeds(server)


def test_metrics_count_computed_and_skipped_steps(server):
    def counters():
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("fluxserve_steps_") and f'model="{FBCACHE_ALWAYS_SKIPS.name}"' in line:
                values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        return values

    before = counters()
    result = infer(server, FBCACHE_ALWAYS_SKIPS.name, outputs=("INFO",), SEED=1, STEPS=5, HEIGHT=64, WIDTH=64)
    assert info_of(result)["steps_computed"] == 1
    after = counters()
    assert after["fluxserve_steps_computed_total"] - before.get("fluxserve_steps_computed_total", 0) == 1
    assert after["fluxserve_steps_skipped_total"] - before.get("fluxserve_steps_skipped_total", 0) == 4


def test_health_endpoints_and_triton_metrics(server):
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("bf16")
    assert not client.is_model_ready("bf16-fa2")  # in the repository, never loaded
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'nv_inference_request_success{model="bf16"' in text


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory, test_repository):
    server = start_server(tmp_path_factory.mktemp("locked"), ["bf16"], test_repository,
                          env_extra={"FLUXSERVE_ADMIN_KEY": ADMIN_KEY})
    yield server
    server.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_load_and_unload_need_the_admin_key(locked_server, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(locked_server.http_url if protocol == "http" else locked_server.grpc_url)
    try:  # an HTTP connection left open holds the server's shutdown for its whole exit timeout
        with pytest.raises(InferenceServerException) as error:
            client.load_model("bf16-fa2")
        assert "admin-key" in error.value.message() or "restricted" in error.value.message().lower()
        with pytest.raises(InferenceServerException):
            client.unload_model("bf16")
        assert client.is_model_ready("bf16") and not client.is_model_ready("bf16-fa2")
        headers = admin_headers(protocol, ADMIN_KEY)
        client.load_model("bf16-fa2", headers=headers)
        assert client.is_model_ready("bf16-fa2")
        client.unload_model("bf16-fa2", headers=headers)
        deadline = time.monotonic() + 30
        while client.is_model_ready("bf16-fa2") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not client.is_model_ready("bf16-fa2")
    finally:
        client.close()
    assert good_request_succeeds(locked_server)


def test_network_address_without_admin_key_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "fluxserve.serve", "--address", "0.0.0.0"], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "FLUXSERVE_WEIGHTS": "synthetic:tiny"},
    )
    assert result.returncode != 0 and "FLUXSERVE_ADMIN_KEY" in result.stderr


def test_model_processes_find_libpython_without_the_system_library_directory(tmp_path, monkeypatch):
    # Python's LIBDIR (/usr/lib/x86_64-linux-gnu on Debian and Ubuntu) on LD_LIBRARY_PATH would outrank the
    # RUNPATH through which torch finds its own cuDNN: the launcher links libpython alone into a directory.
    import sysconfig

    from fluxserve import serve

    monkeypatch.setattr(serve, "BACKEND_CACHE", tmp_path)
    install = serve.find_triton()
    if not install.library_path:
        pytest.skip("a system tritonserver brings its own libraries")
    paths = serve.server_environment(install, "synthetic:tiny", base={})["LD_LIBRARY_PATH"].split(":")
    assert sysconfig.get_config_var("LIBDIR") not in paths
    (linked,) = [path for path in paths if str(tmp_path) in path]
    (library,) = os.listdir(linked)
    assert library == sysconfig.get_config_var("INSTSONAME")
    assert os.path.samefile(os.path.join(linked, library), os.path.join(sysconfig.get_config_var("LIBDIR"), library))


def test_shutdown_during_a_request_completes_it(tmp_path, test_repository):
    server = start_server(tmp_path, ["bf16"], test_repository)
    try:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
        # Long enough to be mid-way when the signal comes (about 10 s on 2 CPU cores), short enough for the suite.
        inputs = make_inputs(httpclient, "finish me", SEED=1, STEPS=24, HEIGHT=512, WIDTH=512)
        pending = client.async_infer("bf16", inputs)
        time.sleep(1.5)
        server.process.send_signal(signal.SIGTERM)
        result = pending.get_result(timeout=120)
        client.close()  # Triton's HTTP front end waits for open connections before it stops the models
        info = json.loads(result.as_numpy("INFO")[0][0])
        assert info["steps_computed"] == 24 and info["latency_ms"] > 3000, info  # it was running at the signal
        assert server.process.wait(timeout=120) == 0
    finally:
        server.stop()


@pytest.mark.parametrize(
    "weights,words",
    [("/no/such/weights", ["/no/such/weights", "model_index.json"]), ("corrupt", ["cannot load FLUX weights"])],
)
def test_launcher_exits_nonzero_when_its_default_stack_cannot_load(tmp_path, weights, words):
    if weights == "corrupt":
        (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers",')
        weights = str(tmp_path)
    with pytest.raises(RuntimeError) as error:
        start_server(tmp_path, ["bf16"], env_extra={"FLUXSERVE_WEIGHTS": weights})
    for word in words:
        assert word in str(error.value)
