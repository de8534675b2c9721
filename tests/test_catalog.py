"""The stack catalog, the generated repository and the request contract, without a server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import ROOT
from fluxserve.contract import InvalidInput, Limits, parse_request
from fluxserve.repository import differences
from fluxserve.stacks import CATALOG, Stack, StackError, catalog_by_name
from fluxserve.weights import WeightsError, parse_source

SEED_ROWS = {
    "Baseline (FP16)", "BF16", "FlashAttention2", "FBCache (0.15)", "FBCache (0.2)", "FBCache (0.3)",
    "FBCache (0.35)", "FBCache (0.4)", "FBCache+FA2 (0.2)", "TorchAO FP8", "BF16+FA2+FBCache (0.3)",
    "BF16+FA2+FBCache (0.3)+TorchAO FP8", "BF16+FA2+FBCache (0.3)+TorchAO INT8",
    "TeaCache (0.2)", "TeaCache (0.4)", "TeaCache (0.6)", "BF16+FA2+TeaCache (0.6)",
    "BF16+FA2+TeaCache (0.6)+TorchAO FP8", "BF16+FA2+TeaCache (0.6)+TorchAO INT8",
}  # the seed's "TeaCache+FA2 (0.6)" is "BF16+FA2+TeaCache (0.6)": its TeaCache rows are bf16 (see CATALOG)


def test_committed_repository_matches_the_catalog():
    assert differences(ROOT / "model_repository") == []


def test_catalog_covers_every_seed_row_once():
    rows = [stack.seed_row for stack in CATALOG if stack.seed_row]
    assert SEED_ROWS <= set(rows) and len(rows) == len(set(rows))
    assert len(catalog_by_name()) == len(CATALOG)


def test_stack_round_trips_through_config_parameters():
    for stack in CATALOG:
        assert Stack.from_parameters(stack.to_parameters()) == stack


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"dtype": "fp32"}, ["dtype", "bf16, fp16"]),
        ({"attention": "sage"}, ["attention", "sdpa"]),
        ({"cache_threshold": 0.2}, ["cache_threshold", "none"]),
        ({"cache": "taylorseer", "cache_interval": 3, "cache_threshold": 0.2}, ["cache_threshold", "taylorseer"]),
        ({"cache": "teacache", "cache_interval": 3}, ["cache_interval", "teacache"]),
        ({"cache": "taylorseer"}, ["cache_interval", ">= 1"]),
        ({"cache": "fbcache", "cache_threshold": -1.0}, ["cache_threshold", ">= 0"]),
        ({"cache": "fbcache", "cache_threshold": math.nan}, ["cache_threshold"]),
        ({"dtype": "fp16", "quantization": "int8"}, ["bf16"]),
        ({"cache": "fbcache", "cache_threshold": 0.2, "compile": "full"}, ["regional"]),
        ({"cache": "teacache", "cache_threshold": 0.6, "cuda_graph": True}, ["cuda_graph", "teacache", "magcache"]),
        ({"cache": "fbcache", "cache_threshold": 0.3, "cuda_graph": True}, ["cuda_graph", "activations"]),
        ({"cache": "magcache", "cache_threshold": 0.24, "cuda_graph": True, "parallel": "ulysses",
          "parallel_degree": 2}, ["cuda_graph", "one GPU"]),
        ({"compile": "full", "cuda_graph": True}, ["cuda_graph", "regional"]),
        ({"parallel": "tensor", "parallel_degree": 2}, ["parallel", "ulysses, ring"]),
        ({"parallel": "ulysses"}, ["parallel_degree", ">= 2"]),
        ({"parallel_degree": 2}, ["parallel_degree", "'none'"]),
        ({"parallel": "ulysses", "parallel_degree": 2, "cache": "teacache", "cache_threshold": 0.6},
         ["teacache", "activations", "taylorseer"]),
        ({"parallel": "ulysses", "parallel_degree": 4, "cache": "fbcache", "cache_threshold": 0.3}, ["fbcache"]),
        ({"parallel": "ring", "parallel_degree": 2}, ["ring", "fa2 or cudnn", "sdpa"]),
        ({"attention": "fp8attn", "parallel": "ulysses", "parallel_degree": 2}, ["fp8attn", "context parallel"]),
    ],
)
def test_invalid_stacks_fail_with_a_clear_message(fields, words):
    with pytest.raises(StackError) as error:
        Stack(**fields)
    for word in words:
        assert word in str(error.value)


@pytest.fixture
def gpu_of(monkeypatch):
    """Make torch.cuda report a GPU of the given compute capability, with the cuDNN frontend installed or not; returns
    the device the loader's check is given."""
    import torch

    from fluxserve.optimizations import fp8_attention

    def gpu(capability: tuple[int, int], frontend: bool = True):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some GPU")
        monkeypatch.setattr(fp8_attention, "cudnn_frontend_available", lambda: frontend)
        return torch.device("cuda:0")

    return gpu


