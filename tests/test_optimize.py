"""Optimizations applied in-process on CPU: what they change beyond the model they are applied to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, flux_transformer_inputs, unit_scale_flux_transformer

from fluxserve.contract import GenerationRequest
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import Stack
from fluxserve.weights import parse_source


# torchao's recommended Inductor options (torchao.quantization.utils.recommended_inductor_config_setter), which
# quantize_ would set process-wide: on the H200 they made compiled fp8 load 8x slower for no latency gain.
TORCHAO_INDUCTOR_OPTIONS = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions",
                            "force_fuse_int_mm_with_mul")


def test_a_quantized_compiled_stack_compiles_with_inductors_defaults_and_leaves_them_unchanged(monkeypatch):
    import torch._inductor.config as inductor

    compiled_with = []
    compile_ = torch.compile

    def recording_compile(*args, **kwargs):
        compiled_with.append(kwargs.get("options"))
        return compile_(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    before = {name: getattr(inductor, name) for name in TORCHAO_INDUCTOR_OPTIONS}
    assert not any(before.values())  # Inductor's defaults
    stack = Stack(quantization="int8", compile="regional")
    request = GenerationRequest(prompt="a lighthouse", seed=3, steps=2, guidance=3.5, height=64, width=64)
    pipeline = build_pipeline(stack, parse_source("synthetic:tiny"), torch.device("cpu"), request)
    generation = pipeline.generate(request)
    assert generation.image.shape == (64, 64, 3) and generation.steps_computed == 2
    assert pipeline.compile_stats["graphs"] >= 1
    assert compiled_with and not any(compiled_with)  # every block, no options
    assert {name: getattr(inductor, name) for name in TORCHAO_INDUCTOR_OPTIONS} == before


def test_compile_loads_diagnostic_loads_each_variant_cold_then_from_its_warm_caches(tmp_path):
    """compile_loads.sh runs perf.diagnostics.compile_load twice: its report (phases, what was compiled and what the
    caches served, latencies) is checked here too."""
    variant = "bf16-compile-regional --weights synthetic:tiny --size 64 --steps 2 --requests 1"
    done = subprocess.run(["bash", "perf/diagnostics/compile_loads.sh", str(tmp_path), variant], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=1500)  # a hang guard: two compiled loads, 3x slower than on 2 CI cores
    assert done.returncode == 0, done.stderr[-2000:]
    cold, warm = (json.loads(line) for line in (tmp_path / "loads.jsonl").read_text().splitlines())
    assert (cold["variant"], cold["caches"], warm["caches"]) == (variant, "cold", "warm")
    assert cold["inductor_cache"] == warm["inductor_cache"] == str(tmp_path / "cache-1")
    assert cold["compile_stats"]["inductor_cache_misses"] >= 1 and cold["compile_stats"]["inductor_cache_hits"] == 0
    assert warm["compile_stats"]["inductor_cache_hits"] == cold["compile_stats"]["graphs"]
    assert warm["compile_stats"]["inductor_cache_misses"] == 0
    for report in (cold, warm):
        assert report["stack"] == "bf16-compile-regional" and report["aot_packages"] == "(default)"  # packages off
        assert report["compile_stats"]["graphs"] >= 1 and report["compile_stats"]["aot_blocks_loaded"] == 0
        assert list(report["load_phases_s"]) == ["artifacts", "weights", "stack", "warm_up", "kernel_check"]
        assert len(report["latencies_s"]) == 1 and report["steps_computed"] == 2


def test_fused_qkv_drops_the_separate_projections_and_computes_the_same_image(unit_scale_weights):
    from fluxserve.optimizations.apply import SEPARATE_PROJECTIONS

    # On the unit-scale weights at 96x128, where every projection shows in the image: on synthetic:tiny's a fused
    # weight with Q and K in each other's place makes the same image.
    weights = parse_source(str(unit_scale_weights))
    request = GenerationRequest(prompt="a lighthouse", seed=3, steps=3, guidance=3.5, height=96, width=128)
    separate = build_pipeline(Stack(), weights, torch.device("cpu"))
    fused = build_pipeline(Stack(fuse_qkv=True), weights, torch.device("cpu"))

    def parameters(pipeline, kind):
        return {name: p.numel() for name, p in pipeline.pipe.transformer.named_parameters()
                if name.split(".")[-2] in kind}

    dropped = parameters(separate, SEPARATE_PROJECTIONS)
    assert dropped and not parameters(fused, SEPARATE_PROJECTIONS)
    assert sum(parameters(fused, ("to_qkv", "to_added_qkv")).values()) == sum(dropped.values())
    image_separate, image_fused = (p.generate(request).image.astype(int) for p in (separate, fused))
    difference = abs(image_separate - image_fused).max()
    assert difference <= 2, difference  # 8-bit pixels: the fused matmul may round differently (Q and K swapped: 37)


def test_quantization_covers_the_blocks_linears_and_leaves_the_top_level_layers_bf16():
    from fluxserve.optimizations.apply import UNQUANTIZED_TOP_LEVEL

    transformer = build_pipeline(Stack(quantization="int8"), parse_source("synthetic:tiny"),
                                 torch.device("cpu")).pipe.transformer
    linears = {name: type(m.weight).__name__ for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    top_level = {name: kind for name, kind in linears.items() if name.split(".")[0] in UNQUANTIZED_TOP_LEVEL}
    in_blocks = {name: kind for name, kind in linears.items() if name not in top_level}
    assert set(top_level.values()) == {"Parameter"} and len(top_level) >= len(UNQUANTIZED_TOP_LEVEL)
    assert set(in_blocks.values()) == {"Int8Tensor"}  # torchao's, every one of them
    assert any(name.startswith("single_transformer_blocks.") and name.endswith("proj_out") for name in in_blocks)


def test_sigmoid_gelu_computes_the_tanh_gelu_in_every_block():
    from diffusers.models.activations import GELU

    from fluxserve.optimizations.apply import apply_sigmoid_gelu, gelu_tanh_as_sigmoid

    x = torch.linspace(-12, 12, 10001)
    assert (gelu_tanh_as_sigmoid(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() < 1e-5
    transformer = unit_scale_flux_transformer()
    inputs = flux_transformer_inputs(transformer)
    with torch.no_grad():
        expected = transformer(**inputs)[0].float()
        apply_sigmoid_gelu(transformer)
        actual = transformer(**inputs)[0].float()
    gelus = [m for m in transformer.modules() if isinstance(m, (GELU, torch.nn.GELU))]
    replaced = [m for m in gelus if gelu_tanh_as_sigmoid in (m.__dict__.get("gelu"), m.__dict__.get("forward"))]
    assert gelus and replaced == gelus  # the feed-forwards' (diffusers' GELU) and the single blocks' (torch's)
    assert ((actual - expected).norm() / expected.norm()).item() < 0.01  # bf16 rounding, not another function


def test_quantized_linear_diagnostic_times_each_quantization_or_says_why_it_cannot():
    done = subprocess.run(
        [sys.executable, "-m", "perf.diagnostics.quantized_linear", "--shape", "32,64,128", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,  # a hang guard, 3x slower than CI
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reports = {r["quantization"]: r for r in map(json.loads, done.stdout.strip().splitlines())}
    assert list(reports) == ["none", "fp8", "fp8row", "int8"]
    assert reports["none"]["vs_bf16"] == 1.0 and reports["int8"]["ms"] > 0
    matmul_ms = reports["int8"]["matmul_ms"]
    assert set(matmul_ms) == {"torchao_safe_int_mm", "int_mm_column_major", "int_mm_row_major", "float32_mm"}
    assert all(isinstance(ms, float) and ms > 0 for ms in matmul_ms.values()), matmul_ms
    assert "compute capability" in reports["fp8"]["error"]  # torchao's own check, on this CPU-only machine


def test_step_cost_diagnostic_times_computed_and_skipped_forwards_apart():
    done = subprocess.run(
        [sys.executable, "-m", "perf.diagnostics.step_cost", "--stacks", "bf16-taylorseer-interval3",
         "--weights", "synthetic:tiny", "--size", "64", "--steps", "8", "--requests", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,  # a hang guard, 3x slower than CI
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["stack"] == "bf16-taylorseer-interval3"
    # Interval 3 after 3 warm-up steps computes steps 0, 1, 2, 4 and 7 of 8 (the last always): 5 per request.
    assert (report["computed"], report["skipped"]) == (2 * 5, 2 * 3)
    assert 0 < report["skipped_ms_median"] < report["computed_ms_median"]
    assert report["skipped_vs_computed"] == round(report["skipped_ms_median"] / report["computed_ms_median"], 4)


def test_step_profile_diagnostic_reports_a_step_by_kernel_family_and_matmul_shape(tmp_path):
    from perf.diagnostics.step_profile import family

    assert family("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_ovscale_bias_TNT") == "matmul"
    assert family("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f8_knob_32") == "attention"
    assert family("triton_red_fused__fused_rms_norm_split_view_7") == "inductor_reduction"
    assert family("triton_poi_fused_add_cat_mul_split_unsqueeze_view_8") == "inductor_pointwise"
    out = tmp_path / "profile.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "perf.diagnostics.step_profile", "--stacks", "bf16", "--weights", "synthetic:tiny",
         "--size", "64", "--steps", "2", "--profiled-steps", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,  # a hang guard, 3x slower than CI
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["stack"] == "bf16" and report["denoise_ms_per_step"] > 0 and report["as_served"]["wall_ms_per_step"] > 0
    # No CUDA here, so no kernels; the matmuls are still seen by op and input shape (x_embedder: 16 tokens x 64).
    assert report["device_ms_per_step"] == 0 and report["matmuls_by_shape"]
    assert any("[16, 64]" in row["shapes"] for row in report["matmuls_by_shape"])


def test_step_cost_diagnostic_refuses_a_stack_without_a_step_cache():
    done = subprocess.run([sys.executable, "-m", "perf.diagnostics.step_cost", "--stacks", "bf16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a step-cache stack: bf16; allowed: " in done.stderr


# --- host reads in the denoising loop -------------------------------------------------------------------------
# On a GPU every read of a tensor's value into Python (.item(), bool(), .tolist(), .cpu(), ...) waits for all the
# work queued before it, so the host stops running ahead of the device. Seen from Python on CPU: a torch function
# mode records each such call during the loop (syncs inside C++ kernels are out of its sight).
HOST_READS = {"item", "__bool__", "tolist", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero"}


class HostReads(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def host_reads_per_request(stack: Stack, steps: int) -> list[str]:
    request = GenerationRequest(prompt="a lighthouse", seed=0, steps=steps, guidance=3.5, height=64, width=64)
    pipeline = build_pipeline(stack, parse_source("synthetic:tiny"), torch.device("cpu"), request)
    embeddings = pipeline._encode(request.prompt)
    with torch.inference_mode(), HostReads() as reads:
        pipeline._denoise(embeddings, request, should_stop=None)
    return reads.calls


@pytest.mark.parametrize("stack", [Stack(), Stack(dtype="fp16"), Stack(fuse_qkv=True)], ids=lambda s: s.name)
def test_an_uncached_denoising_loop_reads_nothing_back_from_the_device(stack):
    assert host_reads_per_request(stack, steps=4) == []


@pytest.mark.parametrize("stack", [
    Stack(cache="fbcache", cache_threshold=0.3), Stack(cache="teacache", cache_threshold=0.4),
    Stack(cache="magcache", cache_threshold=0.06), Stack(cache="taylorseer", cache_interval=3),
], ids=lambda s: s.name)
def test_a_step_cache_reads_back_at_most_its_one_decision_per_step(stack):
    reads = host_reads_per_request(stack, steps=4)
    assert len(reads) <= 4 and set(reads) <= {"item", "__bool__"}, reads
