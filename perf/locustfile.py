"""Locust users that call fluxserve models through tritonclient (the `client` library), HTTP or gRPC.

Two ways to send: closed loop (default), each user sending requests back to back and taking the models in turn;
or open loop (`--arrival-rate R`), Poisson arrivals at R requests per second in all (shared evenly by the users:
use -u 1), each request sent on a greenlet of its own, so a slow request never delays the next arrival, to a model
picked uniformly at random (so each model's arrivals are Poisson too, at R / models). Either way each request asks
for a size drawn by weight from `--sizes` (default: --height x --width alone) and is timed from its arrival to its
response.

Each request is named after its model, so Locust's CSV has one row per model. Locust rounds response times
above one second (to 100 ms between 1 and 10 s), so the exact latencies are kept here too and reported at the
end: per model (count, failures, average, min, P50, P90, P99), printed and, with `--csv PREFIX`, written to
PREFIX_exact.csv; and per model and size (count, failures, P50, P90, P99, how many took over twice the size's
steady P50, offered and achieved requests per second), printed and written to PREFIX_mixed.csv and
PREFIX_mixed.md. The steady P50s come from `--steady-p50 FILE` (a CSV of model, size, p50_s, as
`python -m perf.mixed_traffic` measures them), else from this run's own P50 of that model and size.

A run stops at --run-time or after --max-requests requests; in the open loop, requests still in flight at the
stop are awaited (each model's bounded queue bounds that wait), so every arrival is in the report.

  locust -f perf/locustfile.py --headless -u 2 -r 2 --run-time 2m --host 127.0.0.1:8000 \\
      --models bf16,bf16-fbcache-0.3 --csv perf/results/locust
  locust -f perf/locustfile.py --headless -u 1 -r 1 --run-time 5m --host 127.0.0.1:8000 --models bf16,fp16 \\
      --sizes 1024x1024:4,512x512:1,768x1344:2,1344x768:2 --arrival-rate 0.5 --csv perf/results/mixed

Options (also from the environment): --models (LOCUST_MODELS), --protocol http|grpc (LOCUST_PROTOCOL, the
--host port must match: 8000 HTTP, 8001 gRPC by default), --prompts-file (LOCUST_PROMPTS_FILE), --steps,
--guidance, --height, --width, --sizes (LOCUST_SIZES), --arrival-rate (LOCUST_ARRIVAL_RATE), --steady-p50
(LOCUST_STEADY_P50), --max-requests (LOCUST_MAX_REQUESTS: stop after that many requests, per process).
"""

# gRPC must run on gevent's loop under Locust: initialise before any channel exists (never use grpc.aio).
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV  # noqa: E402

# Locust puts only this file's folder on sys.path; the client library and perf live one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import LIMITS, PROTOCOLS, FluxClient, GenerateRequest  # noqa: E402
from perf import LatencySummary, load_prompts, markdown_table  # noqa: E402
from perf.traffic import SizeMix, read_steady_p50, sizes_argument  # noqa: E402

REPORT_KEY = "fluxserve_latencies"  # this file's entry in the worker -> master reports


def _merge_nested(into: dict, data: dict, combine) -> None:
    for model, per_size in data.items():
        mine = into.setdefault(model, {})
        for size, value in per_size.items():
            mine[size] = combine(mine[size], value) if size in mine else value


