"""Mixed traffic against a running server: steady P50s, capacity, then open-loop Locust at a fraction of it.

1. Steady P50s: for each model and each size of the mix, one request at a time: one warm-up (the first request
   of a size may compile or capture a CUDA graph), then `--requests` timed ones; their P50 is that model and
   size's service time, written to OUT/steady_p50.csv. The warm-up is the first request at that size since the
   server became ready (when nothing else sent one): its time over the steady P50 is in OUT/first_requests.csv,
   with what it compiled (INFO.compiled_in_request).
2. Capacity: a model's mean service time over the size mix (weighted), and its capacity, 1 / that. The models
   share the server's device(s) and each arrival picks one at random, so the run's capacity is 1 / the mean over
   the models of their mean service times; the offered rate is `--fraction` of it (or `--rate`).
3. Open loop: perf/locustfile.py with Poisson arrivals at that rate for `--duration`, judged against the steady
   P50s (over twice a size's steady P50), into OUT/locust_* (PREFIX_mixed.csv, PREFIX_exact.csv, ...).

With `--duration 0` it stops after step 2 (a freshly started server's first requests and capacity alone).
OUT/report.md has the three steps' tables; OUT/capacity.json the capacity numbers; OUT/environment.json the
command line, date and versions; OUT/locust.log Locust's output.

  python -m perf.mixed_traffic --url 127.0.0.1:8000 --models bf16,fp16 \\
      --sizes 1024x1024:4,512x512:1,768x1344:2,1344x768:2 --output perf/results/mixed

A plan file (perf/plans/*.args) holds these arguments one per line: `python -m perf.mixed_traffic @PLAN --output
OUT`, or `bash perf/mixed_traffic.sh PLAN OUT`, which also starts and stops the server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from client import LIMITS, PROTOCOLS, FluxClient, GenerateRequest, InferenceServerException
from perf import load_prompts, markdown_table, names, positive
from perf.environment import environment, gpu_name
from perf.traffic import SIZES_FORM, SizeMix, sizes_argument, write_steady_p50

ROOT = Path(__file__).resolve().parent.parent
LOCUST_PREFIX = "locust"
_TIMESPAN = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")


@dataclass(frozen=True)
class FirstRequest:
    """A model's first request at a size, against that size's steady P50."""

    seconds: float
    steady_p50_s: float
    compiled: dict  # what torch.compile compiled during it (INFO.compiled_in_request; empty: nothing)

    @property
    def ratio(self) -> float:
        return self.seconds / self.steady_p50_s


LOAD_FIELDS = ("load_seconds", "load_phases_s", "warm_up_sizes", "specialised_sizes", "compile_stats",
               "compile_artifact", "peak_memory_gib")  # what INFO says of a model's load


def measure_steady_p50(client: FluxClient, models: list[str], mix: SizeMix, requests: int, steps: int,
                       guidance: float, prompts: list[str]):
    """(model, size label) -> P50 seconds of `requests` sequential requests after one warm-up, each size in turn;
    (model, size label) -> that warm-up, the first request at the size, as a FirstRequest; and model -> its load,
    as INFO reports it (LOAD_FIELDS)."""
    prompt = itertools.cycle(prompts)
    p50s, firsts, loads = {}, {}, {}
    for model, size in itertools.product(models, mix.sizes):
        results = [client.generate(model, GenerateRequest(next(prompt), steps=steps, guidance=guidance,
                                                          height=size.height, width=size.width))
                   for _ in range(1 + requests)]
        p50s[model, size.label] = float(np.median([result.latency_s for result in results[1:]]))
        firsts[model, size.label] = FirstRequest(results[0].latency_s, p50s[model, size.label],
                                                 results[0].info.get("compiled_in_request", {}))
        if model not in loads:
            loads[model] = {field: results[0].info.get(field) for field in LOAD_FIELDS}
        print(f"{model} {size.label}: first {results[0].latency_s:.3f} s, steady P50 {p50s[model, size.label]:.3f} s",
              file=sys.stderr, flush=True)
    return p50s, firsts, loads


@dataclass(frozen=True)
class Capacity:
    """Requests per second the models can serve together at the size mix, and the rate to offer."""

    mean_service_s: dict[str, float]  # per model, over the size mix
    per_model: dict[str, float]  # 1 / mean service time: each model alone
    combined: float  # the models sharing the device, arrivals split evenly between them
    fraction: float
    rate: float  # offered requests per second


def capacity(p50s: dict[tuple[str, str], float], models: list[str], mix: SizeMix, fraction: float,
             rate: float | None = None) -> Capacity:
    """From the steady P50s as service times; the rate to offer is `fraction` of the combined capacity unless
    `rate` is given."""
    service = {model: mix.mean({size: p50s[model, size.label] for size in mix.sizes}) for model in models}
    combined = 1 / (sum(service.values()) / len(models))
    return Capacity(service, {model: 1 / seconds for model, seconds in service.items()}, combined, fraction,
                    rate or fraction * combined)


def locust_command(args: argparse.Namespace, rate: float, steady_file: Path) -> list[str]:
    """perf/locustfile.py headless: one Poisson stream at `rate`, the mix's sizes, judged by the steady file."""
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "perf" / "locustfile.py"), "--headless", "-u", "1",
        "-r", "1", "--run-time", f"{args.duration}s", "--only-summary", "--host", args.url,
        "--protocol", args.protocol, "--models", ",".join(args.models), "--sizes", args.sizes,
        "--arrival-rate", f"{rate:.6f}", "--steady-p50", str(steady_file), "--steps", str(args.steps),
        "--guidance", str(args.guidance), "--csv", str(args.output / LOCUST_PREFIX),
    ]
    if args.max_requests:
        command += ["--max-requests", str(args.max_requests)]
    if args.prompts_file:
        command += ["--prompts-file", str(args.prompts_file)]
    return command


