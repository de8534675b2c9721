"""fp8 attention at FLUX's shape on one GPU: the cuDNN kernel against its float32 emulation and float32 attention,
its behaviour on inputs beyond e4m3's range, and its time beside bf16 cuDNN SDPA (the fast stacks' kernel).

Times are CUDA-event medians of `--repeats` calls after warm-up: the op alone on pre-quantized inputs (also
replayed as a CUDA graph: the device's time without the host's), the whole `fp8_attention` (quantize, op,
dequantize) eager and under torch.compile (where Inductor fuses the quantization), and bf16 SDPA with cuDNN; and
the host's time per call. Prints one JSON object (and writes it to `--out`).

    python3 -m perf.diagnostics.fp8_attention --out $OUT/fp8_attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fluxserve.optimizations.fp8_attention import (emulated_fp8_attention, fp8_attention, fp8_attention_op,
                                                   quantized_operands)

FLUX_SHAPE = (1, 4608, 24, 128)  # 1024x1024: 4096 image + 512 text tokens, 24 heads of 128


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return round(((actual.float() - expected.float()).norm() / expected.float().norm()).item(), 5)


def reference(query, key, value) -> torch.Tensor:
    q, k, v = (t.float().transpose(1, 2) for t in (query, key, value))
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def bf16_cudnn(query, key, value) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)


def median_ms(function, repeats: int) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 4)


def cuda_graph_of(function):
    """`function` captured as a CUDA graph: replaying it times the device's work alone, without host overhead."""
    function()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return graph.replay


def host_ms(function, calls: int = 200) -> float:
    """Host time per call, the device left to queue the work: what a stack without a CUDA graph pays per
    attention on the host, which the device waits for once it is the longer of the two."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return round(elapsed / calls * 1e3, 4)


def accuracy(query, key, value) -> dict:
    """The cuDNN kernel against its emulation (same arithmetic) and both against float32 attention."""
    operands = quantized_operands(query, key, value)
    kernel, emulated = fp8_attention_op(*operands).float(), emulated_fp8_attention(*operands).float()
    expected = reference(query, key, value)
    out = fp8_attention(query, key, value)
    return {
        "finite": bool(torch.isfinite(out).all()),
        "max_abs_over_max_abs_value": round((out.float().abs().max() / value.float().abs().max()).item(), 4),
        "kernel_vs_emulation_fp8_steps": relative_error(kernel, emulated),
        "fp8_attention_vs_float32": relative_error(out, expected),
        "bf16_cudnn_vs_float32": relative_error(bf16_cudnn(query, key, value), expected),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.fp8_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_attention diagnostic: needs a CUDA GPU (compute capability 9.0+)")
    import cudnn

    device = torch.device("cuda:0")
    generator = torch.Generator(device).manual_seed(0)
    query, key, value = (torch.randn(FLUX_SHAPE, generator=generator, device=device, dtype=torch.bfloat16)
                         for _ in range(3))
    result = {
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "cudnn_backend": torch.backends.cudnn.version(), "cudnn_frontend": getattr(cudnn, "__version__", None),
        "shape_bshd": FLUX_SHAPE,
        "accuracy": {
            "normal": accuracy(query, key, value),
            "values_times_3e4": accuracy(query, key, value * 3e4),
            "all_times_3e4": accuracy(query * 3e4, key * 3e4, value * 3e4),
        },
    }
    op_args = quantized_operands(query, key, value)
    compiled = torch.compile(fp8_attention, fullgraph=True)
    times = {
        "bf16_cudnn_sdpa": median_ms(lambda: bf16_cudnn(query, key, value), args.repeats),
        "fp8_op_only": median_ms(lambda: fp8_attention_op(*op_args), args.repeats),
        "fp8_attention_eager": median_ms(lambda: fp8_attention(query, key, value), args.repeats),
        "fp8_attention_compiled": median_ms(lambda: compiled(query, key, value), args.repeats),
    }
    times["fp8_op_in_cuda_graph"] = median_ms(cuda_graph_of(lambda: fp8_attention_op(*op_args)), args.repeats)
    result["median_ms"] = times
    result["host_ms_per_call"] = {
        "bf16_cudnn_sdpa": host_ms(lambda: bf16_cudnn(query, key, value)),
        "fp8_op_only": host_ms(lambda: fp8_attention_op(*op_args)),
    }
    result["speedup_vs_bf16_cudnn"] = {name: round(times["bf16_cudnn_sdpa"] / ms, 3) for name, ms in times.items()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