@dataclass
class Recorder:
    """Exact latencies (seconds) and failure counts per model and size, and when requests were sent and answered
    (wall clock, comparable across the processes of one host); mergeable across Locust worker processes."""

    latencies: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # model -> size label -> seconds
    failures: dict[str, dict[str, int]] = field(default_factory=dict)
    first_sent: float = math.inf
    last_sent: float = -math.inf
    last_done: float = -math.inf
    started: int = 0  # this process's requests, for --max-requests
    finished: int = 0

    def sent(self) -> None:
        now = time.time()
        self.first_sent, self.last_sent = min(self.first_sent, now), now
        self.started += 1

    def record(self, model: str, size: str, latency: float | None) -> None:
        """One finished request: its latency, or None when it failed."""
        if latency is None:
            per_size = self.failures.setdefault(model, {})
            per_size[size] = per_size.get(size, 0) + 1
        else:
            self.latencies.setdefault(model, {}).setdefault(size, []).append(latency)
        self.finished += 1
        self.last_done = time.time()

    def drain(self) -> dict:
        """What this worker measured since its last report, for the master (the times merge as min and max)."""
        data = {"latencies": self.latencies, "failures": self.failures,
                "times": [self.first_sent, self.last_sent, self.last_done]}
        self.latencies, self.failures = {}, {}
        return data

    def merge(self, data: dict) -> None:
        _merge_nested(self.latencies, data["latencies"], lambda mine, theirs: mine + theirs)
        _merge_nested(self.failures, data["failures"], lambda mine, theirs: mine + theirs)
        first_sent, last_sent, last_done = data["times"]
        self.first_sent = min(self.first_sent, first_sent)
        self.last_sent = max(self.last_sent, last_sent)
        self.last_done = max(self.last_done, last_done)

    def of(self, model: str, size: str) -> tuple[list[float], int]:
        """Latencies and failures of one model and size."""
        return self.latencies.get(model, {}).get(size, []), self.failures.get(model, {}).get(size, 0)

    def of_model(self, model: str) -> tuple[list[float], int]:
        """Latencies and failures of one model, all sizes."""
        return (sum(self.latencies.get(model, {}).values(), []), sum(self.failures.get(model, {}).values()))

    def rows(self, models: list[str]) -> list[tuple[str, LatencySummary, int]]:
        rows = []
        for model in models:
            latencies, failures = self.of_model(model)
            rows.append((model, LatencySummary.of(latencies), failures))
        return rows

    @property
    def duration(self) -> float:
        """Seconds from the first request sent to the last response."""
        return self.last_done - self.first_sent


@dataclass
class ClientPool:
    """FluxClients for the requests in flight: tritonclient's HTTP client sends one request at a time, so each
    request takes an idle client, or opens a new one, and gives it back when answered."""

    idle: list[FluxClient] = field(default_factory=list)

    @contextlib.contextmanager
    def client(self, url: str | None, protocol: str):
        client = self.idle.pop() if self.idle else FluxClient(url, protocol)
        try:
            yield client
        finally:
            self.idle.append(client)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


RECORDER = Recorder()
POOL = ClientPool()
IN_FLIGHT = gevent.pool.Group()  # the open loop's requests, each on its own greenlet


def steady_p50_option(text: str) -> str:
    """--steady-p50 checked when parsed: a readable CSV with the columns model, size, p50_s; empty: none."""
    try:
        if text:
            read_steady_p50(Path(text))
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def rate_option(text: str) -> float:
    rate = float(text)
    if not rate >= 0:
        raise argparse.ArgumentTypeError(f"must be requests per second, 0 or more; got {text!r}")
    return rate


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    parser.add_argument("--models", env_var="LOCUST_MODELS", default="bf16",
                        help="comma-separated models to call (default bf16)")
    parser.add_argument("--protocol", env_var="LOCUST_PROTOCOL", choices=list(PROTOCOLS), default="http")
    parser.add_argument("--prompts-file", env_var="LOCUST_PROMPTS_FILE", default="",
                        help="one prompt per line (default: perf/prompts.txt)")
    parser.add_argument("--steps", env_var="LOCUST_STEPS", type=int, default=LIMITS.default_steps)
    parser.add_argument("--guidance", env_var="LOCUST_GUIDANCE", type=float, default=LIMITS.default_guidance)
    parser.add_argument("--height", env_var="LOCUST_HEIGHT", type=int, default=LIMITS.default_size)
    parser.add_argument("--width", env_var="LOCUST_WIDTH", type=int, default=LIMITS.default_size)
    parser.add_argument("--sizes", env_var="LOCUST_SIZES", type=sizes_argument, default="",
                        help="size mix HEIGHTxWIDTH[:WEIGHT],... each request draws from by weight "
                             "(default: --height x --width)")
    parser.add_argument("--arrival-rate", env_var="LOCUST_ARRIVAL_RATE", type=rate_option, default=0.0,
                        help="open loop: Poisson arrivals, requests per second in all (0: closed loop)")
    parser.add_argument("--steady-p50", env_var="LOCUST_STEADY_P50", type=steady_p50_option, default="",
                        help="CSV of model,size,p50_s to count requests over twice against "
                             "(default: this run's own P50 of each model and size)")
    parser.add_argument("--max-requests", env_var="LOCUST_MAX_REQUESTS", type=int, default=0,
                        help="stop after this many requests (per process; 0: no limit)")


def chosen_models(options) -> list[str]:
    return [model.strip() for model in options.models.split(",") if model.strip()]


def size_mix(options) -> SizeMix:
    return SizeMix.parse(options.sizes) if options.sizes else SizeMix.single(options.height, options.width)


def triton_url(host: str | None) -> str | None:
    """Locust's --host as a tritonclient URL (host:port, no scheme); None: the protocol's default."""
    return host.split("://", 1)[-1].rstrip("/") if host else None


