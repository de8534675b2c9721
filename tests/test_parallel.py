"""Context-parallel stacks through the real tritonserver: one instance, two worker processes joined by gloo on the
CPU (synthetic:tiny), each running diffusers' Ulysses attention over its half of the image's tokens."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import MODEL_PY, OOM_PROMPT, ROOT, config_pbtxt, make_inputs, start_server
from fluxserve.stacks import Stack, catalog_by_name
from test_serving import infer, info_of, output

CP2 = "bf16-cp2"
TAYLORSEER_CP2 = "bf16-taylorseer-interval5-cp2"
QUICK_HANG = "bf16-cp2-hang5"  # bf16-cp2 declaring its workers hung after 5 s without a step
PROGRESS_TIMEOUT_S = 5


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    error = np.mean((image.astype(float) - reference.astype(float)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255**2 / error)


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def parent_command(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        parent = stat.read().rsplit(")", 1)[1].split()[1]
    with open(f"/proc/{parent}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode()


@pytest.fixture(scope="module")
def parallel_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("parallel") / "model_repository"
    shutil.copytree(ROOT / "model_repository", repository)
    hang = repository / QUICK_HANG
    (hang / "1").mkdir(parents=True)
    config = config_pbtxt(catalog_by_name()[CP2]).replace(f'name: "{CP2}"', f'name: "{QUICK_HANG}"')
    config += f'parameters {{ key: "parallel_progress_timeout_s" value: {{ string_value: "{PROGRESS_TIMEOUT_S}" }} }}\n'
    (hang / "config.pbtxt").write_text(config)
    (hang / "1" / "model.py").write_text(MODEL_PY)
    server = start_server(tmp_path_factory.mktemp("parallel-server"), ["bf16", CP2, QUICK_HANG], repository,
                          env_extra={"FLUXSERVE_INJECT_OOM_PROMPT": OOM_PROMPT})
    yield server
    server.stop()


def worker_pids(server, model: str) -> list[int]:
    return info_of(infer(server, model, outputs=("INFO",), SEED=1, STEPS=1, HEIGHT=64, WIDTH=64))["parallel"]["worker_pids"]


def test_two_workers_serve_an_image_close_to_the_one_process_image(parallel_server):
    single = infer(parallel_server, "bf16", SEED=21, STEPS=6, HEIGHT=96, WIDTH=128)
    split = infer(parallel_server, CP2, SEED=21, STEPS=6, HEIGHT=96, WIDTH=128)
    info = info_of(split)
    assert info["stack"] == CP2 and info["steps_computed"] == 6 and output(split, "IMAGE").shape == (96, 128, 3)
    parallel = info["parallel"]
    assert parallel["mode"] == "ulysses" and parallel["world_size"] == 2 and parallel["devices"] == ["cpu", "cpu"]
    assert "Ulysses" in info["attention_kernel"]  # diffusers' context-parallel attention ran
    pids = parallel["worker_pids"]
    assert len(set(pids)) == 2 and all(alive(pid) for pid in pids)
    assert all("triton_python_backend_stub" in parent_command(pid) for pid in pids)  # the instance's own workers
    assert info_of(single)["parallel"] == {"mode": "none", "world_size": 1, "devices": ["cpu"]}
    # Not bit-exact: after the all-to-all each rank sees the keys in another order (its token shards interleaved
    # with text), so the softmax sums round differently; the workers also run with fewer threads.
    assert psnr(output(split, "IMAGE"), output(single, "IMAGE")) >= 40


def test_a_step_cache_decides_the_same_on_every_worker(parallel_server):
    client = httpclient.InferenceServerClient(parallel_server.http_url)
    single_name = Stack(cache="taylorseer", cache_interval=5).name
    for model in (single_name, TAYLORSEER_CP2):
        client.load_model(model)
    try:
        single = infer(parallel_server, single_name, SEED=4, STEPS=12, HEIGHT=64, WIDTH=64)
        split = infer(parallel_server, TAYLORSEER_CP2, SEED=4, STEPS=12, HEIGHT=64, WIDTH=64)
    finally:
        for model in (single_name, TAYLORSEER_CP2):
            client.unload_model(model)
        client.close()
    assert output(split, "STEPS_COMPUTED")[0] == output(single, "STEPS_COMPUTED")[0] < 12
    assert psnr(output(split, "IMAGE"), output(single, "IMAGE")) >= 40


def test_a_size_that_does_not_split_is_refused_before_the_workers(parallel_server):
    pids = worker_pids(parallel_server, CP2)
    with pytest.raises(InferenceServerException) as error:
        infer(parallel_server, CP2, SEED=1, STEPS=1, HEIGHT=80, WIDTH=112)
    assert str(error.value.status()) == "400"
    for words in ("HEIGHT x WIDTH", "divisible by 2", "80x112", "35 tokens"):
        assert words in error.value.message()
    assert worker_pids(parallel_server, CP2) == pids  # the same workers serve on


def test_cancellation_stops_every_worker_within_a_step(parallel_server):
    client = grpcclient.InferenceServerClient(parallel_server.grpc_url)
    done = queue.Queue()
    before = parallel_server.log().count(f"{CP2}: request cancelled by the client")
    inputs = make_inputs(grpcclient, "a long split request", SEED=3, STEPS=100, HEIGHT=1024, WIDTH=1024)
    call = client.async_infer(CP2, inputs, callback=lambda result, error: done.put(error))
    time.sleep(2.0)
    call.cancel()
    error = done.get(timeout=60)
    client.close()
    assert error is not None and "CANCELLED" in str(error.status())
    assert wait_until(lambda: parallel_server.log().count(f"{CP2}: request cancelled by the client") > before, 60)
    line = parallel_server.log().split(f"{CP2}: request cancelled by the client after ")[-1]
    assert int(line.split(" of ")[0]) < 100
    assert output(infer(parallel_server, CP2, SEED=1, STEPS=2, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)


def test_out_of_memory_on_the_workers_fails_that_request_only(parallel_server):
    with pytest.raises(InferenceServerException) as error:
        infer(parallel_server, CP2, prompt=OOM_PROMPT, SEED=1, STEPS=4, HEIGHT=64, WIDTH=64)
    assert str(error.value.status()) == "503" and "out of memory" in error.value.message()
    assert output(infer(parallel_server, CP2, SEED=1, STEPS=2, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)


def fault_then_recovery(server, model: str, fault, words: list[str], bound_s: float) -> None:
    """Start a long request, inject `fault(pids)`, and check: the request fails with UNAVAILABLE and `words`
    within `bound_s`, the other models serve meanwhile, no old worker survives, and the model serves again."""
    pids = worker_pids(server, model)
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=300)
    pending = client.async_infer(model, make_inputs(httpclient, "doomed", SEED=1, STEPS=100, HEIGHT=1024, WIDTH=1024))
    time.sleep(2.0)
    injected = time.monotonic()
    fault(pids)
    with pytest.raises(InferenceServerException) as error:
        pending.get_result(timeout=bound_s + 60)
    client.close()  # the error's traceback keeps it: an open connection holds a stopping server for its exit timeout
    assert time.monotonic() - injected < bound_s, f"the fault took {time.monotonic() - injected:.1f} s to surface"
    assert str(error.value.status()) == "503", error.value.message()
    for word in words:
        assert word in error.value.message()
    assert output(infer(server, "bf16", SEED=1, STEPS=1, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 30), "a worker of the failed group survived"

    def serves_again() -> bool:
        try:
            return infer(server, model, outputs=("INFO",), SEED=1, STEPS=1, HEIGHT=64, WIDTH=64) is not None
        except InferenceServerException as exc:
            assert str(exc.status()) == "503" and "restart" in exc.message(), exc.message()
            return False

    assert wait_until(serves_again, 120, interval=1.0), "the model did not serve again after its workers restarted"
    info = info_of(infer(server, model, outputs=("INFO",), SEED=1, STEPS=1, HEIGHT=64, WIDTH=64))
    assert info["parallel"]["restarts"] >= 1 and not set(info["parallel"]["worker_pids"]) & set(pids)


def test_a_killed_worker_fails_the_request_and_the_group_restarts(parallel_server):
    fault_then_recovery(parallel_server, CP2, lambda pids: os.kill(pids[1], signal.SIGKILL),
                        ["worker rank 1", "was killed by signal 9", "restarts"], bound_s=15)


def test_a_hung_worker_fails_the_request_within_the_progress_timeout(parallel_server):
    fault_then_recovery(parallel_server, QUICK_HANG, lambda pids: os.kill(pids[1], signal.SIGSTOP),
                        [f"no progress for {PROGRESS_TIMEOUT_S} s", "worker rank", "hung"],
                        bound_s=PROGRESS_TIMEOUT_S + 15)


def test_unload_leaves_no_worker_process(parallel_server):
    client = httpclient.InferenceServerClient(parallel_server.http_url)
    pids = worker_pids(parallel_server, QUICK_HANG)
    client.unload_model(QUICK_HANG)
    assert wait_until(lambda: not client.is_model_ready(QUICK_HANG), 30)
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 30), "workers outlived the unload"
    client.load_model(QUICK_HANG)
    ready = client.is_model_ready(QUICK_HANG)
    client.close()
    assert ready and len(worker_pids(parallel_server, QUICK_HANG)) == 2


def test_shutdown_leaves_no_worker_process(parallel_server):
    # The module's last use of its server: this stops it (a server of its own cost 30 s more on 2 cores).
    pids = [pid for model in (CP2, QUICK_HANG) for pid in worker_pids(parallel_server, model)]
    assert len(pids) == 4 and all(alive(pid) for pid in pids)
    assert parallel_server.stop() == 0
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 30), "workers outlived the server"


def test_the_step_diagnostic_splits_collectives_from_compute_on_every_rank():
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "perf.diagnostics.parallel_step", "--stacks", CP2, "--device", "cpu", "--weights",
         "synthetic:tiny", "--size", "128", "--steps", "3", "--requests", "1", "--compare"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                     key=lambda report: report["rank"])
    assert [report["rank"] for report in reports] == [0, 1]
    for report in reports:
        assert report["stack"] == CP2 and report["world_size"] == 2 and report["steps_computed"] == [3]
        assert report["step_ms"] > 0 and report["compute_ms_per_step"] > 0 and report["collective_ms_per_step"] > 0
        assert report["text_encode_ms"] > 0  # every rank encodes the prompt
    assert reports[0]["vae_decode_ms"] > 0 and reports[1]["vae_decode_ms"] == 0  # only rank 0 decodes
    assert reports[0]["psnr_vs_one_process_db"] >= 40 and "psnr_vs_one_process_db" not in reports[1]
