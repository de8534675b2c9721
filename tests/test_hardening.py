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
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import (
    FBCACHE_ALWAYS_SKIPS, OOM_PROMPT, QUEUE_OF_FOUR, ROOT, ServerExited, make_inputs, start_server,
)
from fluxserve.contract import admin_headers
from test_serving import infer, info_of, output

ADMIN_KEY = "test-admin-key"


# A request that keeps an instance busy until the test cancels it: 100 steps at 1024x1024 take about two minutes on
# 2 CPU cores (one step a second), against the seconds a test holds it. Its cancellation line, with computed < 100,
# proves that it was generating from its start line until the cancel: on a machine so fast that it ends first,
# the tests fail, they do not pass untested.
LONG = dict(SEED=3, STEPS=100, HEIGHT=1024, WIDTH=1024)
# Bounds on a server that stops answering, not on a slow one: each awaited fact normally holds within seconds.
FACT_TIMEOUT_S = 180
# The feature: a full queue refuses at once (milliseconds here) instead of holding the client. A request let in
# would wait behind the occupying request, which runs until cancelled; 10 s holds on a machine 3x slower.
OVERLOAD_ERROR_S = 10
CANCELLED = "request cancelled by the client after "  # the model's log line (StackService._generate)


def good_request_succeeds(server, model="bf16") -> bool:
    return output(infer(server, model, SEED=1, STEPS=1, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)


def wait_for(condition, what: str, timeout_s: float = FACT_TIMEOUT_S) -> None:
    """Wait until `condition()` holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


def unique_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def started(server, request_id: str):
    """The model's log line as it starts generating request `request_id` (StackService.infer)."""
    return lambda: f"request {request_id} started:" in server.log()


def cancellations_since(server, before: int, request_id: str) -> list[tuple[int, int]]:
    """(computed, total) of each cancellation of request `request_id` logged after the log's first `before` ones."""
    found = []
    for text in server.log().split(CANCELLED)[1 + before:]:
        line = text.splitlines()[0]  # '3 of 100 steps computed (request ID)"'
        if f"(request {request_id})" in line:
            found.append((int(line.split(" of ")[0]), int(line.split(" of ")[1].split()[0])))
    return found


def pending_requests(server, model: str) -> float:
    """Triton's gauge of the requests waiting in `model`'s queue (not the one executing)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=FACT_TIMEOUT_S).read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no nv_inference_pending_request_count for {model}")


def test_burst_beyond_the_queue_is_rejected_fast_and_nothing_hangs(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    occupying_done, queued_done = queue.Queue(), queue.Queue()
    occupying_id = unique_id("occupying")
    before = server.log().count(CANCELLED)
    # The model's one instance runs the long request; it never finishes (the test cancels it).
    occupying = client.async_infer(QUEUE_OF_FOUR, make_inputs(grpcclient, "occupy the instance", **LONG),
                                   callback=lambda result, error: occupying_done.put(error), request_id=occupying_id)
    try:
        wait_for(started(server, occupying_id), "the occupying request to start generating")
        # Fill the queue of 4, and see Triton hold all four.
        queued = [client.async_infer(QUEUE_OF_FOUR, make_inputs(grpcclient, "queued", SEED=seed, STEPS=1, HEIGHT=64,
                                                                WIDTH=64),
                                     callback=lambda result, error: queued_done.put((result, error)))
                  for seed in range(4)]
        wait_for(lambda: pending_requests(server, QUEUE_OF_FOUR) == 4, "Triton to hold four requests in the queue")

        def beyond(seed):
            started_at = time.monotonic()
            try:
                infer(server, QUEUE_OF_FOUR, outputs=("STEPS_COMPUTED",), SEED=seed, STEPS=1, HEIGHT=64, WIDTH=64)
                return "ok", time.monotonic() - started_at, ""
            except InferenceServerException as exc:
                return str(exc.status()), time.monotonic() - started_at, exc.message()
            except Exception as exc:  # noqa: BLE001  (held, not refused: the client's timeout)
                return type(exc).__name__, time.monotonic() - started_at, str(exc)

        with ThreadPoolExecutor(8) as pool:  # a burst of 8 beyond the full queue: every one is refused
            rejected = list(pool.map(beyond, range(100, 108)))
        for status, seconds, message in rejected:
            assert status == "503" and "Exceeds maximum queue size" in message, (status, message)
            assert seconds < OVERLOAD_ERROR_S, f"overload error took {seconds:.1f} s"
        assert pending_requests(server, QUEUE_OF_FOUR) == 4 and occupying_done.empty()
    finally:
        occupying.cancel()  # nothing hangs: the instance comes free and the queued four complete
    assert "CANCELLED" in str(occupying_done.get(timeout=FACT_TIMEOUT_S).status())
    wait_for(lambda: cancellations_since(server, before, occupying_id), "the server to stop the occupying request")
    (computed, total), = cancellations_since(server, before, occupying_id)
    assert total == 100 and computed < total  # it was generating all along
    for _ in queued:
        result, error = queued_done.get(timeout=FACT_TIMEOUT_S)
        assert error is None and result.as_numpy("STEPS_COMPUTED")[0][0] == 1, error
    client.close()
    assert good_request_succeeds(server, QUEUE_OF_FOUR)


# The client's deadline: long past the request's start (milliseconds after it is sent to an idle instance), far
# short of its end (minutes).
CLIENT_TIMEOUT_S = 5


@pytest.mark.parametrize("how", ["cancel", "client timeout"])
def test_cancelled_request_stops_early_and_the_next_succeeds(server, how):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    done = queue.Queue()
    request_id = unique_id(how.replace(" ", "-"))
    inputs = make_inputs(grpcclient, f"a long request ({how})", **LONG)
    before = server.log().count(CANCELLED)
    if how == "cancel":
        call = client.async_infer("bf16", inputs, callback=lambda result, error: done.put(error), request_id=request_id)
        wait_for(started(server, request_id), "the request to start generating")
        call.cancel()
        expected = "CANCELLED"
    else:
        client.async_infer("bf16", inputs, callback=lambda result, error: done.put(error), request_id=request_id,
                           client_timeout=CLIENT_TIMEOUT_S)
        expected = "DEADLINE_EXCEEDED"
    error = done.get(timeout=FACT_TIMEOUT_S)
    assert error is not None and expected in str(error.status()), error
    assert started(server, request_id)(), "the request never started generating"
    wait_for(lambda: cancellations_since(server, before, request_id), "the server to log the cancellation")
    (computed, total), = cancellations_since(server, before, request_id)
    assert total == 100 and computed < total, (computed, total)
    client.close()
    assert good_request_succeeds(server)


def test_out_of_memory_fails_that_request_only(server):
    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(infer, server, "bf16", prompt=OOM_PROMPT, SEED=1, STEPS=4, HEIGHT=64, WIDTH=64)
        fine = pool.submit(infer, server, "bf16", SEED=2, STEPS=4, HEIGHT=64, WIDTH=64)
        with pytest.raises(InferenceServerException) as error:
            doomed.result(timeout=FACT_TIMEOUT_S)
        assert output(fine.result(timeout=FACT_TIMEOUT_S), "IMAGE").shape == (64, 64, 3)
    assert "out of memory" in error.value.message() and str(error.value.status()) == "503"
    # the model's log line travels from the stub to the server's log on its own, after the response
    wait_for(lambda: "out of memory" in server.log(), "the server to log the out-of-memory")
    assert good_request_succeeds(server)


def test_metrics_count_computed_and_skipped_steps(server):
    def counters():
        text = urllib.request.urlopen(server.metrics_url, timeout=FACT_TIMEOUT_S).read().decode()
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
    text = urllib.request.urlopen(server.metrics_url, timeout=FACT_TIMEOUT_S).read().decode()
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
        wait_for(lambda: not client.is_model_ready("bf16-fa2"), "bf16-fa2 to unload")
    finally:
        client.close()
    assert good_request_succeeds(locked_server)


def test_network_address_without_admin_key_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "fluxserve.serve", "--address", "0.0.0.0"], cwd=ROOT, capture_output=True,
        text=True, timeout=FACT_TIMEOUT_S, env={"PATH": "/usr/bin:/bin", "FLUXSERVE_WEIGHTS": "synthetic:tiny"},
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
    request_id = unique_id("finish-me")

    def generate():  # in a thread of its own: the HTTP client's greenlets then run while this test waits
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=FACT_TIMEOUT_S)
        try:
            inputs = make_inputs(httpclient, "finish me", SEED=1, STEPS=24, HEIGHT=512, WIDTH=512)
            return client.infer("bf16", inputs, request_id=request_id)
        finally:
            client.close()  # Triton's HTTP front end waits for open connections before it stops the models

    try:
        with ThreadPoolExecutor(1) as pool:
            sent = time.monotonic()
            pending = pool.submit(generate)
            wait_for(started(server, request_id), "the request to start generating")
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            info = info_of(pending.result(timeout=FACT_TIMEOUT_S))
        assert info["steps_computed"] == 24 and not info["cancelled"], info
        # Running when the signal came: it started generating before (its log line) and, started no earlier than it
        # was sent, generated for longer than the time from sending to the signal.
        assert info["latency_ms"] / 1000 > signalled - sent, (info["latency_ms"], signalled - sent)
        assert server.process.wait(timeout=FACT_TIMEOUT_S) == 0
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
    with pytest.raises(ServerExited) as exited:  # not a RuntimeError for a server still unready at the deadline
        start_server(tmp_path, ["bf16"], env_extra={"FLUXSERVE_WEIGHTS": weights})
    assert exited.value.returncode != 0, exited.value.log[-3000:]
    for word in words:
        assert word in exited.value.log
