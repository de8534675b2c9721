"""Measure stacks one at a time through the server, like the seed benchmark, and write its table.

For each stack in turn: load it (explicit model control), record the load time, warm up (the first warm-up
request is the fixed-seed reference image), send N requests at concurrency C, record client latency, Triton's
queue and compute time (statistics API), the model's own time, peak GPU memory and steps computed from INFO,
then unload it; with `--reload`, load it once more and record that second load's time (torch.compile's caches
warm). Optionally also measure stacks in-process without the server (`--direct`), as rows named
`<stack> (direct)`: the model's own request handler without Triton, right after the same stack's served run.

Writes under the results folder (default perf/results/<gpu-slug>/, `cpu` without a GPU):
  results.csv       one row per measured stack and configuration, appended as soon as the stack is measured
  results.md        the seed's table for this configuration, plus steps, load time, memory, speed-up, PSNR
  latency.png       horizontal P50 bars sorted by latency, coloured by family, with P90 marks and P99 whiskers, the
                    baseline marked, steps computed for step-cache stacks (the numbers are also in the PNG's
                    `fluxserve` text chunk); `python -m perf.merge FOLDER` draws it again from results.csv
  images/           the fixed-seed reference image of each stack
  environment.json  every run's command line, date and versions

Rows already in results.csv for the same configuration are skipped, so an interrupted sweep resumes.

  python -m perf.sweep --models fp16,bf16,bf16-fa2,bf16-fbcache-0.3 --requests 10
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from client import DEFAULT_URLS, LIMITS, PROTOCOLS, FluxClient, InferenceServerException
from fluxserve.stacks import CATALOG
from fluxserve.serve import resolve_weights
from fluxserve.weights import ENV_VAR
from perf import load_prompts, names, positive
from perf.environment import environment, gpu_name, gpu_slug, record_environment
from perf.measure import make_row, measure_direct, measure_on_server, progress, release_memory, reporting_failure
from perf.report import write_reports
from perf.rows import DIRECT_SUFFIX, Config, append_row, read_rows

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="http")
    parser.add_argument("--url", help=f"server address (default {DEFAULT_URLS['http']} / {DEFAULT_URLS['grpc']})")
    parser.add_argument("--models", default=",".join(stack.name for stack in CATALOG),
                        help="comma-separated stacks to measure through the server (default: the whole catalog)")
    parser.add_argument("--direct", default="", help="comma-separated catalog stacks to measure in-process too")
    parser.add_argument("--reload", default="",
                        help="comma-separated stacks whose second load to time, right after measuring them")
    parser.add_argument("--weights", default=os.environ.get(ENV_VAR),
                        help=f"weights source for --direct (default: ${ENV_VAR}, else the launcher's default)")
    parser.add_argument("--baseline", default="bf16", help="stack the speed-up and PSNR compare with (default bf16)")
    parser.add_argument("--requests", type=positive, default=10, help="timed requests per stack (default 10)")
    parser.add_argument("--concurrency", type=positive, default=1, help="requests in flight (default 1)")
    parser.add_argument("--warmup", type=positive, default=1,
                        help="untimed requests first (default 1); the first is the reference image")
    parser.add_argument("--steps", type=int, default=LIMITS.default_steps)
    parser.add_argument("--guidance", type=float, default=LIMITS.default_guidance)
    parser.add_argument("--height", type=int, default=LIMITS.default_size)
    parser.add_argument("--width", type=int, default=LIMITS.default_size)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the reference image (default 0); timed requests count up from it")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line (default: perf/prompts.txt)")
    parser.add_argument("--output", type=Path, help="results folder (default perf/results/<gpu-slug>)")
    return parser.parse_args(argv)


def baseline_first(models: list[str], baseline: str) -> list[str]:
    """The baseline goes first, so every later row's PSNR can be computed as soon as it is measured."""
    return sorted(models, key=lambda name: name != baseline)


def run_jobs(
    client: FluxClient, args: argparse.Namespace, config: Config, prompts: list[str], folder: Path
) -> list[str]:
    """Measure each stack not yet in results.csv for this configuration, writing its row at once; returns the
    names of the stacks that failed."""
    served, direct = baseline_first(names(args.models), args.baseline), names(args.direct)
    reload = names(args.reload)
    jobs = []
    for model in served:  # a stack's direct run right after its served one, so one deadline cannot split them
        jobs += [(model, "server")] + ([(model, "direct")] if model in direct else [])
    jobs += [(stack, "direct") for stack in baseline_first(direct, args.baseline) if stack not in served]
    done = {(row.name, row.config) for row in read_rows(folder / "results.csv")}
    weights = resolve_weights(args.weights) if args.direct else None
    print(f"sweep: {len(jobs)} stack(s); {config.describe()}; results in {folder}", flush=True)
    failed = []
    for number, (model, mode) in enumerate(jobs, 1):
        name = model + DIRECT_SUFFIX if mode == "direct" else model
        label = f"[{number}/{len(jobs)}] {name}:"
        if (name, config) in done:
            progress(label, "already in results.csv for this configuration: skipped")
            continue
        if mode == "server":
            measurement = reporting_failure(label, measure_on_server, client, model, config, prompts, args.warmup,
                                            label, model in reload)
        else:
            measurement = reporting_failure(label, measure_direct, model, weights, config, prompts, args.warmup,
                                            label)
            release_memory()
        if measurement is None:
            failed.append(name)
            continue
        row = make_row(name, mode, config, measurement, folder, args.baseline)
        append_row(folder / "results.csv", row)
        progress(label, f"P50 {row.p50_s:.3f} s, P90 {row.p90_s:.3f} s, P99 {row.p99_s:.3f} s, "
                        f"{row.steps_computed:.1f}/{row.config.steps} steps, load {row.load_s:.1f} s")
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    prompts = load_prompts(args.prompts_file)
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:8]
    config = Config(args.protocol, args.height, args.width, args.steps, args.guidance, args.requests,
                    args.concurrency, args.seed, digest)
    client = FluxClient(args.url, args.protocol)
    try:
        server_version = client.server_version()
    except (InferenceServerException, ConnectionError) as exc:
        message = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
        print(f"error: cannot reach the server at {client.url}: {message}", file=sys.stderr)
        return 1
    gpu = gpu_name()
    folder = args.output or RESULTS_ROOT / gpu_slug(gpu)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    run = environment(argv, server_version, gpu)
    record_environment(folder, run)
    try:
        failed = run_jobs(client, args, config, prompts, folder)
    except KeyboardInterrupt:
        print("sweep: interrupted; the same command resumes after the last stack measured", file=sys.stderr)
        return 130
    client.close()
    rows = write_reports(folder, config, args.baseline, run)
    print(f"sweep: {len(rows)} row(s) for this configuration in {folder / 'results.md'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
