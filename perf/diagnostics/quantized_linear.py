"""Eager time of one linear layer quantized as the stacks quantize it, against bf16, at FLUX.1-dev's shapes.

On the H200 eager torchao fp8 ran twice as slow as bf16 and eager int8 eight times (perf/results/h200): this
times single layers, without the model around them, to show which layer shapes pay and how much. For int8 it also
times the matmul alone in the layouts that matter, to tell the suspects apart: torchao's eager int8 matmul
(torchao.kernel.intmm.safe_int_mm) silently falls back to a float32 matmul when `torch._int_mm` raises, and
before calling it copies the transposed weight to row-major, a layout cuBLAS serves with slower int8 kernels
than the column-major one it prefers (pytorch/pytorch#187094). Prints one JSON line per shape and quantization.

    python3 -m perf.diagnostics.quantized_linear
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from fluxserve.optimizations.apply import apply_quantization
from fluxserve.pipeline import finished_time

# (what, tokens, in features, out features): a double block's fused QKV, a single block's MLP input, a block's
# modulation (one row per image, so tokens = 1).
FLUX_SHAPES = (("fused qkv", 4608, 3072, 9216), ("mlp in", 4608, 3072, 12288), ("modulation", 1, 3072, 18432))


def parse_shape(text: str) -> tuple[str, int, int, int]:
    tokens, in_features, out_features = (int(part) for part in text.split(","))
    return text, tokens, in_features, out_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.quantized_linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, action="append", metavar="TOKENS,IN,OUT",
                        help="a layer shape (repeatable); default: FLUX.1-dev's")
    parser.add_argument("--quantizations", default="none,fp8,fp8row,int8")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per layer (default 20)")
    return parser.parse_args(argv)


def median_ms(call, device: torch.device, repeats: int) -> float:
    """Median time of `call` after one untimed call, each timed to the device finishing it."""
    call()
    times = []
    for _ in range(repeats):
        started = finished_time(device)
        call()
        times.append(finished_time(device) - started)
    return statistics.median(times) * 1e3


def int8_matmul_ms(tokens: int, in_features: int, out_features: int, device: torch.device,
                   repeats: int) -> dict[str, float | str]:
    """Median ms of the int8 matmul alone: as torchao calls it, `torch._int_mm` with each weight layout, and the
    float32 matmul torchao falls back to; an error message where `torch._int_mm` raises."""
    from torchao.kernel.intmm import safe_int_mm

    a = torch.randint(-128, 128, (tokens, in_features), dtype=torch.int8, device=device)
    weight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, device=device)
    calls = {
        "torchao_safe_int_mm": lambda: safe_int_mm(a, weight.t()),  # the layout torchao's int8 linear passes
        "int_mm_column_major": lambda: torch._int_mm(a, weight.t()),
        "int_mm_row_major": lambda: torch._int_mm(a, weight.t().contiguous()),
        "float32_mm": lambda: torch.mm(a.float(), weight.t().float()),
    }
    timings = {}
    for what, call in calls.items():
        try:
            timings[what] = round(median_ms(call, device, repeats), 4)
        except RuntimeError as error:
            timings[what] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return timings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for what, tokens, in_features, out_features in args.shape or FLUX_SHAPES:
        x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device=device)
        bf16_ms = None
        for quantization in args.quantizations.split(","):
            report = {"shape": what, "tokens": tokens, "in": in_features, "out": out_features,
                      "quantization": quantization, "device": str(device)}
            layer = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16,
                                                        device=device))
            try:
                if quantization != "none":
                    apply_quantization(layer, quantization)
                with torch.inference_mode():
                    ms = median_ms(lambda: layer(x), device, args.repeats)
            except Exception as error:  # noqa: BLE001 - a quantization this device lacks is a result, not a crash
                report["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            else:
                if quantization == "none":
                    bf16_ms = ms
                report["ms"] = round(ms, 4)
                report["vs_bf16"] = round(ms / bf16_ms, 2) if bf16_ms else None
            if quantization == "int8":
                report["matmul_ms"] = int8_matmul_ms(tokens, in_features, out_features, device, args.repeats)
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
