"""Ahead-of-time packages for the regionally compiled stacks (fluxserve/optimizations/aot_blocks.py), on the CPU with
synthetic:tiny: the first load builds a package per block class, later loads reuse it (any weights, any image size),
a step cache and the step counter still work over it, and a package that cannot be used falls back to torch.compile
with a warning. Packages are built once for the module (about 40 s on two cores)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from fluxserve.optimizations import aot_blocks
from fluxserve.contract import GenerationRequest
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import Stack
from fluxserve.weights import parse_source
from test_serving import SAME_IMAGE_PSNR_DB, psnr_db

CPU = torch.device("cpu")
TINY = parse_source("synthetic:tiny")
REGIONAL = Stack(compile="regional")
REQUEST = GenerationRequest(prompt="a lighthouse", seed=0, steps=4, guidance=3.5, height=64, width=64)
TINY_BLOCKS = 4  # synthetic:tiny has 1 double-stream and 3 single-stream blocks


def load(stack: Stack, packages, monkeypatch, weights=TINY):
    monkeypatch.setenv(aot_blocks.PACKAGES_ENV, str(packages))
    return build_pipeline(stack, weights, CPU, warm_up=REQUEST)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A packages folder after the first load of the regional bf16 stack, that load, and Inductor's config before it."""
    packages = tmp_path_factory.mktemp("aot")
    config = torch._inductor.config.get_config_copy()
    with pytest.MonkeyPatch.context() as monkeypatch:
        pipeline = load(REGIONAL, packages, monkeypatch)
    return packages, pipeline, config


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile (the fallback) with the eager backend: Inductor takes minutes on two CPU cores."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compile_(*args, **{**kwargs, "backend": "eager"}))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def package_folder(packages) -> object:
    (folder,) = [path for path in packages.iterdir() if path.is_dir()]
    return folder


def test_packages_are_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv(aot_blocks.PACKAGES_ENV, raising=False)
    assert aot_blocks.packages_folder() is None
    monkeypatch.setenv(aot_blocks.PACKAGES_ENV, "off")
    assert aot_blocks.packages_folder() is None
    monkeypatch.setenv(aot_blocks.PACKAGES_ENV, "on")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/var/cache/fluxserve/inductor")
    assert str(aot_blocks.packages_folder()) == "/var/cache/fluxserve/aot"  # beside the compile cache


