"""Locust users that call fluxserve models through tritonclient (the `client` library), HTTP or gRPC.

Each request is named after its model, so Locust's CSV has one row per model. Locust rounds response times
above one second (to 100 ms between 1 and 10 s), so the exact latencies are kept here too and reported at the
end per model (count, failures, average, min, P50, P90, P99): printed as a Markdown table and, with
`--csv PREFIX`, written to PREFIX_exact.csv.

  locust -f perf/locustfile.py --headless -u 2 -r 2 --run-time 2m --host 127.0.0.1:8000 \\
      --models bf16,bf16-fbcache-0.3 --csv perf/results/locust

Options (also from the environment): --models (LOCUST_MODELS), --protocol http|grpc (LOCUST_PROTOCOL, the
--host port must match: 8000 HTTP, 8001 gRPC by default), --prompts-file (LOCUST_PROMPTS_FILE), --steps,
--guidance, --height, --width, --max-requests (LOCUST_MAX_REQUESTS: stop after that many requests, per process).
"""

# gRPC must run on gevent's loop under Locust: initialise before any channel exists (never use grpc.aio).
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import csv  # noqa: E402
import itertools  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV  # noqa: E402

# Locust puts only this file's folder on sys.path; the client library and perf live one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import LIMITS, PROTOCOLS, FluxClient, GenerateRequest, InferenceServerException  # noqa: E402
from perf import LatencySummary, load_prompts, markdown_table  # noqa: E402

REPORT_KEY = "fluxserve_latencies"  # this file's entry in the worker -> master reports


@dataclass
class Recorder:
    """Exact latencies (seconds) and failure counts per model, mergeable across Locust worker processes."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    started: int = 0
    finished: int = 0

    def record(self, model: str, latency: float | None) -> None:
        """One finished request: its latency, or None when it failed."""
        if latency is None:
            self.failures[model] = self.failures.get(model, 0) + 1
        else:
            self.latencies.setdefault(model, []).append(latency)
        self.finished += 1

    def drain(self) -> dict:
        """What this worker measured since its last report, for the master."""
        data = {"latencies": self.latencies, "failures": self.failures}
        self.latencies, self.failures = {}, {}
        return data

    def merge(self, data: dict) -> None:
        for model, values in data["latencies"].items():
            self.latencies.setdefault(model, []).extend(values)
        for model, count in data["failures"].items():
            self.failures[model] = self.failures.get(model, 0) + count

    def rows(self, models: list[str]) -> list[tuple[str, LatencySummary, int]]:
        return [(m, LatencySummary.of(self.latencies.get(m, [])), self.failures.get(m, 0)) for m in models]


RECORDER = Recorder()


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    parser.add_argument("--models", env_var="LOCUST_MODELS", default="bf16",
                        help="comma-separated models to call, in turn (default bf16)")
    parser.add_argument("--protocol", env_var="LOCUST_PROTOCOL", choices=list(PROTOCOLS), default="http")
    parser.add_argument("--prompts-file", env_var="LOCUST_PROMPTS_FILE", default="",
                        help="one prompt per line (default: perf/prompts.txt)")
    parser.add_argument("--steps", env_var="LOCUST_STEPS", type=int, default=LIMITS.default_steps)
    parser.add_argument("--guidance", env_var="LOCUST_GUIDANCE", type=float, default=LIMITS.default_guidance)
    parser.add_argument("--height", env_var="LOCUST_HEIGHT", type=int, default=LIMITS.default_size)
    parser.add_argument("--width", env_var="LOCUST_WIDTH", type=int, default=LIMITS.default_size)
    parser.add_argument("--max-requests", env_var="LOCUST_MAX_REQUESTS", type=int, default=0,
                        help="stop after this many requests (per process; 0: no limit)")


def chosen_models(options) -> list[str]:
    return [model.strip() for model in options.models.split(",") if model.strip()]


def triton_url(host: str | None) -> str | None:
    """Locust's --host as a tritonclient URL (host:port, no scheme); None: the protocol's default."""
    return host.split("://", 1)[-1].rstrip("/") if host else None


class TritonUser(User):
    """Sends generation requests back to back, cycling through the chosen models and the prompt set."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.client = FluxClient(triton_url(self.host), options.protocol)
        models = chosen_models(options)
        self.models = itertools.islice(itertools.cycle(models), random.randrange(len(models)), None)
        prompts = load_prompts(Path(options.prompts_file) if options.prompts_file else None)
        self.prompts = itertools.islice(itertools.cycle(prompts), random.randrange(len(prompts)), None)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def generate(self) -> None:
        cap = self.options.max_requests
        if cap and RECORDER.started >= cap:
            raise StopUser()
        RECORDER.started += 1
        model = next(self.models)
        request = GenerateRequest(next(self.prompts), steps=self.options.steps, guidance=self.options.guidance,
                                  height=self.options.height, width=self.options.width)
        try:
            result = self.client.generate(model, request)
        except (InferenceServerException, OSError) as exc:
            RECORDER.record(model, None)
            self.fire(model, 0.0, 0, exc)
        else:
            RECORDER.record(model, result.latency_s)
            self.fire(model, result.latency_s, len(result.png), None)
        if cap and RECORDER.finished >= cap:
            gevent.spawn(self.environment.runner.quit)  # not from this user's own greenlet, which quit kills

    def fire(self, model: str, seconds: float, length: int, exception: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=f"triton-{self.options.protocol}", name=model, response_time=seconds * 1000,
            response_length=length, exception=exception, context={},
        )


@events.report_to_master.add_listener
def send_latencies(client_id, data) -> None:
    data[REPORT_KEY] = RECORDER.drain()


@events.worker_report.add_listener
def receive_latencies(client_id, data) -> None:
    RECORDER.merge(data.get(REPORT_KEY, {"latencies": {}, "failures": {}}))


EXACT_HEADER = ["Model", "Count", "Failures", "Average (s)", "Min (s)", "P50 (s)", "P90 (s)", "P99 (s)"]
EXACT_COLUMNS = ["model", "count", "failures", "average_s", "min_s", "p50_s", "p90_s", "p99_s"]


def rewrite_locust_stats(environment, prefix: str) -> None:
    """Locust refreshes PREFIX_stats.csv once a second but not at the end (locust#1806), so a short or capped
    run loses its last requests there: write it once more with the final numbers."""
    with open(f"{prefix}_stats.csv", "w", newline="") as file:
        StatsCSV(environment, PERCENTILES_TO_REPORT).requests_csv(csv.writer(file))


def write_exact(path: str, rows: list[tuple[str, LatencySummary, int]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(EXACT_COLUMNS)
        for model, s, failures in rows:
            writer.writerow([model, s.count, failures, *(f"{v:.6f}" for v in (s.average, s.min, s.p50, s.p90, s.p99))])


@events.quitting.add_listener
def report(environment, **kwargs) -> None:
    """Print the exact per-model latencies; with --csv PREFIX, write them to PREFIX_exact.csv."""
    if isinstance(environment.runner, WorkerRunner):
        return
    rows = RECORDER.rows(chosen_models(environment.parsed_options))
    cells = [[model, str(s.count), str(failures), *(f"{v:.3f}" for v in (s.average, s.min, s.p50, s.p90, s.p99))]
             for model, s, failures in rows]
    print("\nExact latencies per model (client side, seconds):\n" + markdown_table(EXACT_HEADER, cells), flush=True)
    prefix = environment.parsed_options.csv_prefix
    if prefix:
        rewrite_locust_stats(environment, prefix)
        write_exact(f"{prefix}_exact.csv", rows)