class TritonUser(User):
    """Closed loop: sends requests back to back, cycling through the models. Open loop (--arrival-rate): one
    Poisson stream of arrivals (its share of the rate), each sent on its own greenlet to a model picked at random."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.options = self.environment.parsed_options
        self.url = triton_url(self.host)
        self.rng = random.Random()
        self.models = chosen_models(options)
        self.turns = itertools.islice(itertools.cycle(self.models), self.rng.randrange(len(self.models)), None)
        prompts = load_prompts(Path(options.prompts_file) if options.prompts_file else None)
        self.prompts = itertools.islice(itertools.cycle(prompts), self.rng.randrange(len(prompts)), None)
        self.mix = size_mix(options)
        self.rate = options.arrival_rate / (options.num_users or 1)
        self.due = time.perf_counter()  # the open loop's latest arrival

    @task
    def generate(self) -> None:
        arrived = self.next_arrival() if self.rate else time.perf_counter()
        cap = self.options.max_requests
        if cap and RECORDER.started >= cap:
            raise StopUser()
        RECORDER.sent()
        size = self.mix.draw(self.rng)
        request = GenerateRequest(next(self.prompts), steps=self.options.steps, guidance=self.options.guidance,
                                  height=size.height, width=size.width)
        if self.rate:
            IN_FLIGHT.spawn(self.send, self.rng.choice(self.models), request, size.label, arrived)
        else:
            self.send(next(self.turns), request, size.label, arrived)

    def next_arrival(self) -> float:
        """Wait for this stream's next Poisson arrival and return when it was due: arrivals keep to their schedule
        (a late wake-up does not push the later ones back), and each request is timed from when it was due."""
        self.due += self.rng.expovariate(self.rate)
        gevent.sleep(max(0.0, self.due - time.perf_counter()))
        return self.due

    def send(self, model: str, request: GenerateRequest, size: str, arrived: float) -> None:
        """One request, timed from its arrival (perf_counter) to its response. Any error is the request's failure:
        the open loop's greenlet has no Locust task around it to report one."""
        try:
            with POOL.client(self.url, self.options.protocol) as client:
                result = client.generate(model, request)
        except Exception as exc:
            RECORDER.record(model, size, None)
            self.fire(model, 0.0, 0, exc)
        else:
            latency = time.perf_counter() - arrived
            RECORDER.record(model, size, latency)
            self.fire(model, latency, len(result.png), None)
        cap = self.options.max_requests
        if cap and RECORDER.finished >= cap:
            gevent.spawn(self.environment.runner.quit)  # not from a user's own greenlet, which quit kills

    def fire(self, model: str, seconds: float, length: int, exception: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=f"triton-{self.options.protocol}", name=model, response_time=seconds * 1000,
            response_length=length, exception=exception, context={},
        )


@events.test_stop.add_listener
def finish_in_flight(environment, **kwargs) -> None:
    """Await the open loop's requests still in flight at the stop (every arrival is reported), then close the
    connections."""
    IN_FLIGHT.join()
    POOL.close()


@events.report_to_master.add_listener
def send_latencies(client_id, data) -> None:
    data[REPORT_KEY] = RECORDER.drain()


@events.worker_report.add_listener
def receive_latencies(client_id, data) -> None:
    if REPORT_KEY in data:
        RECORDER.merge(data[REPORT_KEY])


EXACT_HEADER = ["Model", "Count", "Failures", "Average (s)", "Min (s)", "P50 (s)", "P90 (s)", "P99 (s)"]
EXACT_COLUMNS = ["model", "count", "failures", "average_s", "min_s", "p50_s", "p90_s", "p99_s"]
MIXED_HEADER = ["Model", "Size", "Count", "Failures", "P50 (s)", "P90 (s)", "P99 (s)", "Steady P50 (s)",
                "Steady from", "Over 2x steady", "Offered (req/s)", "Achieved (req/s)"]
MIXED_COLUMNS = ["model", "size", "count", "failures", "p50_s", "p90_s", "p99_s", "steady_p50_s", "steady_from",
                 "over_2x_steady", "offered_per_s", "achieved_per_s"]
ALL = "all"


@dataclass(frozen=True)
class MixedRow:
    """One model and size of the report (or ALL of both: the run's totals)."""

    model: str
    size: str
    summary: LatencySummary
    failures: int
    steady_p50: float | None
    steady_from: str
    over_2x: int
    offered: float | None  # requests per second; None in the closed loop
    achieved: float

    def values(self) -> list:
        s = self.summary
        return [self.model, self.size, s.count, self.failures, s.p50, s.p90, s.p99, self.steady_p50,
                self.steady_from, self.over_2x, self.offered, self.achieved]


