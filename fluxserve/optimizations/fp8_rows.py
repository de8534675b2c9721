"""Per-row fp8 linears whose input is quantized by one hand-written kernel that reads each row once, GELU included.

torchao's `fp8row` quantizes a linear's input per row inside the linear: under torch.compile, Inductor fuses the
row's absolute maximum and the cast (and the GELU before them) into kernels that read the row twice and, on the
H200, take 3-6x the time their bytes need: the single blocks' output quantization alone took 257 us a call, about
10 ms of a 93 ms step (perf.diagnostics.step_profile). FLUX's rows are at most 15360 values (30 KB in bf16): one
Triton program holds a whole row in registers, so `quantize_rows` reads it once, from two tensors side by side
(the single blocks' attention output and MLP, which diffusers first concatenates, a copy of every value), applies
GELU's tanh approximation to the second, and writes e4m3 values and the row's scale. On the H200 a single block's
output layer went from 0.535 to 0.425 ms and the served fastest stack from 1.90x to 2.01x bf16 (perf/results/h200,
session 10).

The arithmetic is torchao's (`_choose_scale_float8` and `_quantize_affine_float8` at per-row granularity): scale
= the row's absolute maximum / 448 rounded to bf16, values divided by it, saturated to +-448 and rounded to
nearest; the GELU is `activations.gelu_tanh_as_sigmoid`, rounded to bf16 as the layer before would return it. One
deliberate difference: a row of zeros gets scale 1 (torchao divides by 0). The weights stay torchao's: a
`RowwiseFp8Linear` takes over a torchao-quantized linear's e4m3 weight and per-row scales and multiplies with
`torch._scaled_mm`, the call torchao itself makes.

Written here because no maintained library has it: torchao's kernels quantize without an activation, and its
Triton quantization kernels are for training layouts. The kernel is a `torch.library.triton_op`, which compiled
code launches like its own kernels; off the GPU the same arithmetic runs in PyTorch, so tests can check it.
"""

from __future__ import annotations

import functools

import torch

from .activations import GELU_TANH_COEFFICIENT, GELU_TANH_SLOPE, gelu_tanh_as_sigmoid
from .fp8_attention import FP8, FP8_MAX

MAX_COLUMNS = 32768  # one program holds a row: twice FLUX's widest (15360 values); wider rows are refused
WARPS = (4, 8, 16, 32)  # tried per row width on first use