def steady_table(p50s: dict[tuple[str, str], float], models: list[str], mix: SizeMix) -> str:
    """Steady P50 seconds, one row per model, one column per size (weights in the header)."""
    header = ["Model", *(f"{size.label} (x{weight:g})" for size, weight in zip(mix.sizes, mix.weights))]
    return markdown_table(header, [[model, *(f"{p50s[model, size.label]:.3f}" for size in mix.sizes)]
                                   for model in models])


def first_request_table(firsts: dict[tuple[str, str], FirstRequest]) -> str:
    rows = [[model, size, f"{first.seconds:.3f}", f"{first.steady_p50_s:.3f}", f"{first.ratio:.2f}",
             json.dumps(first.compiled) if first.compiled else "nothing"]
            for (model, size), first in firsts.items()]
    return markdown_table(["Model", "Size", "First request (s)", "Steady P50 (s)", "First / steady", "Compiled"], rows)


def write_first_requests(path: Path, firsts: dict[tuple[str, str], FirstRequest]) -> None:
    with path.open("w") as file:
        file.write("model,size,first_s,steady_p50_s,ratio,compiled\n")
        for (model, size), first in firsts.items():
            compiled = json.dumps(first.compiled).replace('"', "'")
            file.write(f'{model},{size},{first.seconds:.6f},{first.steady_p50_s:.6f},{first.ratio:.4f},"{compiled}"\n')


def load_table(loads: dict[str, dict]) -> str:
    rows = [[model, f"{load['load_seconds']:.1f}",
             ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in (load["load_phases_s"] or {}).items()),
             " ".join(load["warm_up_sizes"] or []), " ".join(load["specialised_sizes"] or []) or "none",
             str((load["compile_stats"] or {}).get("inductor_cache_misses", "-")),
             "-" if load["peak_memory_gib"] is None else f"{load['peak_memory_gib']:.1f}"]
            for model, load in loads.items()]
    return markdown_table(["Model", "Load (s)", "Phases (s)", "Warm-up sizes", "Specialised", "Inductor misses",
                           "Peak memory (GiB)"], rows)


def capacity_table(result: Capacity) -> str:
    rows = [[model, f"{result.mean_service_s[model]:.3f}", f"{result.per_model[model]:.3f}"]
            for model in result.mean_service_s]
    return markdown_table(["Model", "Mean service time (s)", "Capacity alone (req/s)"], rows)


