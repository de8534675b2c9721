"""A short headless Locust run of perf/locustfile.py against two models on the real server."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from conftest import ROOT, start_server

MODELS = ["bf16", "fp16"]
MAX_REQUESTS = 8
# A bound on a run that stops making requests, not on a slow one: the request cap ends the run, after 8 requests
# of 2 steps at 64x64 (seconds on 2 CPU cores); a run ended by this time misses the cap and fails.
RUN_TIME_S = 180
LOCUST_TIMEOUT_S = RUN_TIME_S + 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("locust-server"), MODELS)
    yield server
    server.stop()


def rows_by(path, key: str) -> dict[str, dict[str, str]]:
    with open(path, newline="") as file:
        return {row[key]: row for row in csv.DictReader(file)}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_headless_run_reports_every_model_with_exact_latencies(server, tmp_path, protocol):
    prefix = tmp_path / "run"
    host = server.http_url if protocol == "http" else server.grpc_url
    command = [
        sys.executable, "-m", "locust", "-f", "perf/locustfile.py", "--headless", "--users", "2", "--spawn-rate", "2",
        "--run-time", f"{RUN_TIME_S}s", "--max-requests", str(MAX_REQUESTS), "--host", host,
        "--protocol", protocol, "--steps", "2", "--height", "64", "--width", "64", "--csv", str(prefix),
        "--only-summary",
    ]
    env = {**os.environ, "LOCUST_MODELS": ",".join(MODELS)}  # the models from the environment this time
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]

    stats = rows_by(f"{prefix}_stats.csv", "Name")
    exact = rows_by(f"{prefix}_exact.csv", "model")
    assert set(exact) == set(MODELS)
    assert sum(int(stats[model]["Request Count"]) for model in MODELS) == MAX_REQUESTS
    for model in MODELS:
        locust_row, exact_row = stats[model], exact[model]
        assert locust_row["Type"] == f"triton-{protocol}"
        assert int(locust_row["Request Count"]) > 0 and int(locust_row["Failure Count"]) == 0
        assert int(exact_row["count"]) == int(locust_row["Request Count"]) and int(exact_row["failures"]) == 0
        # Locust's average and minimum are exact; its percentiles are rounded, ours are not.
        assert float(exact_row["average_s"]) * 1000 == pytest.approx(float(locust_row["Average Response Time"]), abs=1)
        assert float(exact_row["min_s"]) * 1000 == pytest.approx(float(locust_row["Min Response Time"]), abs=1)
        values = [float(exact_row[key]) for key in ("min_s", "p50_s", "p90_s", "p99_s")]
        assert values == sorted(values) and values[0] > 0
    assert "Exact latencies per model" in done.stdout and "| bf16 |" in done.stdout