def quantize_rows_reference(plain: torch.Tensor, activated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` in PyTorch: what the kernel computes, on any device."""
    rows = torch.cat([plain, gelu_tanh_as_sigmoid(activated)], dim=1)
    scale = (rows.abs().amax(dim=1, keepdim=True) / FP8_MAX).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def _kernel():
    """The Triton kernel, built on first use (Triton is imported only on a GPU)."""
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({}, num_warps=warps) for warps in WARPS],
                     key=["plain_columns", "activated_columns"])
    @triton.jit
    def quantize_rows_kernel(plain_ptr, activated_ptr, q_ptr, scale_ptr, plain_columns, activated_columns,
                             plain_stride, activated_stride, slope: tl.constexpr, coefficient: tl.constexpr,
                             fp8_max: tl.constexpr, PLAIN_BLOCK: tl.constexpr, ACTIVATED_BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        q_row = q_ptr + row * (plain_columns + activated_columns)
        plain_offsets = tl.arange(0, PLAIN_BLOCK)
        plain_inside = plain_offsets < plain_columns
        plain = tl.load(plain_ptr + row * plain_stride + plain_offsets, mask=plain_inside, other=0.0).to(tl.float32)
        offsets = tl.arange(0, ACTIVATED_BLOCK)
        inside = offsets < activated_columns
        x = tl.load(activated_ptr + row * activated_stride + offsets, mask=inside, other=0.0).to(tl.float32)
        activated = (x * tl.sigmoid(slope * (x + coefficient * x * x * x))).to(tl.bfloat16).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(plain), axis=0), tl.max(tl.abs(activated), axis=0))
        scale = (amax / fp8_max).to(tl.bfloat16).to(tl.float32)
        scale = tl.where(scale == 0.0, 1.0, scale)
        tl.store(q_row + plain_offsets, tl.clamp(plain / scale, -fp8_max, fp8_max).to(tl.float8e4nv), mask=plain_inside)
        tl.store(q_row + plain_columns + offsets, tl.clamp(activated / scale, -fp8_max, fp8_max).to(tl.float8e4nv),
                 mask=inside)
        tl.store(scale_ptr + row, scale)

    return quantize_rows_kernel


@torch.library.triton_op("fluxserve::quantize_rows", mutates_args=())
def quantize_rows(plain: torch.Tensor, activated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows made of `plain`'s beside `activated`'s after GELU (bf16 matrices, same rows; `plain` may have no
    columns) -> the rows in e4m3, (rows, columns), and their float32 scales, (rows, 1).

    A `triton_op`: compiled code launches the kernel itself, as it launches its own; a plain custom op went
    through Python's dispatch on every call, which a step cache's eager steps (no CUDA graph) paid for."""
    for name, x in (("plain", plain), ("activated", activated)):
        if x.dim() != 2 or x.dtype != torch.bfloat16 or (x.shape[1] > 1 and x.stride(1) != 1):
            raise ValueError(f"quantize_rows: {name} must be a bf16 matrix with contiguous rows; got {x.dtype} "
                             f"{tuple(x.shape)} strides {x.stride()}")
    if plain.shape[0] != activated.shape[0] or max(plain.shape[1], activated.shape[1]) > MAX_COLUMNS:
        raise ValueError(f"quantize_rows: plain and activated must have the same rows and at most {MAX_COLUMNS} "
                         f"columns each; got {tuple(plain.shape)} and {tuple(activated.shape)}")
    if activated.device.type != "cuda":
        return quantize_rows_reference(plain, activated)
    rows, columns = activated.shape[0], plain.shape[1] + activated.shape[1]
    quantized = torch.empty((rows, columns), dtype=FP8, device=activated.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=activated.device)
    if rows:
        torch.library.wrap_triton(_kernel())[(rows,)](
            plain, activated, quantized, scale, plain.shape[1], activated.shape[1], plain.stride(0),
            activated.stride(0), slope=GELU_TANH_SLOPE, coefficient=GELU_TANH_COEFFICIENT, fp8_max=FP8_MAX,
            PLAIN_BLOCK=_block(plain.shape[1]), ACTIVATED_BLOCK=_block(activated.shape[1]))
    return quantized, scale


def _block(columns: int) -> int:
    """The kernel's block for a row part: the next power of two, at least 16 (Triton's smallest tile)."""
    return max(16, 1 << (columns - 1).bit_length())


class RowwiseFp8Linear(torch.nn.Module):
    """A linear layer with e4m3 weights scaled per output row, whose input rows `quantize_rows` quantizes: the
    rows of its inputs side by side, GELU applied to the last (`FeedForward`'s output layer takes one input, the
    single blocks' `proj_out` two). torchao's fp8row arithmetic with one pass over the input."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 use_fast_accum: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (out_features, in_features), e4m3
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float().contiguous())
        self.register_buffer("bias", bias)
        self.use_fast_accum = use_fast_accum

    @classmethod
    def from_torchao(cls, linear: torch.nn.Linear) -> RowwiseFp8Linear:
        """Take over a linear that torchao quantized with `fp8row` (its Float8Tensor weight: e4m3 values and one
        scale per output row)."""
        weight = linear.weight
        if (getattr(weight, "qdata", None) is None or weight.qdata.dtype != FP8
                or weight.scale.numel() != weight.shape[0] or weight.mm_config is None):
            raise TypeError(f"RowwiseFp8Linear takes a linear quantized by torchao fp8row; its weight is {type(weight)}")
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight.qdata, weight.scale, bias, weight.mm_config.use_fast_accum)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """`inputs`: one or two tensors (..., columns) with the same leading shape; GELU applies to the last."""
        *plain, activated = (x.reshape(-1, x.shape[-1]) for x in inputs)
        plain = plain[0] if plain else activated.new_empty((activated.shape[0], 0))
        quantized, scale = quantize_rows(plain.contiguous(), activated.contiguous())
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=activated.dtype, use_fast_accum=self.use_fast_accum)
        return out.reshape(*inputs[-1].shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


def single_block_forward(block, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         temb: torch.Tensor, image_rotary_emb=None, joint_attention_kwargs=None):
    """diffusers' `FluxSingleTransformerBlock.forward` (bf16) for a block whose `proj_out` is a `RowwiseFp8Linear`
    and whose `act_mlp` moved into it: the attention output and the MLP's pre-activation go to `proj_out` apart,
    where diffusers concatenates them first, a copy of all 4608 x 15360 values (about 70 us of a single block's
    output on the H200, perf.diagnostics.activation_quantization)."""
    text_tokens = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    normalized, gate = block.norm(hidden_states, emb=temb)
    attention = block.attn(hidden_states=normalized, image_rotary_emb=image_rotary_emb,
                           **(joint_attention_kwargs or {}))
    hidden_states = hidden_states + gate.unsqueeze(1) * block.proj_out(attention, block.proj_mlp(normalized))
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]