def cell(value, digits: int) -> str:
    """A report cell: floats to `digits` decimals, missing values (None, NaN) empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def mixed_rows(recorder: Recorder, models: list[str], mix: SizeMix, rate: float,
               steady: dict[tuple[str, str], float]) -> list[MixedRow]:
    """Per model and size (every pair of the plan, including any that drew no request), then the totals."""
    duration = recorder.duration if recorder.duration > 0 else math.nan
    rows, every = [], []
    for model, size in itertools.product(models, mix.sizes):
        latencies, failures = recorder.of(model, size.label)
        every += latencies
        summary = LatencySummary.of(latencies)
        from_file = (model, size.label) in steady
        steady_p50 = steady[model, size.label] if from_file else summary.p50
        rows.append(MixedRow(
            model, size.label, summary, failures, None if math.isnan(steady_p50) else steady_p50,
            "steady file" if from_file else "this run", sum(latency > 2 * steady_p50 for latency in latencies),
            rate / len(models) * mix.share(size) if rate else None, summary.count / duration))
    total = LatencySummary.of(every)
    rows.append(MixedRow(ALL, ALL, total, sum(row.failures for row in rows), None, "",
                         sum(row.over_2x for row in rows), rate or None, total.count / duration))
    return rows


def mixed_caption(options, recorder: Recorder, rows: list[MixedRow]) -> str:
    """What the mixed table measured: how requests arrived, the rates, and where the steady P50s come from."""
    total = rows[-1]
    arrivals = total.summary.count + total.failures
    window = recorder.last_sent - recorder.first_sent
    if options.arrival_rate:
        offered = (f"Open loop: Poisson arrivals offered at {options.arrival_rate:.3f} req/s ({arrivals} arrived "
                   f"in {window:.1f} s), each to a model picked at random")
    else:
        offered = f"Closed loop: {options.num_users or 1} user(s) sending back to back, taking the models in turn"
    steady = (f"Steady P50: from {options.steady_p50} where it has the model and size, else this run's own"
              if options.steady_p50 else "Steady P50: this run's own P50 of each model and size")
    return (f"Mixed traffic per model and size (client side, seconds, from each request's arrival to its "
            f"response).\n{offered}, a size drawn by weight. Achieved: {total.achieved:.3f} req/s answered "
            f"without failure over {recorder.duration:.1f} s.\n{steady}.\n")


def rewrite_locust_stats(environment, prefix: str) -> None:
    """Locust refreshes PREFIX_stats.csv once a second but not at the end (locust#1806), so a short or capped
    run loses its last requests there: write it once more with the final numbers."""
    with open(f"{prefix}_stats.csv", "w", newline="") as file:
        StatsCSV(environment, PERCENTILES_TO_REPORT).requests_csv(csv.writer(file))


def write_csv(path: str, columns: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows(rows)


def exact_cells(rows: list[tuple[str, LatencySummary, int]], digits: int) -> list[list[str]]:
    return [[model, str(s.count), str(failures), *(cell(v, digits) for v in (s.average, s.min, s.p50, s.p90, s.p99))]
            for model, s, failures in rows]


@events.quitting.add_listener
def report(environment, **kwargs) -> None:
    """Print the exact latencies per model, then per model and size; with --csv PREFIX, write them to
    PREFIX_exact.csv, PREFIX_mixed.csv and PREFIX_mixed.md."""
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    models = chosen_models(options)
    exact = RECORDER.rows(models)
    print("\nExact latencies per model (client side, seconds):\n" + markdown_table(EXACT_HEADER, exact_cells(exact, 3)),
          flush=True)
    steady = read_steady_p50(Path(options.steady_p50)) if options.steady_p50 else {}
    mixed = mixed_rows(RECORDER, models, size_mix(options), options.arrival_rate, steady)
    mixed_text = (mixed_caption(options, RECORDER, mixed) + "\n"
                  + markdown_table(MIXED_HEADER, [[cell(v, 3) for v in row.values()] for row in mixed]))
    print("\n" + mixed_text, flush=True)
    prefix = options.csv_prefix
    if prefix:
        rewrite_locust_stats(environment, prefix)
        write_csv(f"{prefix}_exact.csv", EXACT_COLUMNS, exact_cells(exact, 6))
        write_csv(f"{prefix}_mixed.csv", MIXED_COLUMNS, [[cell(v, 6) for v in row.values()] for row in mixed])
        Path(f"{prefix}_mixed.md").write_text(mixed_text)