def test_packages_are_keyed_by_this_packages_own_source_too(tmp_path, monkeypatch):
    # The project's code decides what a block computes (GELU's form, fp8 attention's scales): packages built by
    # another version of it must not be reused.
    shutil.copytree(aot_blocks.PACKAGE_ROOT / "fluxserve", tmp_path / "fluxserve",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(aot_blocks, "PACKAGE_ROOT", tmp_path)
    aot_blocks.source_digest.cache_clear()
    before = aot_blocks.environment(CPU)["fluxserve"]
    source = tmp_path / "fluxserve" / "optimizations" / "apply.py"
    source.write_text(source.read_text() + "\n# another version\n")
    aot_blocks.source_digest.cache_clear()
    assert aot_blocks.environment(CPU)["fluxserve"] != before
    aot_blocks.source_digest.cache_clear()


def test_a_block_call_outside_the_packages_fixed_shapes_runs_the_blocks_own_forward_with_one_warning(caplog):
    forward = aot_blocks.BlockForward(package=lambda **inputs: "package", forward=lambda **inputs: "eager",
                                      fixed_shapes={"hidden_states": [1, None, 8], "rotary": [[None, 4], [None, 4]]})
    image = torch.zeros(1, 5, 8)
    rotary = (torch.zeros(517, 4), torch.zeros(517, 4))
    assert forward(hidden_states=image, rotary=rotary) == "package"  # any image-token count
    with caplog.at_level(logging.WARNING, logger="fluxserve.optimizations.aot_blocks"):
        assert forward(hidden_states=torch.zeros(2, 5, 8), rotary=rotary) == "eager"  # a batch of 2
        assert forward(hidden_states=image, rotary=rotary[:1]) == "eager"
        assert forward(hidden_states=image, rotary=rotary, joint_attention_kwargs={"scale": 0.5}) == "eager"
    assert caplog.text.count("runs eagerly") == 1


def test_the_first_load_builds_one_package_per_block_class_and_runs_every_block_on_it(built):
    packages, pipeline, _ = built
    folder = package_folder(packages)
    assert sorted(path.name for path in folder.iterdir()) == [
        "FluxSingleTransformerBlock.pt2", "FluxTransformerBlock.pt2", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stack"] == {"dtype": "bf16", "attention": "sdpa", "fuse_qkv": False, "quantization": "none"}
    assert manifest["environment"]["torch"] == torch.__version__
    stats = pipeline.compile_stats
    assert stats["aot_packages_built"] == 1 and stats["aot_blocks_loaded"] == TINY_BLOCKS
    assert stats["aot_fallbacks"] == 0 and stats["frames"] == 0  # nothing went through torch.compile
    blocks = [*pipeline.pipe.transformer.transformer_blocks, *pipeline.pipe.transformer.single_transformer_blocks]
    assert all(aot_blocks.block_forward(block) is not None for block in blocks)


def test_a_build_leaves_inductors_config_as_it_found_it(built):
    # AOTInductor writes its package metadata into the process-wide config, which is part of torch.compile's cache
    # key: left changed, a fallback to torch.compile after a build missed the Inductor cache other loads fill.
    *_, before = built
    assert torch._inductor.config.get_config_copy() == before


def test_a_later_load_reuses_the_packages_and_matches_the_eager_stack(built, monkeypatch, unit_scale_weights):
    # Packages hold code, not weights: built on synthetic:tiny's, they serve the unit-scale weights of the same
    # architecture, where every block shows in the image (on synthetic:tiny's, blocks all running the first block's
    # weights would make the same image).
    packages, *_ = built
    weights = parse_source(str(unit_scale_weights))
    pipeline = load(REGIONAL, packages, monkeypatch, weights)
    assert pipeline.compile_stats["aot_packages_built"] == 0
    assert pipeline.compile_stats["aot_blocks_loaded"] == TINY_BLOCKS
    eager = build_pipeline(Stack(), weights, CPU)
    for height, width in ((64, 64), (96, 160)):  # the image-token count is dynamic in the package
        request = GenerationRequest(prompt="a lighthouse", seed=3, steps=4, guidance=3.5, height=height, width=width)
        ahead, reference = pipeline.generate(request), eager.generate(request)
        assert ahead.steps_computed == 4
        assert ahead.image.shape == (height, width, 3)
        similarity = psnr_db(ahead.image, reference.image)
        assert similarity > SAME_IMAGE_PSNR_DB, similarity  # bf16 rounding of fused kernels, not another image


def test_a_step_cache_skips_steps_over_the_packages_and_the_counter_sees_it(built, monkeypatch):
    packages, *_ = built
    stack = Stack(cache="taylorseer", cache_interval=3, compile="regional")  # same block code: same packages
    pipeline = load(stack, packages, monkeypatch)
    assert pipeline.compile_stats["aot_packages_built"] == 0
    generation = pipeline.generate(GenerationRequest(prompt="a lighthouse", seed=0, steps=9, guidance=3.5,
                                                     height=64, width=64))
    # Interval 3 after 3 warm-up steps computes steps 0, 1, 2, 4 and 7, and always the last one (8): 6 of 9.
    assert generation.steps_computed == 6


def test_the_package_check_runs_in_a_child_and_reports_a_damaged_package(built, tmp_path):
    packages, *_ = built
    assert aot_blocks.check_in_child(package_folder(packages), CPU) is None
    damaged = tmp_path / "damaged"
    shutil.copytree(package_folder(packages), damaged)
    (damaged / "FluxTransformerBlock.pt2").write_bytes(b"not a zip")
    failure = aot_blocks.check_in_child(damaged, CPU)
    assert failure is not None and "exit code 1" in failure


def test_a_damaged_package_falls_back_to_torch_compile_with_a_warning(built, tmp_path, monkeypatch, eager_compile,
                                                                      caplog):
    packages, *_ = built
    copy = tmp_path / "packages"
    shutil.copytree(packages, copy)
    package = package_folder(copy) / "FluxSingleTransformerBlock.pt2"
    package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="fluxserve.optimizations.apply"):
        pipeline = load(REGIONAL, copy, monkeypatch)
    assert "do not load here" in caplog.text and "compiling with torch.compile instead" in caplog.text
    assert pipeline.compile_stats["aot_fallbacks"] == 1 and pipeline.compile_stats["frames"] > 0
    assert pipeline.generate(REQUEST).steps_computed == REQUEST.steps


def test_packages_that_failed_their_check_are_not_rebuilt_at_every_load(built, tmp_path, monkeypatch, eager_compile,
                                                                        caplog):
    packages, *_ = built
    copy = tmp_path / "packages"
    shutil.copytree(packages, copy)
    (package_folder(copy) / aot_blocks.UNUSABLE).write_text("loading them in a child process failed (signal 11)\n")
    with caplog.at_level(logging.WARNING, logger="fluxserve.optimizations.apply"):
        pipeline = load(REGIONAL, copy, monkeypatch)
    assert "signal 11" in caplog.text
    assert pipeline.compile_stats["aot_packages_built"] == 0 and pipeline.compile_stats["aot_fallbacks"] == 1


def test_packages_of_another_gpu_are_named_and_a_folder_that_cannot_be_written_falls_back(
        built, tmp_path, monkeypatch, eager_compile, caplog):
    packages, *_ = built
    copy = tmp_path / "packages"
    shutil.copytree(packages, copy)
    here = aot_blocks.environment(CPU)
    monkeypatch.setattr(aot_blocks, "environment", lambda device: {**here, "device": "NVIDIA H100 80GB HBM3"})

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(aot_blocks, "build_packages", read_only)
    with caplog.at_level(logging.WARNING):
        pipeline = load(REGIONAL, copy, monkeypatch)
    assert f"device {here['device']}" in caplog.text  # what the existing packages were built for
    assert "could not build ahead-of-time packages" in caplog.text and "Read-only file system" in caplog.text
    assert pipeline.compile_stats["aot_fallbacks"] == 1
    assert pipeline.generate(REQUEST).steps_computed == REQUEST.steps
