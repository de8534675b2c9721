"""The foundation's contract, through the real tritonserver over HTTP and gRPC (synthetic:tiny on CPU)."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from conftest import COMPILED_STACK, FBCACHE_ALWAYS_SKIPS, FBCACHE_NEVER_SKIPS, TEACACHE_NEVER_SKIPS, make_inputs
from fluxserve.repository import MODEL_PY

ALL_OUTPUTS = ("IMAGE", "IMAGE_PNG", "STEPS_COMPUTED", "INFO")
PROTOCOLS = {"http": httpclient, "grpc": grpcclient}


def client_for(server, protocol):
    module = PROTOCOLS[protocol]
    return module, module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)


def infer(server, model, protocol="http", outputs=ALL_OUTPUTS, prompt="a red fox in snow", **fields):
    module, client = client_for(server, protocol)
    requested = [module.InferRequestedOutput(name) for name in outputs]
    try:
        return client.infer(model, make_inputs(module, prompt, **fields), outputs=requested)
    finally:
        client.close()  # an open connection holds a stopping server for its exit timeout


def output(result, name):
    """An output without its batch dimension (the models run batches of one)."""
    array = result.as_numpy(name)
    return None if array is None else array[0]


def info_of(result) -> dict:
    return json.loads(output(result, "INFO")[0])


def psnr_db(image, reference) -> float:
    """Peak signal-to-noise ratio of an 8-bit image against a reference, in dB (inf when equal)."""
    mean_square = np.mean((image.astype(float) - reference.astype(float)) ** 2)
    return float("inf") if mean_square == 0 else float(10 * np.log10(255**2 / mean_square))


# Two images of one request on the unit-scale weights (conftest.unit_scale_weights), a stack's against bf16 eager's:
# one that only rounds differently (Inductor's fused kernels, compiled or ahead of time: 53 dB; fp8 attention's
# emulation: 51 dB at 96x128) stays above this; one that loses a block's output (served compiled: 34 dB), runs every
# block on the first block's weights (ahead of time: 27 dB) or attends wrongly (fp8 attention without the rotary
# embedding: 41 dB) falls below.
SAME_IMAGE_PSNR_DB = 45.0


@contextlib.contextmanager
def unit_scale_model(server, test_repository, weights, model: str):
    """Load a copy of catalog model `model` that serves the unit-scale weights `weights` (its config's `weights`
    parameter), as `<model>-unit-scale`; yields its name, unloads it after."""
    name = f"{model}-unit-scale"
    folder = test_repository / name
    if not folder.exists():
        config = (test_repository / model / "config.pbtxt").read_text().replace(f'name: "{model}"', f'name: "{name}"')
        config += f'parameters {{ key: "weights" value: {{ string_value: "{weights}" }} }}\n'
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.py").write_text(MODEL_PY)
        (folder / "config.pbtxt").write_text(config)
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=300)
    try:
        client.load_model(name)
        yield name
    finally:
        client.unload_model(name)
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["bf16", "fp16", "bf16-fa2-fbcache-0.3-int8"])
def test_generates_png_and_image_of_the_asked_size(server, protocol, model):
    result = infer(server, model, protocol, SEED=7, STEPS=3, HEIGHT=80, WIDTH=112, GUIDANCE=4.0)
    image = output(result, "IMAGE")
    assert image.dtype == np.uint8 and image.shape == (80, 112, 3)
    png = Image.open(io.BytesIO(output(result, "IMAGE_PNG")[0]))
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (112, 80)
    assert np.array_equal(np.asarray(png), image)
    info = info_of(result)
    assert info["stack"] == model and info["model"] == model
    assert info["steps_total"] == 3 and info["steps_computed"] == output(result, "STEPS_COMPUTED")[0]
    if "fbcache" in model:  # FBCache decides from the activations, and always computes the first step
        assert 1 <= info["steps_computed"] <= 3
    else:  # no step cache: every step computes
        assert info["steps_computed"] == 3
    assert info["seed"] == 7 and info["guidance"] == 4.0 and (info["height"], info["width"]) == (80, 112)
    assert "attention" in info["attention_kernel"] and info["latency_ms"] > 0
    assert info["device_name"] == "cpu" and info["cudnn_version"] is None  # a GPU instance reports its cuDNN
    assert {"text_encode", "denoise", "vae_decode", "png_encode"} <= set(info["timings_ms"])
    phases = info["load_phases_s"]  # where the load went, in order; together within the whole load
    assert list(phases) == ["weights", "stack", "warm_up", "kernel_check"] and min(phases.values()) >= 0
    assert 0 < sum(phases.values()) <= info["load_seconds"] + 0.005  # each rounded to the millisecond


def test_compiled_stack_serves_the_same_image_within_rounding(server, test_repository, unit_scale_weights):
    # Loaded here, not with the session's server: each test worker starts that server, and only this one compiles.
    # Both on the unit-scale weights: on synthetic:tiny's, a block compiled into something else leaves the image as is.
    with unit_scale_model(server, test_repository, unit_scale_weights, "bf16") as eager_model, \
            unit_scale_model(server, test_repository, unit_scale_weights, COMPILED_STACK) as compiled_model:
        eager = infer(server, eager_model, SEED=9, STEPS=3, HEIGHT=64, WIDTH=64)
        compiled = infer(server, compiled_model, SEED=9, STEPS=3, HEIGHT=64, WIDTH=64)
    assert info_of(compiled)["weights"] == info_of(eager)["weights"] == str(unit_scale_weights)
    assert info_of(compiled)["stack"] == COMPILED_STACK and output(compiled, "STEPS_COMPUTED")[0] == 3
    stats = info_of(compiled)["compile_stats"]  # the load compiled graphs, each served by the cache or compiled
    assert stats["graphs"] >= 1 and stats["inductor_cache_hits"] + stats["inductor_cache_misses"] >= stats["graphs"]
    assert info_of(eager)["compile_stats"] == {}
    similarity = psnr_db(output(compiled, "IMAGE"), output(eager, "IMAGE"))
    assert similarity > SAME_IMAGE_PSNR_DB, similarity  # fused bf16 kernels round differently, nothing more


def test_defaults_apply_when_optional_inputs_are_absent(server):
    first, second = (infer(server, "bf16", outputs=("IMAGE", "INFO"), HEIGHT=64, WIDTH=64) for _ in range(2))
    infos = [info_of(result) for result in (first, second)]
    for info in infos:
        assert info["steps_total"] == info["steps_computed"] == 28 and info["guidance"] == 3.5
        assert isinstance(info["seed"], int) and 0 <= info["seed"] < 2**31
    assert infos[0]["seed"] != infos[1]["seed"]  # a fresh seed per request, not a fixed default
    assert not np.array_equal(output(first, "IMAGE"), output(second, "IMAGE"))
    # The reported seed and the defaults are what the image was made with: given explicitly, they make it again.
    again = infer(server, "bf16", outputs=("IMAGE",), SEED=infos[0]["seed"], STEPS=28, GUIDANCE=3.5, HEIGHT=64,
                  WIDTH=64)
    assert np.array_equal(output(again, "IMAGE"), output(first, "IMAGE"))


def test_only_requested_outputs_are_computed(server):
    result = infer(server, "bf16", outputs=("STEPS_COMPUTED", "INFO"), SEED=1, STEPS=2, HEIGHT=64, WIDTH=64)
    assert output(result, "IMAGE") is None and output(result, "IMAGE_PNG") is None
    assert "png_encode" not in info_of(result)["timings_ms"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_same_seed_gives_identical_bytes(server, protocol):
    first, second, other = (
        infer(server, "bf16", protocol, SEED=seed, STEPS=3, HEIGHT=64, WIDTH=64) for seed in (11, 11, 12)
    )
    assert output(first, "IMAGE_PNG")[0] == output(second, "IMAGE_PNG")[0]
    assert np.array_equal(output(first, "IMAGE"), output(second, "IMAGE"))
    assert not np.array_equal(output(first, "IMAGE"), output(other, "IMAGE"))


@pytest.mark.parametrize("stack", [FBCACHE_NEVER_SKIPS, TEACACHE_NEVER_SKIPS], ids=lambda stack: stack.cache)
def test_cache_threshold_zero_computes_every_step_and_matches_no_cache(server, stack):
    plain = infer(server, "bf16", SEED=5, STEPS=6, HEIGHT=64, WIDTH=64)
    cached = infer(server, stack.name, SEED=5, STEPS=6, HEIGHT=64, WIDTH=64)
    assert output(cached, "STEPS_COMPUTED")[0] == 6
    assert np.array_equal(output(plain, "IMAGE"), output(cached, "IMAGE"))


def test_fbcache_huge_threshold_computes_only_the_first_step(server):
    result = infer(server, FBCACHE_ALWAYS_SKIPS.name, SEED=5, STEPS=6, HEIGHT=64, WIDTH=64)
    assert output(result, "STEPS_COMPUTED")[0] == 1
    assert info_of(result)["steps_total"] == 6
    assert output(result, "IMAGE").shape == (64, 64, 3)


BAD_INPUTS = [
    # (description, prompt, fields, words the error must contain)
    ("empty prompt", "", {}, ["PROMPT", "non-empty"]),
    ("blank prompt", "   ", {}, ["PROMPT", "non-empty"]),
    ("missing prompt", None, {"STEPS": 2}, ["PROMPT"]),
    ("non-UTF-8 prompt", b"\xff\xfe\xfa", {}, ["PROMPT", "UTF-8"]),
    ("prompt over the limit", "x" * 2001, {}, ["PROMPT", "2000"]),
    ("height not a multiple of 16", "ok", {"HEIGHT": 72}, ["HEIGHT", "multiple of 16"]),
    ("width too small", "ok", {"WIDTH": 16}, ["WIDTH", "[64, 2048]"]),
    ("width too large", "ok", {"WIDTH": 4096}, ["WIDTH", "[64, 2048]"]),
    ("steps below 1", "ok", {"STEPS": 0}, ["STEPS", "[1, 100]"]),
    ("steps above 100", "ok", {"STEPS": 101}, ["STEPS", "[1, 100]"]),
    ("NaN guidance", "ok", {"GUIDANCE": float("nan")}, ["GUIDANCE", "finite"]),
    ("infinite guidance", "ok", {"GUIDANCE": float("inf")}, ["GUIDANCE", "finite"]),
    ("negative guidance", "ok", {"GUIDANCE": -1.0}, ["GUIDANCE", "[0.0, 30.0]"]),
    ("negative seed", "ok", {"SEED": -3}, ["SEED", "[0,"]),
    ("huge prompt", "fox " * 25_000, {}, ["PROMPT", "at most 2000 characters"]),
    ("negative infinite guidance", "ok", {"GUIDANCE": float("-inf")}, ["GUIDANCE", "finite"]),
    ("guidance above range", "ok", {"GUIDANCE": 31.0}, ["GUIDANCE", "[0.0, 30.0]"]),
    ("too many pixels", "ok", {"HEIGHT": 2048, "WIDTH": 2048}, ["HEIGHT x WIDTH", "2097152"]),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("description,prompt,fields,words", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_invalid_arg_and_the_server_keeps_serving(server, protocol, description, prompt, fields, words):
    with pytest.raises(InferenceServerException) as error:
        infer(server, "bf16", protocol, prompt=prompt, **{"HEIGHT": 64, "WIDTH": 64, **fields})
    message = error.value.message()
    for word in words:
        assert word in message, message
    status = str(error.value.status())
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), status
    good = infer(server, "bf16", protocol, SEED=1, STEPS=1, HEIGHT=64, WIDTH=64)
    assert output(good, "IMAGE").shape == (64, 64, 3)


def _raw_input(name, datatype, array):
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize(
    "tensor,words",
    [
        (lambda: _raw_input("STEPS", "FP32", np.array([[4.0]], np.float32)), ["STEPS", "expects 'INT32'"]),
        (lambda: _raw_input("STEPS", "INT32", np.array([[4, 5]], np.int32)), ["STEPS", "[-1,1]"]),
        (lambda: _raw_input("PROMPT", "BYTES", np.array([[b"a", b"b"]], np.object_)), ["PROMPT", "[-1,1]"]),
        (lambda: _raw_input("SEED", "INT32", np.array([[4]], np.int32)), ["SEED", "expects 'INT64'"]),
        (lambda: _raw_input("HEIGHT", "FP32", np.array([[512.0]], np.float32)), ["HEIGHT", "expects 'INT32'"]),
        (lambda: _raw_input("PROMPT", "INT32", np.array([[1]], np.int32)), ["PROMPT", "expects 'BYTES'"]),
        (lambda: _raw_input("PROMPT", "BYTES", np.array([[b"a"], [b"b"]], np.object_)), ["batch", "1"]),
        (lambda: _raw_input("NEGATIVE", "BYTES", np.array([[b"x"]], np.object_)), ["NEGATIVE"]),
    ],
    ids=["wrong dtype", "wrong shape", "two prompts", "seed as int32", "height as float", "prompt as int",
         "batch of two", "unknown input"],
)
def test_wrong_dtype_or_shape_is_rejected_by_name(server, tensor, words):
    client = httpclient.InferenceServerClient(server.http_url)
    inputs = [tensor()]
    if inputs[0].name() != "PROMPT":
        inputs += make_inputs(httpclient, "ok")
    with pytest.raises(InferenceServerException) as error:
        client.infer("bf16", inputs)
    for word in words:
        assert word in error.value.message(), error.value.message()
    assert client.is_model_ready("bf16") and good_request(server)


def test_unknown_model_is_not_found(server):
    with pytest.raises(InferenceServerException) as error:
        infer(server, "bf16-warp-drive", SEED=1, STEPS=1, HEIGHT=64, WIDTH=64)
    assert "unknown model" in error.value.message() and "bf16-warp-drive" in error.value.message()
    assert good_request(server)


def good_request(server) -> bool:
    return output(infer(server, "bf16", SEED=1, STEPS=1, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)


def test_overlong_prompt_is_truncated_with_a_warning(server):
    prompt = " ".join(["lighthouse"] * 120)  # beyond CLIP's 77 tokens, within the character limit
    info = info_of(infer(server, "bf16", outputs=("INFO",), prompt=prompt, SEED=1, STEPS=1, HEIGHT=64, WIDTH=64))
    assert any("CLIP reads the first 77" in warning for warning in info["warnings"]), info["warnings"]


@pytest.mark.parametrize("model,reason", [
    ("bf16-fp8", "fp8 needs a CUDA GPU of compute capability 8.9+"),
    ("bf16-cudnn-cudagraph", "cuDNN attention needs a CUDA GPU"),
])
def test_unsupported_stack_fails_to_load_and_others_keep_serving(server, model, reason):
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as error:
        client.load_model(model)
    assert reason in error.value.message()
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index[model]["state"] == "UNAVAILABLE" and reason in index[model]["reason"]
    assert f"stack {model}: {reason}" in server.log()
    assert client.is_server_ready() and client.is_model_ready("bf16")
    assert output(infer(server, "bf16", SEED=1, STEPS=1, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)


def processes_running(script: str) -> dict[int, int]:
    """{PID: parent PID} of the processes whose command line names `script` (Triton's Python stubs name their
    model.py)."""
    processes = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and script in (entry / "cmdline").read_bytes().decode(errors="replace"):
                # /proc/PID/stat: "PID (comm) state PPID ..."; comm may hold spaces, so split after its ")".
                processes[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone between listing and reading
            pass
    return processes


def model_processes(processes: dict[int, int]) -> set[int]:
    """The stubs among `processes`: a stub's child between its fork and its exec still shows the stub's command
    line, but its parent is that stub (loading a model runs `/sbin/ldconfig -p` through ctypes' find_library; a
    watcher polling every 20 ms caught one such child once on a busy 2-core machine)."""
    return {pid for pid, parent in processes.items() if parent not in processes}


def test_a_load_starts_one_model_process_not_a_config_completing_one_first(server, test_repository):
    model = "bf16-fbcache-0.15"  # loaded by no other test
    script = str(test_repository / model / "1" / "model.py")
    seen, loaded = {}, threading.Event()

    def watch():
        while not loaded.is_set():
            seen.update(processes_running(script))
            loaded.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        client.load_model(model)
    finally:
        loaded.set()
        watcher.join()
    try:
        assert client.is_model_ready(model)
        # With config auto-completion on, Triton first runs a stub only to ask model.py for its config (importing
        # torch and diffusers), then the instance's: two processes per load instead of one.
        stubs = model_processes(seen)
        assert len(stubs) == 1 and stubs == model_processes(processes_running(script)), seen
    finally:
        client.unload_model(model)


def test_eight_concurrent_requests_all_succeed(server):
    def one(seed):
        return infer(server, "bf16", SEED=seed, STEPS=2, HEIGHT=64, WIDTH=64)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(output(result, "IMAGE").shape == (64, 64, 3) for result in results)
    assert len({output(result, "IMAGE_PNG")[0] for result in results}) == 8
