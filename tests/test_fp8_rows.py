"""The per-row fp8 linears with GELU fused into their input's quantization (fluxserve.optimizations.fp8_rows), on the
CPU: the op's PyTorch path against torchao's own quantization arithmetic, and FLUX's blocks rewired around it. The Triton
kernel itself runs only on a GPU: perf.diagnostics.activation_quantization compares it with torchao's there."""

import pytest
import torch

from fluxserve.optimizations.activations import gelu_tanh_as_sigmoid
from fluxserve.optimizations.fp8_rows import FP8, RowwiseFp8Linear, quantize_rows
from fluxserve.stacks import Stack, StackError

from conftest import flux_transformer_inputs, unit_scale_flux_transformer


def torchao_rows(rows: torch.Tensor):
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    scale = _choose_scale_float8(rows, block_size=[1, rows.shape[1]], float8_dtype=FP8)
    return _quantize_affine_float8(rows, scale, FP8), scale


def test_quantize_rows_is_torchaos_per_row_arithmetic_on_the_gelu_of_its_second_input():
    generator = torch.Generator().manual_seed(0)
    plain = torch.randn((6, 24), generator=generator).bfloat16()
    activated = (torch.randn((6, 40), generator=generator) * 3).bfloat16()
    quantized, scale = quantize_rows(plain, activated)
    expected, expected_scale = torchao_rows(torch.cat([plain, gelu_tanh_as_sigmoid(activated)], dim=1))
    assert quantized.dtype == FP8 and quantized.shape == (6, 64) and scale.shape == (6, 1)
    assert torch.equal(quantized.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale, expected_scale.reshape(6, 1))


def test_quantize_rows_scales_large_magnitudes_and_zero_rows_without_inf_or_nan():
    activated = torch.zeros((3, 32), dtype=torch.bfloat16)
    activated[1] = torch.linspace(-3e4, 3e4, 32)
    activated[2, 5] = 1e-3
    quantized, scale = quantize_rows(activated.new_empty((3, 0)), activated)
    assert torch.isfinite(quantized.float()).all() and torch.isfinite(scale).all()
    assert scale[0].item() == 1.0 and (quantized[0].float() == 0).all()  # torchao would divide by 0 here
    dequantized = quantized.float() * scale
    reference = gelu_tanh_as_sigmoid(activated).float()
    assert torch.allclose(dequantized[1], reference[1], rtol=0.07)  # e4m3 keeps 3 bits of mantissa
    assert dequantized[1].abs().max() == pytest.approx(3e4, rel=0.01)


def test_quantize_rows_names_what_it_refuses():
    with pytest.raises(ValueError, match="bf16 matrix"):
        quantize_rows(torch.zeros((2, 0), dtype=torch.bfloat16), torch.zeros((2, 4)))
    with pytest.raises(ValueError, match="same rows"):
        quantize_rows(torch.zeros((3, 2), dtype=torch.bfloat16), torch.zeros((2, 4), dtype=torch.bfloat16))


def test_fuse_gelu_quant_needs_per_row_fp8():
    with pytest.raises(StackError, match="fuse_gelu_quant.*fp8row"):
        Stack(quantization="fp8", fuse_gelu_quant=True)
    assert "fusedgelu" in Stack(quantization="fp8row", fuse_gelu_quant=True).name


def quantize_as_torchao(linear: torch.nn.Linear) -> None:
    """What torchao's fp8row leaves in a linear (its Float8Tensor weight), built here since torchao's quantize_
    refuses a machine without an fp8 GPU."""
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    weight = Float8Tensor.from_hp(linear.weight.detach(), granularity=PerRow(),
                                  mm_config=Float8MMConfig(use_fast_accum=True))
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)


def test_fused_gelu_quantization_keeps_every_block_computing_flux():
    from fluxserve.optimizations.apply import apply_fused_gelu_quantization

    transformer = unit_scale_flux_transformer()
    outputs = [linear for block in transformer.transformer_blocks for linear in (block.ff.net[2], block.ff_context.net[2])]
    outputs += [block.proj_out for block in transformer.single_transformer_blocks]
    for linear in outputs:  # the reference runs the same e4m3 weights, dequantized, on unquantized activations
        quantize_as_torchao(linear)
    inputs = flux_transformer_inputs(transformer)
    with torch.no_grad():
        for linear in outputs:
            linear.weight = torch.nn.Parameter(linear.weight.dequantize(torch.bfloat16), requires_grad=False)
        expected = transformer(**inputs)[0].float()
        for linear in outputs:
            quantize_as_torchao(linear)
        apply_fused_gelu_quantization(transformer)
        fused = transformer(**inputs)[0].float()
    assert all(isinstance(block.ff.net[2], RowwiseFp8Linear) and isinstance(block.ff.net[0], torch.nn.Linear)
               for block in transformer.transformer_blocks)
    assert all(isinstance(block.proj_out, RowwiseFp8Linear) and not hasattr(block, "act_mlp")
               for block in transformer.single_transformer_blocks)
    error = ((fused - expected).norm() / expected.norm()).item()
    assert error < 0.05, error  # e4m3 activations; a GELU lost or applied to the attention output is far off