@pytest.mark.parametrize("name,capability,words", [
    ("bf16-fp8attn", (8, 0), ["fp8 attention needs compute capability 9.0+", "has 8.0"]),
    ("bf16-fp8attn", (8, 9), ["fp8 attention needs compute capability 9.0+", "has 8.9"]),
    ("bf16-fp8attn-fp8row-fusedqkv-compile-regional", (8, 0), ["fp8 attention needs compute capability 9.0+"]),
    ("bf16-fp8", (8, 0), ["fp8 needs compute capability 8.9+", "has 8.0"]),
])
def test_the_loader_refuses_a_gpu_below_what_the_stack_needs(gpu_of, name, capability, words):
    from fluxserve.optimizations.apply import StackUnsupported, check_supported

    with pytest.raises(StackUnsupported) as error:
        check_supported(catalog_by_name()[name], gpu_of(capability))
    for word in [f"stack {name}", *words]:
        assert word in str(error.value)


def test_the_loader_accepts_fp8_linear_layers_on_ada(gpu_of):
    from fluxserve.optimizations.apply import check_supported

    check_supported(catalog_by_name()["bf16-cudnn-fp8row-fusedqkv-compile-regional-cudagraph"], gpu_of((8, 9)))


def test_an_fp8_attention_stack_says_what_the_gpu_lacks_before_loading_weights(gpu_of):
    import torch

    from fluxserve.optimizations.apply import StackUnsupported, check_supported

    with pytest.raises(StackUnsupported) as error:
        check_supported(Stack(attention="fp8attn"), gpu_of((9, 0), frontend=False))
    for word in ["pip install nvidia-cudnn-frontend", "build/requirements-gpu.txt"]:
        assert word in str(error.value)
    check_supported(Stack(attention="fp8attn"), torch.device("cpu"))  # emulated on the CPU


def test_parameters_with_a_bad_boolean_are_rejected():
    with pytest.raises(StackError, match="fuse_qkv"):
        Stack.from_parameters({"fuse_qkv": "yes"})


def test_parameters_with_a_fractional_interval_are_rejected():
    with pytest.raises(StackError, match="cache_interval"):
        Stack.from_parameters({"cache": "taylorseer", "cache_interval": "2.5"})


def test_parse_request_applies_limits_from_parameters():
    limits = Limits.from_parameters({"limit_max_steps": "8", "limit_max_size": "512"})
    request = {"PROMPT": np.array([b"hi"], np.object_)}
    with pytest.raises(InvalidInput, match=r"STEPS must be in \[1, 8\]"):
        parse_request({**request, "STEPS": np.array([9], np.int32)}, limits)
    with pytest.raises(InvalidInput, match="HEIGHT"):
        parse_request({**request, "HEIGHT": np.array([1024], np.int32)}, limits)
    parsed = parse_request({**request, "SEED": np.array([3], np.int64)}, Limits(default_size=512, max_size=512))
    assert (parsed.seed, parsed.steps, parsed.height, parsed.width) == (3, 28, 512, 512)


def test_max_pixels_limit_names_both_fields():
    limits = Limits(max_pixels=1024 * 1024)
    with pytest.raises(InvalidInput, match="HEIGHT x WIDTH must be at most 1048576"):
        parse_request({"PROMPT": np.array([b"hi"], np.object_), "HEIGHT": np.array([2048], np.int32)}, limits)


