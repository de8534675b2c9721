"""Placement of model instances on GPUs (the launcher's --gpus), without a server: what config.pbtxt says and
which devices an instance then takes. Serving on KIND_GPU instances needs GPUs, which CI has not."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from fluxserve.server import serving
from fluxserve.server.placement import PlacementError, check_placement, instance_gpus, parse_model_gpus
from fluxserve.repository import PARAMETER_LINE, config_pbtxt, place_config, placed_repository
from fluxserve.serve import place_models
from fluxserve.stacks import catalog_by_name


def parse_gpus(spec: str, gpus: int, model: str = "model"):
    """What the launcher does with --gpus MODEL=SPEC for a stack of `gpus` GPUs."""
    name, placement = parse_model_gpus(f"{model}={spec}")
    check_placement(placement, gpus, name)
    return placement


@pytest.mark.parametrize(
    "spec,gpus,expected",
    [
        ("0,1,2,3", 1, ((0,), (1,), (2,), (3,))),
        ("4", 1, ((4,),)),
        ("0-3,4-7", 4, ((0, 1, 2, 3), (4, 5, 6, 7))),
        ("0+2,1+3", 2, ((0, 2), (1, 3))),
    ],
)
def test_gpu_specs_parse_into_instances(spec, gpus, expected):
    assert parse_gpus(spec, gpus) == expected


@pytest.mark.parametrize(
    "spec,gpus,words",
    [
        ("0,1", 2, ["takes 2 GPU(s), got 1"]),
        ("0-1", 1, ["takes 1 GPU(s), got 2"]),
        ("0-1,1-2", 2, ["GPU 1 is given twice"]),
        ("0+0", 2, ["GPU 0 is given twice"]),
        ("a", 1, ["'a' is not a GPU id"]),
        ("-1", 1, ["not a GPU id"]),
    ],
)
def test_bad_gpu_specs_say_what_is_wrong(spec, gpus, words):
    with pytest.raises(PlacementError) as error:
        parse_gpus(spec, gpus, "some-model")
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("name,placement", [("bf16", ((0,), (3,))), ("bf16-cp4", ((0, 1, 2, 3), (4, 5, 6, 7)))])
def test_placing_a_committed_config_equals_generating_it_placed(name, placement):
    stack = catalog_by_name()[name]
    committed = (ROOT / "model_repository" / name / "config.pbtxt").read_text()
    placed = place_config(committed, name, placement)
    assert placed == config_pbtxt(stack, placement=placement)
    assert f"kind: KIND_GPU, gpus: [ {', '.join(str(gpus[0]) for gpus in placement)} ]" in placed
    assert place_config(placed, name, placement) == placed  # placing again replaces, never appends


def test_unplaced_instances_take_their_default_devices():
    one, four = (dict(PARAMETER_LINE.findall(config_pbtxt(catalog_by_name()[name]))) for name in ("bf16", "bf16-cp4"))
    assert instance_gpus(one, 1, "GPU", 5) == (5,)  # Triton's own: an instance per GPU
    assert instance_gpus(four, 4, "MODEL", 0) == (0, 1, 2, 3)
    assert serving.instance_devices("CPU", 0, one) == [torch.device("cpu")]
    assert serving.instance_devices("MODEL", 0, four) == [torch.device("cpu")] * 4  # no GPU here: four processes


def test_a_placed_instance_finds_its_gpus_and_a_missing_gpu_is_named(monkeypatch):
    config = config_pbtxt(catalog_by_name()["bf16-cp2"], placement=((4, 5), (6, 7)))
    parameters = dict(PARAMETER_LINE.findall(config))
    assert instance_gpus(parameters, 2, "GPU", 6) == (6, 7)
    with pytest.raises(PlacementError, match="GPU 5 is not the first GPU"):
        instance_gpus(parameters, 2, "GPU", 5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert serving.instance_devices("GPU", 4, parameters) == [torch.device("cuda:4"), torch.device("cuda:5")]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 6)
    with pytest.raises(PlacementError, match="GPUs 6, 7, but the host has 6"):
        serving.instance_devices("GPU", 6, parameters)


def test_the_launcher_serves_a_content_named_copy_that_never_changes(tmp_path, monkeypatch):
    from fluxserve import serve

    monkeypatch.setattr(serve, "PLACED_REPOSITORIES", tmp_path)
    source = ROOT / "model_repository"
    first = place_models(source, ["bf16=0,1", "bf16-cp2=2-3"])
    assert first.parent == tmp_path and place_models(source, ["bf16-cp2=2-3", "bf16=0,1"]) == first
    assert "gpu_groups" in (first / "bf16-cp2" / "config.pbtxt").read_text()
    assert (first / "fp16" / "config.pbtxt").read_text() == (source / "fp16" / "config.pbtxt").read_text()
    assert (first / "bf16" / "1" / "model.py").resolve() == (source / "bf16" / "1" / "model.py").resolve()
    other = place_models(source, ["bf16=1"])
    assert other != first and "gpus: [ 0, 1 ]" in (first / "bf16" / "config.pbtxt").read_text()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # nothing half-written left
    assert place_models(source, []) == source
    with pytest.raises(SystemExit, match="takes 2 GPU"):
        place_models(source, ["bf16-cp2=0,1"])
    with pytest.raises(PlacementError, match="no such model"):
        placed_repository(source, {"nope": ((0,),)}, tmp_path)


def test_a_placed_copy_serves_from_anywhere(tmp_path):
    """The model processes find fluxserve from model.py's own path (Triton's stub ignores PYTHONPATH): a copy of
    the repository must keep that path, whatever the server's working directory. CPU here: an empty placement."""
    from conftest import start_server
    from test_serving import infer, output

    copy = placed_repository(ROOT / "model_repository", {}, tmp_path / "placed")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = start_server(tmp_path, ["bf16"], copy, cwd=elsewhere)
    try:
        assert output(infer(server, "bf16", SEED=1, STEPS=1, HEIGHT=64, WIDTH=64), "IMAGE").shape == (64, 64, 3)
    finally:
        server.stop()
