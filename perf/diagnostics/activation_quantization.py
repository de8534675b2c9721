"""What the activation quantization in front of the fastest stack's matmuls and attention costs, compiled, at
FLUX.1-dev's shapes, and what cheaper formulations of the same arithmetic would save.

perf.diagnostics.step_profile found Inductor's kernels that quantize a GELU's output per row before an fp8 matmul
taking 14 ms of a 88 ms step on the H200 (the single blocks' 279 us a call for 4608 x 15360 values, 4-6x what
their bytes need), and the per-tensor quantization of Q and K before fp8 attention about 8 ms. Suspects: the
GELU's tanh, which Inductor emits as libdevice's accurate tanhf and computes twice per value (once for the row's
absolute maximum, once to quantize), and the absolute maximum of Q and K, a reduction over the whole tensor
before any value can be cast. Each case is compiled alone with Inductor's defaults (as the stacks compile) and
timed as CUDA-event medians. `fused_kernel` cases run the same layers as `fluxserve.optimizations.fp8_rows.RowwiseFp8Linear`
(one hand-written kernel quantizes each row, GELU included); `quantize/*` time the quantization alone and
`matmul` the fp8 matmul alone, and `agreement` compares the kernel's e4m3 values and scales with torchao's own
quantization of the same GELU'd rows. Prints one JSON object (and writes it to `--out`).

    python3 -m perf.diagnostics.activation_quantization --out $OUT/activation_quantization.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch._inductor.config
from diffusers.models.transformers.transformer_flux import apply_rotary_emb
from torch import nn

from fluxserve.optimizations.activations import gelu_tanh_as_sigmoid
from fluxserve.optimizations.fp8_attention import quantize_per_tensor, rms_norm_bound
from fluxserve.optimizations.fp8_rows import FP8, RowwiseFp8Linear, quantize_rows
from fluxserve.optimizations.apply import apply_quantization
from perf.diagnostics.report import emit

TOKENS, TEXT_TOKENS, DIM, MLP_DIM, HEADS, HEAD_DIM = 4096, 512, 3072, 12288, 24, 128


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


ACTIVATIONS = {"none": lambda x: x, "gelu_tanh": gelu_tanh, "gelu_sigmoid": gelu_tanh_as_sigmoid}


class MlpOut(nn.Module):
    """A double block's feed-forward output: activation, then the fp8 matmul back to the model width."""

    def __init__(self, activation) -> None:
        super().__init__()
        self.activation, self.proj = activation, nn.Linear(MLP_DIM, DIM)

    def forward(self, hidden):
        return self.proj(self.activation(hidden))


class SingleOut(nn.Module):
    """A single block's output: attention's output beside the activated MLP, one fp8 matmul over both."""

    def __init__(self, activation) -> None:
        super().__init__()
        self.activation, self.proj = activation, nn.Linear(DIM + MLP_DIM, DIM)

    def forward(self, attention, hidden):
        return self.proj(torch.cat([attention, self.activation(hidden)], dim=-1))


class FusedMlpOut(nn.Module):
    """`MlpOut` as the stacks' `fuse_gelu_quant` runs it: the GELU inside `RowwiseFp8Linear`'s quantization kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(MLP_DIM, DIM)

    def forward(self, hidden):
        return self.proj(hidden)


class FusedSingleOut(FusedMlpOut):
    """`SingleOut` as `fuse_gelu_quant` runs it: the kernel reads the attention output and the MLP apart."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM + MLP_DIM, DIM)

    def forward(self, attention, hidden):
        return self.proj(attention, hidden)


def fused_kernel(module_class) -> nn.Module:
    module = module_class()
    nn.init.normal_(module.proj.weight, std=0.02)
    apply_quantization(module.to("cuda", torch.bfloat16), "fp8row")
    module.proj = RowwiseFp8Linear.from_torchao(module.proj)
    return module


def torchao_quantize_rows(x: torch.Tensor):
    """torchao's per-row quantization of GELU'd rows, the arithmetic its fp8row linears run on their input."""
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    x = gelu_tanh_as_sigmoid(x)
    scale = _choose_scale_float8(x, block_size=[1, x.shape[1]], float8_dtype=FP8)
    return _quantize_affine_float8(x, scale, FP8), scale


def normalized(x, norm, rotary):
    """FLUX's Q or K after its head's RMSNorm and the rotary embedding, as diffusers computes them."""
    return apply_rotary_emb(norm(x), rotary, sequence_dim=1)


def qk_amax(q, k, norm_q, norm_k, rotary):
    """Q and K scaled by their absolute maxima (a reduction over the tensor before any value is cast)."""
    return tuple(quantize_per_tensor(normalized(t, norm, rotary)) for t, norm in ((q, norm_q), (k, norm_k)))


def qk_bound(q, k, norm_q, norm_k, rotary):
    """Q and K as the fp8 attention stacks quantize them: scaled by a bound from their norms' weights."""
    return tuple(quantize_per_tensor(normalized(t, norm, rotary), rms_norm_bound(norm))
                 for t, norm in ((q, norm_q), (k, norm_k)))


