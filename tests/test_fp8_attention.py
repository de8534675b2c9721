"""fp8 attention (fluxserve/optimizations/fp8_attention.py): its scales, its error against float32 attention at
ordinary and large magnitudes, its tracing by torch.compile, and the `fp8attn` stack through the real tritonserver (on CPU the
op runs its emulation of the cuDNN kernel's arithmetic; the cuDNN kernel itself is checked against that emulation
on the GPU by perf/diagnostics/fp8_attention.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers.models.transformers.transformer_flux import apply_rotary_emb

from fluxserve.optimizations.fp8_attention import (
    FP8,
    FP8_MAX,
    Fp8AttnProcessor,
    fp8_attention,
    quantize_per_tensor,
    rms_norm_bound,
)
from fluxserve.pipeline import build_pipeline
from fluxserve.stacks import Stack
from fluxserve.weights import parse_source
from test_serving import SAME_IMAGE_PSNR_DB, infer, info_of, output, psnr_db, unit_scale_model

FP8_ATTENTION_STACK = "bf16-fp8attn"


def reference_attention(query, key, value):
    """float32 attention of (batch, tokens, heads, head_dim) tensors."""
    q, k, v = (t.float().transpose(1, 2) for t in (query, key, value))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


def qkv(magnitude: float, seed: int = 0, shape=(1, 96, 4, 32)):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator) * magnitude).bfloat16() for _ in range(3)]


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 3e4])
def test_quantize_fits_the_range_with_an_exact_power_of_two(magnitude):
    x = qkv(magnitude)[0]
    quantized, descale = quantize_per_tensor(x)
    assert quantized.dtype == FP8 and descale.shape == (1, 1, 1, 1)
    values = quantized.float()
    assert torch.isfinite(values).all() and values.abs().max() <= FP8_MAX
    assert values.abs().max() > FP8_MAX / 2  # the largest power of two that fits: no range left unused
    assert torch.log2(descale).item() == round(torch.log2(descale).item())
    assert relative_error(values * descale, x.float()) < 0.05  # e4m3 keeps 3 mantissa bits


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 3e4])
def test_the_rms_norm_bound_holds_for_every_normalized_and_rotated_head(magnitude):
    # Q and K are scaled by a bound from the norms' weights instead of their measured maximum (no reduction over the
    # tensor): it must hold whatever the activations, also for a head whose energy sits in one element.
    generator = torch.Generator().manual_seed(1)
    norms = [torch.nn.RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)]
    for norm, scale in zip(norms, (0.3, 7.0), strict=True):
        norm.weight.data = (torch.randn(32, generator=generator) * scale).bfloat16()
    x = qkv(magnitude)[0]
    x[0, 0, 0] = 0
    x[0, 0, 0, 5] = magnitude  # one spike: that element carries the whole root mean square
    angles = torch.rand((96, 16), generator=generator) * 6.3
    rotary = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    heads = [apply_rotary_emb(norm(x), rotary, sequence_dim=1) for norm in norms]
    bound = rms_norm_bound(*norms)
    largest = max(head.float().abs().max().item() for head in heads)
    assert largest <= bound.item() * (1 + 2 ** -7)  # up to bf16's rounding (which saturates)
    assert largest >= bound.item() / 16  # and not so loose that it wastes e4m3's range
    for head in heads:
        quantized, descale = quantize_per_tensor(head, bound)
        assert torch.isfinite(quantized.float()).all()
        assert descale.item() >= quantize_per_tensor(head)[1].item()  # never a finer scale than the maximum's
        assert relative_error(quantized.float() * descale, head.float()) < 0.05


@pytest.mark.parametrize("value_magnitude", [1.0, 3e4])
def test_fp8_attention_error_is_fp8s_also_for_values_beyond_its_range(value_magnitude):
    # V at 3e4 lies far past e4m3's 448: unscaled it would saturate or turn into NaN; scaled, the error stays fp8's
    # ~6% of ordinary inputs.
    query, key, value = qkv(1.0)
    value = value * value_magnitude
    out = fp8_attention(query, key, value)
    assert out.dtype == torch.bfloat16 and out.shape == query.shape and torch.isfinite(out).all()
    assert relative_error(out, reference_attention(query, key, value)) < 0.08


def test_fp8_attention_of_huge_queries_and_keys_stays_finite_and_within_the_values():
    # Logits in the millions make softmax one-hot, and fp8's rounding of Q and K can then pick another key than
    # float32 would (fp8 attention is inexact where attention is sharp); it must still never overflow: every output
    # row is a weighted mean of V's rows.
    query, key, value = qkv(3e4)
    out = fp8_attention(query, key, value).float()
    assert torch.isfinite(out).all()
    assert out.abs().max() <= value.float().abs().max() * 1.07  # e4m3 rounds by at most 1/16


def test_fp8_attention_is_traced_by_torch_compile_as_one_op():
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    query, key, value = qkv(1.0)
    compiled = torch.compile(fp8_attention, backend=record, fullgraph=True)
    assert torch.equal(compiled(query, key, value), fp8_attention(query, key, value))
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert "fluxserve.fp8_attention.default" in targets, targets
    assert len(graphs) == 1  # the quantization around it is in the same graph, for Inductor to fuse


@pytest.mark.parametrize("fused", [False, True], ids=["separate-qkv", "fused-qkv"])
def test_the_processor_computes_diffusers_flux_attention_through_fp8(fused):
    # On the tiny model's random weights attention hardly moves the image, so the processor is checked where it
    # acts: each kind of FLUX attention (joint, with the text stream, and single), with and without fused
    # projections, against diffusers' own processor on inputs of ordinary magnitude.
    transformer = build_pipeline(Stack(), parse_source("synthetic:tiny"), torch.device("cpu")).pipe.transformer
    generator = torch.Generator().manual_seed(0)
    width = transformer.inner_dim
    image, text = (torch.randn((1, tokens, width), generator=generator).bfloat16() for tokens in (48, 16))
    rotary = transformer.pos_embed(torch.randn((64, 3), generator=generator))
    for attn, inputs in (
        (transformer.transformer_blocks[0].attn, dict(hidden_states=image, encoder_hidden_states=text)),
        (transformer.single_transformer_blocks[0].attn, dict(hidden_states=torch.cat([text, image], dim=1))),
    ):
        if fused:
            attn.fuse_projections()
        with torch.no_grad():
            expected = attn(**inputs, image_rotary_emb=rotary)
            attn.set_processor(Fp8AttnProcessor())
            actual = attn(**inputs, image_rotary_emb=rotary)
        for got, want in zip(*(o if isinstance(o, tuple) else (o,) for o in (actual, expected)), strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert 0.005 < relative_error(got, want.float()) < 0.08  # fp8's error, not bf16's and not a wrong result


def test_fp8_attention_stack_serves_through_the_fp8_kernel(server, test_repository, unit_scale_weights):
    # Both stacks on the unit-scale weights at 96x128, where attention shows in the image: on synthetic:tiny's, or at
    # 64x64, even attention that ignores the token positions (no rotary embedding) serves an image as close.
    fields = dict(SEED=5, STEPS=3, HEIGHT=96, WIDTH=128)
    with unit_scale_model(server, test_repository, unit_scale_weights, FP8_ATTENTION_STACK) as fp8_model, \
            unit_scale_model(server, test_repository, unit_scale_weights, "bf16") as bf16_model:
        fp8 = infer(server, fp8_model, outputs=("IMAGE", "INFO"), **fields)
        bf16 = infer(server, bf16_model, outputs=("IMAGE", "INFO"), **fields)
    info = info_of(fp8)
    assert info["stack"] == FP8_ATTENTION_STACK and info["weights"] == info_of(bf16)["weights"] == str(unit_scale_weights)
    assert info["attention_backend"] == "fp8 emulated (no GPU)" and info["steps_computed"] == 3
    assert "fluxserve::fp8_attention" in info["attention_kernel"], info["attention_kernel"]
    image, reference = output(fp8, "IMAGE"), output(bf16, "IMAGE")
    assert not np.array_equal(image, reference)  # fp8's rounding shows: attention did run through fp8
    similarity = psnr_db(image, reference)
    assert similarity > SAME_IMAGE_PSNR_DB, similarity  # fp8's rounding of attention, not another attention
