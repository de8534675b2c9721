"""Mixed traffic: perf/locustfile.py's size mix and open loop, and perf.mixed_traffic (steady P50s, capacity, then
the open loop at a fraction of it), through the real server on the CPU."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT, start_server

MODELS = ["bf16", "fp16"]
SIZES = ["64x64", "128x96"]
MIX = "64x64:2,128x96:1"
RATE = 4.0
MAX_REQUESTS = 8  # at most 8 in flight per model, within each model's queue of 8: none is rejected
RUN_TIME = "120s"  # the request cap normally ends the run first
TIMEOUT_S = 600  # a hang guard: a run took 56-108 s on 2 busy cores; 3x slower still fits
TINY, HUGE = 1e-6, 1e6  # steady P50s that every request, or none, takes over twice


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("mixed-traffic-server"), MODELS)
    yield server
    server.stop()


def locust(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "locust", "-f", "perf/locustfile.py", "--headless", "-u", "1", "-r", "1",
               "--only-summary", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def check_latency_columns(row: dict[str, str]) -> None:
    """Percentiles ordered, and the over-2x count consistent with them and with the steady P50 it was taken against."""
    count, over, steady = int(row["count"]), int(row["over_2x_steady"]), float(row["steady_p50_s"] or "nan")
    assert 0 <= over <= count
    if not count:
        return
    p50, p90, p99 = (float(row[key]) for key in ("p50_s", "p90_s", "p99_s"))
    assert 0 < p50 <= p90 <= p99
    if row["steady_from"] == "this run":  # no more than half the requests exceed their P50, let alone twice it
        assert steady == pytest.approx(p50, abs=1e-6) and over <= count // 2
    if steady == TINY:
        assert over == count
    if steady == HUGE:
        assert over == 0
    if over >= 2:  # P99 lies between the two largest latencies
        assert p99 > 2 * steady
    if over == 0:
        assert p99 <= 2 * steady


def test_open_loop_reports_every_model_and_size(server, tmp_path):
    steady = tmp_path / "steady.csv"
    steady.write_text(f"model,size,p50_s\nbf16,64x64,{TINY}\nbf16,128x96,{HUGE}\n")  # fp16: this run's own
    prefix = tmp_path / "run"
    done = locust("--run-time", RUN_TIME, "--max-requests", str(MAX_REQUESTS), "--host", server.http_url,
                  "--models", ",".join(MODELS), "--sizes", MIX, "--arrival-rate", str(RATE), "--steps", "1",
                  "--steady-p50", str(steady), "--csv", str(prefix))
    assert done.returncode == 0, done.stderr[-3000:]

    rows = read_csv(f"{prefix}_mixed.csv")
    assert [(row["model"], row["size"]) for row in rows] == [(m, s) for m in MODELS for s in SIZES] + [("all", "all")]
    pairs, total = rows[:-1], rows[-1]
    assert sum(int(row["count"]) for row in pairs) == int(total["count"]) == MAX_REQUESTS
    assert all(row["failures"] == "0" for row in rows)
    for row in pairs:
        assert row["steady_from"] == ("steady file" if row["model"] == "bf16" else "this run")
        check_latency_columns(row)
    assert int(total["over_2x_steady"]) == sum(int(row["over_2x_steady"]) for row in pairs)
    # Each model gets half the arrivals, each size its weight's share: 2/3 and 1/3.
    offered = {(row["model"], row["size"]): float(row["offered_per_s"]) for row in pairs}
    assert offered["fp16", "64x64"] == pytest.approx(RATE / 2 * 2 / 3, abs=1e-6)
    assert float(total["offered_per_s"]) == pytest.approx(RATE)
    assert sum(float(row["achieved_per_s"]) for row in pairs) == pytest.approx(float(total["achieved_per_s"]), abs=1e-5)

    locust_counts = {row["Name"]: int(row["Request Count"]) for row in read_csv(f"{prefix}_stats.csv")}
    for model in MODELS:
        assert locust_counts.get(model, 0) == sum(int(row["count"]) for row in pairs if row["model"] == model)
    assert "Open loop: Poisson arrivals offered at 4.000 req/s" in done.stdout
    assert (tmp_path / "run_mixed.md").read_text() in done.stdout


@pytest.mark.parametrize("sizes", ["1024by1024", "64x64:0", "64x64:heavy", ","])
def test_a_bad_size_mix_fails_naming_the_option_and_its_form(sizes):
    done = locust("--sizes", sizes, "--run-time", "1s", "--host", "127.0.0.1:9")
    assert done.returncode != 0
    assert "--sizes" in done.stderr and "HEIGHTxWIDTH[:WEIGHT]" in done.stderr


def test_capacity_is_the_mix_weighted_service_time_shared_by_the_models():
    from perf.mixed_traffic import capacity
    from perf.traffic import SizeMix

    mix = SizeMix.parse("64x64:3, 128x96")
    p50s = {("a", "64x64"): 1.0, ("a", "128x96"): 5.0, ("b", "64x64"): 2.0, ("b", "128x96"): 2.0}
    result = capacity(p50s, ["a", "b"], mix, 0.5)
    assert result.mean_service_s == pytest.approx({"a": 2.0, "b": 2.0})  # 3/4 * 1 + 1/4 * 5
    assert result.per_model == pytest.approx({"a": 0.5, "b": 0.5})
    assert result.combined == pytest.approx(0.5) and result.rate == pytest.approx(0.25)
    assert capacity(p50s, ["a"], mix, 0.5, rate=3.0).rate == 3.0


def test_mixed_traffic_measures_steady_p50s_then_offers_a_fraction_of_capacity(server, tmp_path):
    from perf.mixed_traffic import main

    out = tmp_path / "out"
    code = main(["--url", server.grpc_url, "--protocol", "grpc", "--models", "bf16", "--sizes", MIX, "--output",
                 str(out), "--steps", "1", "--requests", "1", "--duration", "2m", "--max-requests", "4"])
    assert code == 0, (out / "locust.log").read_text()[-3000:]

    steady = {(row["model"], row["size"]): float(row["p50_s"]) for row in read_csv(out / "steady_p50.csv")}
    assert set(steady) == {("bf16", size) for size in SIZES} and min(steady.values()) > 0
    result = json.loads((out / "capacity.json").read_text())
    mean = 2 / 3 * steady["bf16", "64x64"] + 1 / 3 * steady["bf16", "128x96"]
    # steady_p50.csv holds 6 decimals, capacity.json was computed from the unrounded P50s
    assert result["mean_service_s"]["bf16"] == pytest.approx(mean, abs=1e-6)
    assert result["rate"] == pytest.approx(0.8 / mean, rel=1e-4)

    rows = read_csv(out / "locust_mixed.csv")
    assert int(rows[-1]["count"]) == 4 and rows[-1]["failures"] == "0"
    for row in rows[:-1]:
        assert row["steady_from"] == "steady file"
        assert float(row["steady_p50_s"]) == pytest.approx(steady[row["model"], row["size"]], abs=1e-6)
        check_latency_columns(row)
    report = (out / "report.md").read_text()
    assert "## Steady P50" in report and "## Capacity" in report and "| bf16 | 64x64 |" in report
    load = json.loads((out / "loads.json").read_text())["bf16"]  # the model's load as its INFO reports it
    assert load["load_seconds"] > 0 and "weights" in load["load_phases_s"] and load["warm_up_sizes"]
    assert "## Loads" in report and f"| bf16 | {load['load_seconds']:.1f} |" in report
    assert "perf.mixed_traffic" in json.loads((out / "environment.json").read_text())["command"]