def device_ms(call, repeats: int, inner: int = 10) -> float:
    """Median over `repeats` of the mean of `inner` back-to-back calls, CUDA events (the GPU stays busy)."""
    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return round(statistics.median(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.activation_quantization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inductor", action="append", default=[], metavar="OPTION=VALUE",
                        help="an Inductor config option for every case (repeatable), e.g. coordinate_descent_tuning=1")
    parser.add_argument("--out")
    args = parser.parse_args()
    for option in args.inductor:
        key, value = option.split("=", 1)
        setattr(torch._inductor.config, key, type(getattr(torch._inductor.config, key))(int(value)))
    torch.manual_seed(0)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    tokens = TOKENS + TEXT_TOKENS
    hidden = torch.randn(tokens, MLP_DIM, device=cuda, dtype=bf16) * 2
    attention = torch.randn(tokens, DIM, device=cuda, dtype=bf16)
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for case, module_class, inputs in (("mlp_out", MlpOut, (hidden,)), ("single_out", SingleOut, (attention, hidden))):
            for name, activation in ACTIVATIONS.items():
                module = module_class(activation).to(cuda, bf16)
                nn.init.normal_(module.proj.weight, std=0.02)
                apply_quantization(module, "fp8row")
                compiled = torch.compile(module)
                compiled(*inputs)
                results[f"{case}/{name}"] = {"ms": device_ms(lambda: compiled(*inputs), args.repeats)}
                torch._dynamo.reset()
            module = fused_kernel(FusedMlpOut if module_class is MlpOut else FusedSingleOut)
            compiled = torch.compile(module)
            compiled(*inputs)
            results[f"{case}/fused_kernel"] = {"ms": device_ms(lambda: compiled(*inputs), args.repeats)}
            torch._dynamo.reset()
            results[f"{case}/gelu_sigmoid"]["max_abs_diff_vs_tanh_activation"] = round(
                (gelu_tanh_as_sigmoid(hidden).float() - gelu_tanh(hidden).float()).abs().max().item(), 5)
        no_columns = hidden.new_empty((tokens, 0))
        quantized, scale = quantize_rows(no_columns, hidden)
        expected, expected_scale = torchao_quantize_rows(hidden)
        results["agreement"] = {
            "e4m3_values_equal": round((quantized.view(torch.uint8) == expected.view(torch.uint8)).float().mean().item(), 6),
            "e4m3_max_abs_diff": (quantized.float() - expected.float()).abs().max().item(),
            "scales_max_relative_diff": ((scale - expected_scale.reshape(scale.shape)).abs() / expected_scale.reshape(scale.shape)).max().item(),
        }
        torchao_compiled = torch.compile(torchao_quantize_rows)
        torchao_compiled(hidden)
        results["quantize/torchao_compiled"] = {"ms": device_ms(lambda: torchao_compiled(hidden), args.repeats)}
        results["quantize/kernel"] = {"ms": device_ms(lambda: quantize_rows(no_columns, hidden), args.repeats)}
        results["quantize/kernel_single_out"] = {"ms": device_ms(lambda: quantize_rows(attention, hidden),
                                                                 args.repeats)}
        weight = fused_kernel(FusedMlpOut).proj
        results["matmul"] = {"ms": device_ms(
            lambda: torch._scaled_mm(quantized, weight.weight.t(), scale_a=scale, scale_b=weight.weight_scale,
                                     bias=weight.bias, out_dtype=bf16, use_fast_accum=weight.use_fast_accum),
            args.repeats)}
        torch._dynamo.reset()
        q, k = (torch.randn(1, tokens, HEADS, HEAD_DIM, device=cuda, dtype=bf16) * 3 for _ in range(2))
        norm_q, norm_k = (nn.RMSNorm(HEAD_DIM, eps=1e-6).to(cuda, bf16) for _ in range(2))
        for norm in (norm_q, norm_k):
            norm.weight.data = 1 + 0.1 * torch.randn(HEAD_DIM, device=cuda, dtype=bf16)
        angles = torch.randn(tokens, HEAD_DIM // 2, device=cuda)
        rotary = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
        operands = (q, k, norm_q, norm_k, rotary)
        exact = normalized(q, norm_q, rotary).float()
        for name, function in (("qk_amax", qk_amax), ("qk_bound", qk_bound)):
            compiled = torch.compile(function)
            (q8, descale_q), _ = compiled(*operands)
            dequantized = q8.float() * descale_q.reshape(())
            results[name] = {"ms": device_ms(lambda: compiled(*operands), args.repeats),
                             "relative_error_q": round(((dequantized - exact).norm() / exact.norm()).item(), 5),
                             "descale_q": descale_q.reshape(()).item()}
            torch._dynamo.reset()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": tokens,
              "inductor": args.inductor,
              "results": results}
    emit(report, args.out)


if __name__ == "__main__":
    main()
