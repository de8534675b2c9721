"""VAE decode at FLUX's 1024x1024 latents on one GPU: eager, channels_last, torch.compile, and both, to decide
whether the compiled stacks should decode with them (issue item: "VAE decode: channels_last and compiled, if it
measures faster"). Times are CUDA-event medians of `--repeats` decodes after warm-up; compile time is the first
call's. Prints one JSON object (and writes it to `--out`).

    python3 -m perf.diagnostics.vae_decode --out $OUT/vae_decode.json
"""

from __future__ import annotations

import statistics
import time

import torch

from fluxserve.weights.synthetic import build_synthetic_pipeline
from perf.diagnostics.report import emit, repeated_run_arguments


def median_ms(decode, latents: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decode(latents)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def main() -> None:
    args = repeated_run_arguments("perf.diagnostics.vae_decode", __doc__).parse_args()
    vae = build_synthetic_pipeline("full", torch.bfloat16, torch.device("cuda")).vae
    latents = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    results, reference = {}, None
    for variant in ("eager", "channels_last", "compiled", "compiled_channels_last"):
        layout = torch.channels_last if variant.endswith("channels_last") else torch.contiguous_format
        vae.to(memory_format=layout)
        decode = vae.decode
        if variant.startswith("compiled"):
            torch._dynamo.reset()
            decode = torch.compile(vae.decode)

        def run(x, decode=decode, layout=layout):
            return decode(x.contiguous(memory_format=layout), return_dict=False)[0]

        started = time.perf_counter()
        with torch.inference_mode():
            first = run(latents)
            torch.cuda.synchronize()
            first_s = round(time.perf_counter() - started, 3)
            ms = median_ms(run, latents, args.repeats)
        reference = first.float() if reference is None else reference
        results[variant] = {"median_ms": ms, "first_call_s": first_s,
                            "max_abs_diff_vs_eager": round((first.float() - reference).abs().max().item(), 4)}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "latents": [1, 16, 128, 128],
              "results": results}
    emit(report, args.out)


if __name__ == "__main__":
    main()