def report(args: argparse.Namespace, mix: SizeMix, p50s, firsts, loads, result: Capacity,
           locust_exit: int | None) -> str:
    """report.md: the models' loads, the steady P50s, the first requests, the capacity and Locust's mixed table
    (when it ran)."""
    mixed = args.output / f"{LOCUST_PREFIX}_mixed.md"
    open_loop = ["No open loop (--duration 0).\n"] if locust_exit is None else [
        f"## Open loop (Locust exit code {locust_exit})\n",
        mixed.read_text() if mixed.exists() else f"No report from Locust: see {args.output / 'locust.log'}.\n"]
    return "\n".join([
        f"# Mixed traffic: {', '.join(args.models)}\n",
        f"{args.steps} steps, guidance {args.guidance}, {args.protocol}, {args.duration} s open loop.\n",
        "## Loads (INFO of each model's first request)\n",
        load_table(loads),
        f"## Steady P50 (s): one request at a time, {args.requests} after a warm-up\n",
        steady_table(p50s, args.models, mix),
        "## First request at each size (the warm-up above), against its steady P50\n",
        first_request_table(firsts),
        "## Capacity\n",
        capacity_table(result),
        f"Together (the models share the device, arrivals split evenly): {result.combined:.3f} req/s; offered "
        f"{result.rate:.3f} req/s" + (f" ({result.fraction:g} of it).\n" if args.rate is None else " (--rate).\n"),
        *open_loop,
    ])


def record_environment(args: argparse.Namespace, argv: list[str], client: FluxClient) -> None:
    run = environment(argv, client.server_version(), gpu_name())
    run["command"] = shlex.join(["python", "-m", "perf.mixed_traffic", *argv])
    run["arguments"] = vars(args)  # what a plan file (@PLAN) expanded to
    (args.output / "environment.json").write_text(json.dumps(run, indent=2, default=str) + "\n")


def duration_s(text: str) -> int:
    """Locust's --run-time forms: 300, 300s, 5m, 1h30m."""
    match = _TIMESPAN.fullmatch(text.strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"expected a time like 300, 300s, 5m or 1h30m; got {text!r}")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return 3600 * hours + 60 * minutes + seconds


def above_zero(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.mixed_traffic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, fromfile_prefix_chars="@")
    parser.add_argument("--url", default=None, help="server address (default: the protocol's on 127.0.0.1)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="http")
    parser.add_argument("--models", required=True, type=names, help="comma-separated models, already loaded")
    parser.add_argument("--sizes", required=True, type=sizes_argument, help=f"the size mix: {SIZES_FORM}")
    parser.add_argument("--output", required=True, type=Path, help="folder for every file of the run")
    parser.add_argument("--fraction", type=above_zero, default=0.8, help="of the capacity to offer (default 0.8)")
    parser.add_argument("--rate", type=above_zero, help="offer this many requests per second instead")
    parser.add_argument("--duration", type=duration_s, default=300,
                        help="of the open-loop run (default 5m; 0: none, steady P50s and first requests alone)")
    parser.add_argument("--requests", type=positive, default=3,
                        help="timed sequential requests per model and size, after one warm-up (default 3)")
    parser.add_argument("--max-requests", type=int, default=0, help="also stop the open loop after this many")
    parser.add_argument("--steps", type=int, default=LIMITS.default_steps)
    parser.add_argument("--guidance", type=float, default=LIMITS.default_guidance)
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line (default: perf/prompts.txt)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    mix = SizeMix.parse(args.sizes)
    client = FluxClient(args.url, args.protocol)
    args.url = client.url
    try:
        record_environment(args, argv, client)
        p50s, firsts, loads = measure_steady_p50(client, args.models, mix, args.requests, args.steps, args.guidance,
                                          load_prompts(args.prompts_file))
    except InferenceServerException as exc:
        print(f"steady P50s: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    steady_file = args.output / "steady_p50.csv"
    write_steady_p50(steady_file, p50s)
    write_first_requests(args.output / "first_requests.csv", firsts)
    (args.output / "loads.json").write_text(json.dumps(loads, indent=2) + "\n")
    result = capacity(p50s, args.models, mix, args.fraction, args.rate)
    (args.output / "capacity.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    locust_exit = None
    if args.duration:
        with open(args.output / "locust.log", "w") as log:
            locust_exit = subprocess.run(locust_command(args, result.rate, steady_file), cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT).returncode
    (args.output / "report.md").write_text(report(args, mix, p50s, firsts, loads, result, locust_exit))
    print(f"mixed traffic: results in {args.output} (report.md)", flush=True)
    return locust_exit or 0


if __name__ == "__main__":
    sys.exit(main())