@pytest.mark.parametrize(
    "spec,words",
    [
        ("synthetic:huge", ["synthetic", "tiny, full"]),
        ("/no/such/folder", ["/no/such/folder", "model_index.json"]),
        ("not a source", ["neither"]),
    ],
)
def test_bad_weights_sources_name_what_was_expected(spec, words):
    with pytest.raises(WeightsError) as error:
        parse_source(spec)
    for word in words:
        assert word in str(error.value)


def test_folder_without_pipeline_is_rejected(tmp_path):
    with pytest.raises(WeightsError, match="model_index.json"):
        parse_source(str(tmp_path))


def test_readme_stack_table_matches_the_catalog():
    from fluxserve.repository import stack_table

    assert stack_table() in (ROOT / "README.md").read_text()


def test_a_cuda_graph_stack_fails_before_loading_weights_on_cpu():
    import torch

    from fluxserve.optimizations.apply import StackUnsupported, check_supported

    with pytest.raises(StackUnsupported, match="CUDA graphs need a CUDA GPU"):
        check_supported(Stack(cuda_graph=True), torch.device("cpu"))


PLANS = sorted((ROOT / "perf" / "plans").glob("*.txt"))


@pytest.mark.parametrize("plan", PLANS, ids=lambda path: path.name)
def test_gpu_plans_name_catalog_stacks_and_reload_what_they_measure(plan):
    from perf.plan import read_plan

    for shard in read_plan(plan):  # checks fields, catalog names, GPUs per line and placements
        assert shard.stacks[0] == "bf16"  # the baseline first: every ratio within one shard's GPUs
        assert set(shard.reload) <= set(shard.stacks)  # a second load follows a measured first


def planned(pattern: str) -> set[str]:
    from perf.plan import read_plan

    return {name for plan in PLANS if plan.match(pattern) for shard in read_plan(plan) for name in shard.stacks}


def test_the_plans_cover_the_catalog():
    catalog = catalog_by_name()
    assert planned("h200-x4-eager.txt") | planned("h200-x4-compile.txt") == {
        name for name, stack in catalog.items() if stack.gpus == 1}
    multi_gpu = {name for name, stack in catalog.items() if stack.gpus > 1}
    assert multi_gpu <= planned("h200-x[248]-*parallel*.txt") | planned("h200-x8-*.txt")


@pytest.mark.parametrize(
    "line,words",
    [
        ("stacks=bf16 gpus=0-1\nstacks=bf16 gpus=1-2", ["already serve another line"]),
        ("stacks=bf16,bf16-cp4 gpus=0-1", ["takes 4 GPUs", "has 2"]),
        ("stacks=bf16 speed=fast", ["fields are"]),
        ("stacks=bf16,bf16-nope", ["not in the catalog", "bf16-nope"]),
        ("stacks=bf16 gpus=0-3 concurrency=1,x", ["whole numbers"]),
        ("stacks=bf16,bf16-cp4 gpus=0-7 place=bf16-cp4=0-3,3-6", ["GPU 3 is given twice"]),
        ("stacks=bf16 gpus=0-7 place=bf16-cp4=0-3", ["names no stack of the line"]),
    ],
)
def test_a_plan_that_cannot_run_says_why(tmp_path, line, words):
    from perf.plan import PlanError, read_plan

    (tmp_path / "plan.txt").write_text(line + "\n")
    with pytest.raises(PlanError) as error:
        read_plan(tmp_path / "plan.txt")
    for word in words:
        assert word in str(error.value)


def test_lines_without_gpus_take_the_gpus_no_line_names(tmp_path):
    from perf.plan import read_plan

    (tmp_path / "plan.txt").write_text("stacks=bf16\nstacks=bf16,bf16-cp2 gpus=0-1 concurrency=1,2\nstacks=bf16\n")
    shards = read_plan(tmp_path / "plan.txt")
    assert [shard.gpus for shard in shards] == [(2,), (0, 1), (3,)]
    assert shards[1].concurrency == (1, 2) and shards[0].concurrency == (1,)
