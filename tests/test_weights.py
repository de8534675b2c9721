"""Real weights, end to end: a pipeline saved with `save_pretrained` (the tiny synthetic one, sharded) served from a
folder and from a local Hugging Face cache entry (hub id, offline), and broken folders failing with the file named
(diffusers and safetensors name it; the model's load error carries their message)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import MODEL_PY, config_pbtxt, start_server
from fluxserve import weights
from fluxserve.stacks import Stack
from fluxserve.weights.read_ahead import ReadAhead, weight_files
from fluxserve.weights import WeightsError, load_onto_device, load_to_cpu, parse_source
from test_serving import infer, info_of, output

HUB_ID = "fluxserve-tests/tiny-flux"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
CUT_SHARD = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
MISSING_SHARD = "text_encoder_2/model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """synthetic:tiny saved as a diffusers folder, its larger components in two shards each."""
    from fluxserve.weights.synthetic import build_synthetic_pipeline

    folder = tmp_path_factory.mktemp("weights") / "tiny-flux"
    build_synthetic_pipeline("tiny", torch.bfloat16, "cpu").save_pretrained(folder, max_shard_size="200KB")
    assert (folder / CUT_SHARD).is_file() and (folder / MISSING_SHARD).is_file()
    return folder


def broken_copy(saved, folder, cut: str | None = None, missing: str | None = None):
    shutil.copytree(saved, folder)
    if cut:
        with open(folder / cut, "r+b") as file:
            file.truncate((folder / cut).stat().st_size // 2)
    if missing:
        (folder / missing).unlink()
    return folder


@pytest.fixture(scope="module")
def weights_server(saved, tmp_path_factory):
    """One server whose models differ only by their `weights` parameter: the folder, the hub id, broken folders."""
    root = tmp_path_factory.mktemp("weights-server")
    hub = root / "hub"
    repo = hub / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(saved, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    broken = {"bf16-cut": broken_copy(saved, root / "cut", cut=CUT_SHARD),
              "bf16-missing": broken_copy(saved, root / "missing", missing=MISSING_SHARD)}
    repository = root / "model_repository"
    for name, source in (("bf16-folder", saved), ("bf16-hub", HUB_ID), *broken.items()):
        (repository / name / "1").mkdir(parents=True)
        config = config_pbtxt(Stack()).replace('name: "bf16"', f'name: "{name}"')
        config += f'parameters {{ key: "weights" value: {{ string_value: "{source}" }} }}\n'
        (repository / name / "config.pbtxt").write_text(config)
        (repository / name / "1" / "model.py").write_text(MODEL_PY)
    server = start_server(root, ["bf16-folder", "bf16-hub"], repository,
                          env_extra={"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    yield server, broken
    server.stop()


def test_saved_weights_serve_the_same_image_from_a_folder_and_from_the_hub_cache(weights_server, saved, server):
    served, _ = weights_server
    synthetic = infer(server, "bf16", SEED=8, STEPS=3, HEIGHT=64, WIDTH=96)  # the session's synthetic:tiny server
    folder, hub = (infer(served, model, SEED=8, STEPS=3, HEIGHT=64, WIDTH=96) for model in ("bf16-folder", "bf16-hub"))
    assert info_of(folder)["weights"] == str(saved) and info_of(hub)["weights"] == HUB_ID
    assert info_of(synthetic)["weights"] == "synthetic:tiny"
    # The saved pipeline is synthetic:tiny's (seeded): reloaded in bf16 it gives the very same image.
    assert np.array_equal(output(folder, "IMAGE"), output(synthetic, "IMAGE"))
    assert np.array_equal(output(hub, "IMAGE"), output(synthetic, "IMAGE"))
    assert set(info_of(folder)["load_phases_s"]) == {"weights", "stack", "warm_up", "kernel_check"}


@pytest.mark.parametrize("model,shard,words", [("bf16-cut", CUT_SHARD, "Unable to load weights"),
                                               ("bf16-missing", MISSING_SHARD, "No such file")])
def test_a_broken_shard_fails_the_load_with_the_file_named_and_the_rest_serves(weights_server, model, shard, words):
    server, broken = weights_server
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as error:
        client.load_model(model)
    message = error.value.message()
    assert str(broken[model] / shard) in message and words in message and "cannot load FLUX weights" in message
    assert not client.is_model_ready(model) and client.is_model_ready("bf16-folder")
    client.close()  # an open connection holds a stopping server for its whole exit timeout
    assert output(infer(server, "bf16-folder", SEED=1, STEPS=1, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)


def state_dicts(pipe) -> dict:
    return {name: module.state_dict() for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}


def test_loading_straight_onto_the_device_gives_the_pipeline_loaders_weights(saved, monkeypatch):
    """load_onto_device (the GPU path, here onto the CPU) against diffusers' pipeline loader: same models, same
    tensors and dtypes, and no device_map mark left on a model that sits on one device."""
    source = parse_source(str(saved))
    timings, readers = {}, []
    started = ReadAhead.start
    monkeypatch.setattr(ReadAhead, "start", lambda self: readers.append(self) or started(self))
    direct = load_onto_device(source, torch.bfloat16, torch.device("cpu"), timings=timings)
    (reader,) = readers  # the files were read ahead, every weight file of the folder, and the readers are done
    assert {path for path, _, _ in reader.tasks} == set(weight_files(saved)) and reader.finished is not None
    assert not any(thread.is_alive() for thread in reader.threads)
    reference = load_to_cpu(source, torch.bfloat16)
    assert set(timings) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert {name: type(c) for name, c in direct.components.items()} == \
        {name: type(c) for name, c in reference.components.items()}
    ours, theirs = state_dicts(direct), state_dicts(reference)
    assert ours.keys() == theirs.keys() == timings.keys()
    for name in ours:
        assert ours[name].keys() == theirs[name].keys()
        for key, tensor in ours[name].items():
            assert tensor.dtype == theirs[name][key].dtype and torch.equal(tensor, theirs[name][key]), (name, key)
        assert getattr(direct.components[name], "hf_device_map", None) is None


@pytest.mark.parametrize("shard,cut,words", [(CUT_SHARD, True, "Unable to load weights"),
                                             (MISSING_SHARD, False, "No such file")])
def test_a_broken_shard_fails_the_straight_load_with_the_file_named(saved, tmp_path, shard, cut, words):
    folder = broken_copy(saved, tmp_path / "broken", cut=shard if cut else None, missing=None if cut else shard)
    with pytest.raises(WeightsError) as error:
        load_onto_device(parse_source(str(folder)), torch.bfloat16, torch.device("cpu"))
    message = str(error.value)
    assert str(folder / shard) in message and words in message and "cannot load FLUX weights" in message


def test_load_pipeline_goes_straight_onto_a_gpu_and_through_host_memory_to_the_cpu(saved, monkeypatch):
    calls = []
    monkeypatch.setattr(weights, "load_onto_device", lambda source, dtype, device: calls.append(device) or "direct")
    source = parse_source(str(saved))
    assert weights.load_pipeline(source, torch.bfloat16, torch.device("cuda:1")) == "direct"
    assert calls == [torch.device("cuda:1")]
    pipe = weights.load_pipeline(source, torch.bfloat16, torch.device("cpu"))
    assert calls == [torch.device("cuda:1")] and pipe.transformer.device.type == "cpu"
