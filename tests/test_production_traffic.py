"""Production traffic on a compiled stack, through the real tritonserver: once ready, sizes it never saw compile
nothing (torch.compile's own counters, per request in INFO); its portable compile artifact, written by one server,
lets a fresh server with an empty Inductor cache load without compiling and make the same image; and an artifact
that is damaged or made elsewhere is ignored with a warning naming it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import COMPILED_STACK, start_server
from fluxserve.optimizations import compile_artifacts
from fluxserve.stacks import Stack
from test_serving import infer, info_of, output

WARM_UP_SIZES = "64x64,64x96"
SPECIALISED_SIZE = "64x96"
UNSEEN_SIZES = [(80, 80), (128, 64), (112, 96)]


def compiled_server(tmp, artifacts, inductor_cache):
    return start_server(tmp, [COMPILED_STACK], extra_args=["--warmup-sizes", WARM_UP_SIZES,
                                                           "--specialised-sizes", SPECIALISED_SIZE],
                        env_extra={compile_artifacts.ARTIFACTS_ENV: str(artifacts),
                                   "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("compile-artifacts")


@pytest.fixture(scope="module")
def first_server(tmp_path_factory, artifacts):
    server = compiled_server(tmp_path_factory.mktemp("first"), artifacts, tmp_path_factory.mktemp("inductor-first"))
    yield server
    server.stop()


def load_info(server) -> dict:
    return info_of(infer(server, COMPILED_STACK, outputs=("INFO",), SEED=1, STEPS=1, HEIGHT=64, WIDTH=64))


def test_a_ready_compiled_stack_serves_sizes_it_never_saw_without_compiling(first_server):
    info = load_info(first_server)
    assert info["warm_up_sizes"] == WARM_UP_SIZES.split(",") and info["specialised_sizes"] == [SPECIALISED_SIZE]
    assert info["compile_stats"]["graphs"] > 0  # the load did compile
    for height, width in [*UNSEEN_SIZES, (64, 96)]:  # and its specialised size runs the code compiled for it
        result = infer(first_server, COMPILED_STACK, SEED=2, STEPS=2, HEIGHT=height, WIDTH=width)
        assert output(result, "IMAGE").shape == (height, width, 3)
        assert info_of(result)["compiled_in_request"] == {}, (height, width)
    assert "compiled (" not in first_server.log()  # the warning a compiling request writes


def test_the_first_load_writes_its_artifact_and_a_fresh_server_loads_it_without_compiling(first_server, artifacts,
                                                                                         tmp_path):
    written = load_info(first_server)["compile_artifact"]
    assert written["read"] is None and written["written"].startswith(str(artifacts))
    meta = json.loads(compile_artifacts.Artifact(Path(written["written"])).meta.read_text())
    assert meta["key"]["stack"] == COMPILED_STACK and meta["bytes"] > 0
    fresh = compiled_server(tmp_path, artifacts, tmp_path / "empty-inductor-cache")
    try:
        stats = load_info(fresh)["compile_stats"]
        assert load_info(fresh)["compile_artifact"] == {"read": written["written"], "written": None}
        assert stats["inductor_cache_misses"] == 0, stats  # Inductor generated no code: it read the artifact's
        assert stats["inductor_cache_hits"] > 0 and stats["aot_cache_hits"] > 0, stats
        for height, width in UNSEEN_SIZES[:1]:
            image = output(infer(fresh, COMPILED_STACK, SEED=3, STEPS=2, HEIGHT=height, WIDTH=width), "IMAGE")
            same = output(infer(first_server, COMPILED_STACK, SEED=3, STEPS=2, HEIGHT=height, WIDTH=width), "IMAGE")
            assert np.array_equal(image, same)
    finally:
        fresh.stop()


def square(x):
    return torch.sin(x) * 2 + x


def test_an_artifact_round_trips_and_a_damaged_or_foreign_one_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog):
    """In-process, with a small compiled function: the keying and the failure handling, not FLUX."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    stack = Stack(compile="regional")
    device = torch.device("cpu")
    torch.compile(square, dynamic=True)(torch.ones(5))
    written = compile_artifacts.save_artifact(stack, device, tmp_path)
    assert written is not None and written.parent == tmp_path / stack.name
    caplog.set_level(logging.WARNING, logger="fluxserve.optimizations.compile_artifacts")
    assert compile_artifacts.load_artifact(stack, device, tmp_path) == written
    assert "ignored" not in caplog.text

    data = written.read_bytes()
    written.write_bytes(data[: len(data) // 2])  # a copy cut short
    assert compile_artifacts.load_artifact(stack, device, tmp_path) is None
    assert str(written) in caplog.text and "checksum" in caplog.text

    caplog.clear()
    written.write_bytes(data)
    foreign = written.with_name("0123456789abcdef.json")
    meta = json.loads(written.with_suffix(".json").read_text())
    foreign.write_text(json.dumps({**meta, "key": {**meta["key"], "torch": "0.0.1"}}))
    assert compile_artifacts.load_artifact(stack, device, tmp_path) == written  # its own still loads
    assert "0123456789abcdef.bin" in caplog.text and "torch 0.0.1" in caplog.text

    caplog.clear()
    meta["key"]["torch"] = "0.0.1"  # its own file, rewritten for another torch: stale
    written.with_suffix(".json").write_text(json.dumps(meta))
    assert compile_artifacts.load_artifact(stack, device, tmp_path) is None
    assert str(written) in caplog.text and "0.0.1" in caplog.text


def test_artifacts_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_artifacts.ARTIFACTS_ENV, "off")
    assert compile_artifacts.artifacts_folder() is None
    monkeypatch.delenv(compile_artifacts.ARTIFACTS_ENV)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert compile_artifacts.artifacts_folder() == tmp_path / "artifacts"


def test_size_settings_come_from_the_parameter_then_the_environment_and_name_their_source(monkeypatch):
    from fluxserve.contract import Limits
    from fluxserve.server.serving import SPECIALISED_SIZES_ENV, WARMUP_SIZES_ENV, specialised_sizes, warm_up_sizes

    limits = Limits(default_size=64)
    assert specialised_sizes({}, limits, 1, on_gpu=True) == [(64, 64)]  # the default size, on a GPU only
    assert specialised_sizes({}, limits, 1, on_gpu=False) == []
    monkeypatch.setenv(SPECIALISED_SIZES_ENV, "none")
    assert specialised_sizes({}, limits, 1, on_gpu=True) == []
    assert specialised_sizes({"specialised_sizes": "64x96,96x64"}, limits, 1, on_gpu=False) == [(64, 96), (96, 64)]
    monkeypatch.setenv(SPECIALISED_SIZES_ENV, "64x99")
    with pytest.raises(ValueError, match=f"{SPECIALISED_SIZES_ENV}: size '64x99': WIDTH .*multiple of 16"):
        specialised_sizes({}, limits, 1, on_gpu=True)
    with pytest.raises(ValueError, match="parameter warmup_sizes: 'none' is not allowed"):
        warm_up_sizes({"warmup_sizes": "none"}, limits, 1)
    monkeypatch.setenv(WARMUP_SIZES_ENV, "96x96")
    assert warm_up_sizes({}, limits, 1) == [(96, 96)]
