"""What the activation quantization in front of the fastest stack's matmuls and attention costs, compiled, at
FLUX.1-dev's shapes, and what cheaper formulations of the same arithmetic would save.

perf.diagnostics.step_profile found Inductor's kernels that quantize a GELU's output per row before an fp8 matmul
taking 14 ms of a 88 ms step on the H200 (the single blocks' 279 us a call for 4608 x 15360 values, 4-6x what
their bytes need), and the per-tensor quantization of Q and K before fp8 attention about 8 ms. Suspects: the
GELU's tanh, which Inductor emits as libdevice's accurate tanhf and computes twice per value (once for the row's
absolute maximum, once to quantize), and the absolute maximum of Q and K, a reduction over the whole tensor
before any value can be cast. Each case is compiled alone with Inductor's defaults (as the stacks compile) and
timed as CUDA-event medians. Prints one JSON object (and writes it to `--out`).

    python3 -m perf.diagnostics.activation_quantization --out $OUT/activation_quantization.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch._inductor.config
from torch import nn

from fluxserve.fp8_attention import quantize_per_tensor
from fluxserve.optimize import apply_quantization

TOKENS, TEXT_TOKENS, DIM, MLP_DIM, HEADS, HEAD_DIM = 4096, 512, 3072, 12288, 24, 128


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


def gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written with a sigmoid: 0.5 x (1 + tanh(z)) = x sigmoid(2z), the same function."""
    x32 = x.float()
    return (x32 * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x32 + 0.044715 * x32 ** 3))).to(x.dtype)


ACTIVATIONS = {"none": lambda x: x, "gelu_tanh": gelu_tanh, "gelu_sigmoid": gelu_sigmoid}


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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding on (batch, tokens, heads, head_dim), pairs interleaved (as diffusers applies it)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def qk_amax(q, k, weight_q, weight_k, cos, sin):
    """Q and K as the fp8 attention stacks quantize them: RMSNorm, rotary, then per-tensor absolute maximum."""
    q, k = (rotate(nn.functional.rms_norm(t, (HEAD_DIM,), w, 1e-6), cos, sin)
            for t, w in ((q, weight_q), (k, weight_k)))
    return quantize_per_tensor(q), quantize_per_tensor(k)


def qk_bound(q, k, weight_q, weight_k, cos, sin):
    """The same values scaled by a bound known before they exist: after RMSNorm every head vector has norm at most
    sqrt(head_dim) max|weight|, which a rotation keeps, so no element exceeds it."""
    out = []
    for t, w in ((q, weight_q), (k, weight_k)):
        bound = w.detach().abs().amax().float() * math.sqrt(HEAD_DIM)
        multiplier = torch.exp2(torch.floor(torch.log2(448.0 / bound)))
        rotated = rotate(nn.functional.rms_norm(t, (HEAD_DIM,), w, 1e-6), cos, sin)
        out.append(((rotated.float() * multiplier).clamp(-448, 448).to(torch.float8_e4m3fn), multiplier.reciprocal()))
    return tuple(out)


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
        torch._inductor.config.__setattr__(key, type(getattr(torch._inductor.config, key))(int(value)))
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
            results[f"{case}/gelu_sigmoid"]["max_abs_diff_vs_tanh_activation"] = round(
                (gelu_sigmoid(hidden).float() - gelu_tanh(hidden).float()).abs().max().item(), 5)
        q, k = (torch.randn(1, tokens, HEADS, HEAD_DIM, device=cuda, dtype=bf16) * 3 for _ in range(2))
        weight_q, weight_k = (1 + 0.1 * torch.randn(HEAD_DIM, device=cuda, dtype=bf16) for _ in range(2))
        angles = torch.randn(tokens, 1, HEAD_DIM // 2, device=cuda).repeat_interleave(2, dim=-1)
        cos, sin = angles.cos(), angles.sin()
        operands = (q, k, weight_q, weight_k, cos, sin)
        for name, function in (("qk_amax", qk_amax), ("qk_bound", qk_bound)):
            compiled = torch.compile(function)
            (q8, descale_q), _ = compiled(*operands)
            dequantized = q8.float() * descale_q.reshape(())
            exact = rotate(nn.functional.rms_norm(q, (HEAD_DIM,), weight_q, 1e-6), cos, sin).float()
            results[name] = {"ms": device_ms(lambda: compiled(*operands), args.repeats),
                             "relative_error_q": round(((dequantized - exact).norm() / exact.norm()).item(), 5),
                             "descale_q": descale_q.reshape(()).item()}
            torch._dynamo.reset()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": tokens,
              "inductor": args.inductor,
              "results": results}
    print(json.dumps(report), flush=True)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(report, file, indent=1)


if __name__ == "__main__":
    main()
