"""`python -m perf.sweep` over three stacks (plus one in-process, one loaded twice) on the real server, then a
resumed rerun."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, WARMUP_SIZE, start_server
from fluxserve.server.serving import WARMUP_SIZES_ENV

MODELS = ["fp16", "bf16", "bf16-fbcache-0.3", "bf16-cp2"]  # the baseline (bf16) is measured first all the same
EXPECTED_ORDER = ["bf16", "bf16 (direct)", "fp16", "bf16-fbcache-0.3", "bf16-cp2"]  # direct right after served
SERVED = [0, 2, 3, 4]
REQUESTS = 3
SWEEP_TIMEOUT_S = 600
TIME_COLUMNS = {"Average Time (s)": "average_s", "Min Time (s)": "min_s", "P50 Time (s)": "p50_s",
                "P90 Time (s)": "p90_s", "P99 Time (s)": "p99_s"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("sweep-server"), [])
    yield server
    server.stop()


def sweep(server, output, models: list[str], *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "perf.sweep", "--url", server.http_url, "--models", ",".join(models),
        "--requests", str(REQUESTS), "--concurrency", "2", "--steps", "2", "--height", "64", "--width", "64",
        "--output", str(output), *extra,
    ]
    # --direct builds the stack in the sweep's process as the server's model does: the same weights and the same
    # warm-up size (start_server's --warmup-size; at the default 1024x1024 the warm-up alone took 90 s on 2 cores).
    env = {**os.environ, "FLUXSERVE_WEIGHTS": "synthetic:tiny", WARMUP_SIZES_ENV: f"{WARMUP_SIZE}x{WARMUP_SIZE}"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory):
    output = tmp_path_factory.mktemp("results")
    done = sweep(server, output, MODELS, "--direct", "bf16", "--reload", "fp16")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output, done.stdout


def csv_rows(output) -> list[dict[str, str]]:
    with open(output / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


def markdown_rows(output) -> list[dict[str, str]]:
    lines = [line for line in (output / "results.md").read_text().splitlines() if line.startswith("| ")]
    header, *rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    return [dict(zip(header, row)) for row in rows]


def test_sweep_measures_every_stack_baseline_first_and_shows_progress(first_run):
    output, stdout = first_run
    rows = csv_rows(output)
    assert [row["name"] for row in rows] == EXPECTED_ORDER
    for row in rows:
        assert int(row["count"]) == REQUESTS
        latencies = [float(row[key]) for key in ("min_s", "p50_s", "p90_s", "p99_s")]
        assert latencies == sorted(latencies) and latencies[0] > 0
        assert float(row["min_s"]) <= float(row["average_s"]) <= float(row["p99_s"])
        assert 1 <= float(row["steps_computed"]) <= 2 and float(row["load_s"]) > 0
        assert row["device"] == "cpu" and row["weights"] == "synthetic:tiny" and row["peak_memory_gib"] == ""
        assert row["cudnn_version"] == ""  # no GPU: no cuDNN
        # the loop, inside the model's handler, inside the request's latency
        assert 0 < float(row["denoise_s"]) < float(row["model_s"]) < float(row["average_s"])
        phases = sum(float(row[phase]) for phase in ("text_encode_s", "denoise_s", "vae_decode_s"))
        assert float(row["text_encode_s"]) > 0 and float(row["vae_decode_s"]) > 0 and phases < float(row["model_s"])
    for index in SERVED:  # through the server: Triton's own statistics
        row = rows[index]
        assert row["mode"] == "server"
        assert 0 <= float(row["queue_s"]) and 0 < float(row["compute_s"]) <= float(row["average_s"])
    assert rows[1]["mode"] == "direct" and rows[1]["queue_s"] == ""
    assert [row["second_load_s"] != "" for row in rows] == [False, False, True, False, False]  # --reload fp16
    assert float(rows[2]["second_load_s"]) > 0 and "second load in" in stdout
    assert "[1/5] bf16: loaded in" in stdout and f"request {REQUESTS}/{REQUESTS}" in stdout
    assert "[2/5] bf16 (direct): built in" in stdout


def test_throughput_is_the_measured_requests_over_their_wall_time(first_run):
    output, _ = first_run
    for row in csv_rows(output):
        wall_s = REQUESTS / float(row["images_per_s"])
        # two at a time: the whole run outlasts its slowest request, and not the requests one after another
        assert float(row["p99_s"]) <= wall_s <= REQUESTS * float(row["average_s"]) + 0.5, row["name"]


@pytest.fixture(scope="module")
def unit_scale_run(tmp_path_factory, unit_scale_weights):
    """bf16 and bf16-cp2 swept on a server of the unit-scale weights (conftest.unit_scale_weights): on synthetic:tiny
    the blocks' contributions are below bf16's resolution, and the split image matched bf16's even with the
    all-to-all disabled."""
    server = start_server(tmp_path_factory.mktemp("unit-scale-server"), [],
                          env_extra={"FLUXSERVE_WEIGHTS": str(unit_scale_weights)})
    try:
        output = tmp_path_factory.mktemp("unit-scale-results")
        done = sweep(server, output, ["bf16", "bf16-cp2"], "--steps", "8", "--height", "128", "--width", "128")
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return output


def test_a_multi_gpu_stack_is_compared_with_the_same_stack_on_one_gpu(first_run, unit_scale_run):
    output, _ = first_run
    psnr = {row["name"]: row["psnr_one_gpu_db"] for row in csv_rows(output)}
    assert psnr.pop("bf16-cp2") != "" and set(psnr.values()) == {""}  # a multi-GPU stack's column alone
    # Against bf16's image, the same stack in one process, on weights where every block shows: correct code
    # 53.1 dB; ranks attending only to their own tokens 44.1; rotary embeddings of the other rank's tokens 41.6; the
    # all-to-all replaced by the identity 28.5; the heads' groups swapped on the way back 24.4.
    one_gpu = {row["name"]: row["psnr_one_gpu_db"] for row in csv_rows(unit_scale_run)}
    assert one_gpu["bf16"] == "" and float(one_gpu["bf16-cp2"]) >= 50, one_gpu


def test_psnr_is_against_the_baseline_image(first_run):
    output, _ = first_run
    psnr = {row["name"]: float(row["psnr_db"]) for row in csv_rows(output)}
    assert psnr["bf16"] == math.inf and psnr["bf16 (direct)"] == math.inf  # in-process = through the server
    assert 10 < psnr["fp16"] < math.inf
    for row in csv_rows(output):
        image = Image.open(output / row["image"])
        assert image.format == "PNG" and image.size == (64, 64)


def test_markdown_table_agrees_with_the_csv(first_run):
    output, _ = first_run
    rows, table = csv_rows(output), markdown_rows(output)
    assert [line["Optimization Technique"] for line in table] == EXPECTED_ORDER
    baseline_p50 = float(rows[0]["p50_s"])
    for row, line in zip(rows, table):
        for column, key in TIME_COLUMNS.items():
            assert float(line[column]) == pytest.approx(float(row[key]), abs=0.0051), (column, row["name"])
        assert line["Steps computed"] == f"{float(row['steps_computed']):.1f}/2"
        assert float(line["Load (s)"]) == pytest.approx(float(row["load_s"]), abs=0.051)
        assert float(line["Denoise (s)"]) == pytest.approx(float(row["denoise_s"]), abs=0.0051)
        assert float(line["In model (s)"]) == pytest.approx(float(row["model_s"]), abs=0.0051)
        assert row["measured_at"].replace("T", " ").startswith(line["Measured (UTC)"])
        second = line["Second load (s)"]
        assert second == "" if not row["second_load_s"] else float(second) == pytest.approx(
            float(row["second_load_s"]), abs=0.051)
        speedup = float(line["Speed-up vs bf16"].removesuffix("x"))
        assert speedup == pytest.approx(baseline_p50 / float(row["p50_s"]), abs=0.0051)
        psnr, expected = line["PSNR vs bf16 (dB)"], float(row["psnr_db"])
        assert psnr == "inf" if math.isinf(expected) else float(psnr) == pytest.approx(expected, abs=0.051)
        assert float(line["Images/s"]) == pytest.approx(float(row["images_per_s"]), abs=0.00051)
        one_gpu = row["psnr_one_gpu_db"]
        assert line["PSNR vs one GPU (dB)"] == ("" if not one_gpu else "inf" if math.isinf(float(one_gpu))
                                                else f"{float(one_gpu):.1f}")
    assert table[2]["Seed row"] == "Baseline (FP16)" and table[0]["Speed-up vs bf16"] == "1.00x"


def test_chart_plots_the_csv_numbers(first_run):
    output, _ = first_run
    chart = Image.open(output / "latency.png")
    assert chart.format == "PNG" and chart.size[0] == 1200
    plotted = json.loads(chart.info["fluxserve"])
    assert list(plotted) == EXPECTED_ORDER
    for row in csv_rows(output):
        assert {key: plotted[row["name"]][key] for key in ("p50_s", "p90_s", "p99_s")} == {
            key: float(row[key]) for key in ("p50_s", "p90_s", "p99_s")}
    assert sorted(plotted, key=lambda name: plotted[name]["rank"]) == sorted(plotted, key=lambda name: plotted[name]["p50_s"])
    assert {name: entry["family"] for name, entry in plotted.items()} == {
        "bf16": "eager", "bf16 (direct)": "eager", "fp16": "eager", "bf16-fbcache-0.3": "step cache",
        "bf16-cp2": "multi-GPU"}


def synthetic_row(name: str, p50_s: float, steps_computed: float = 28.0):
    """A results row as a sweep writes it, without measuring anything."""
    from perf.rows import DIRECT_SUFFIX, Config, Row

    config = Config("http", 1024, 1024, 28, 3.5, 10, 1, 0, "3ee57c87")
    return Row(name=name, mode="direct" if name.endswith(DIRECT_SUFFIX) else "server", config=config, count=10,
               average_s=p50_s, min_s=0.98 * p50_s, p50_s=p50_s, p90_s=1.02 * p50_s, p99_s=1.05 * p50_s,
               images_per_s=1 / p50_s,
               steps_computed=float(steps_computed), load_s=10.0, second_load_s=None, queue_s=None, compute_s=None,
               model_s=None, denoise_s=None, text_encode_s=None, vae_decode_s=None, peak_memory_gib=None,
               psnr_db=None, psnr_one_gpu_db=None, image="images/none.png", device="cuda:0", weights="synthetic:full",
               attention_kernel="", cudnn_version=None, measured_at="2026-12-01T00:00:00+00:00")


CHART_ROWS = {  # name: (P50 s, steps computed, family)
    "bf16": (5.25, 28, "eager"),
    "bf16 (direct)": (5.22, 28, "eager"),
    "bf16-cudnn-cudagraph": (5.42, 28, "eager"),
    "bf16-teacache-0.6": (1.94, 9, "step cache"),
    "bf16-fbcache-0.4": (3.87, 19.9, "step cache"),
    "bf16-fp8": (10.52, 28, "fp8 / int8, eager"),
    "bf16-fa2-fbcache-0.3-int8": (42.74, 28, "fp8 / int8, eager"),
    "bf16-compile-regional": (4.06, 28, "compiled"),
    "bf16-cudnn-fp8row-fusedqkv-compile-regional-cudagraph (direct)": (3.11, 28, "compiled + fp8"),
    "bf16-cudnn-fbcache-0.3-fp8-fusedqkv-compile-regional": (3.41, 28, "compiled + fp8"),
    "bf16-cp2": (2.9, 28, "multi-GPU"),
    "bf16-cudnn-ring4": (2.1, 28, "multi-GPU"),
    "bf16-taylorseer-interval5-cp2": (1.2, 8, "multi-GPU"),
    "something-else": (0.4, 28, "other"),
}


def test_chart_sorts_by_latency_and_colours_by_family(tmp_path):
    from perf.chart import FAMILIES, chart_family, write_chart

    from fluxserve.stacks import CATALOG

    rows = [synthetic_row(name, p50, steps) for name, (p50, steps, _) in CHART_ROWS.items()]
    write_chart(tmp_path / "latency.png", rows, "NVIDIA H200: a title", "bf16")
    chart = Image.open(tmp_path / "latency.png")
    assert chart.size[0] == 1200 and chart.size[1] < 2000  # readable at its size, no 4000 px strip
    plotted = json.loads(chart.info["fluxserve"])
    assert list(plotted) == list(CHART_ROWS)  # results.csv's order, the chart's own in `rank`
    by_rank = sorted(plotted, key=lambda name: plotted[name]["rank"])
    assert by_rank == sorted(CHART_ROWS, key=lambda name: CHART_ROWS[name][0])
    assert {name: entry["family"] for name, entry in plotted.items()} == {
        name: family for name, (_, _, family) in CHART_ROWS.items()}
    families = {chart_family(stack.name) for stack in CATALOG}
    assert families == set(FAMILIES) - {"other"}  # every family but `other` has catalog stacks
    assert all(chart_family(stack.name) == "multi-GPU" for stack in CATALOG if stack.gpus > 1)


def test_merge_without_sources_draws_the_reports_again(tmp_path):
    from perf.environment import read_runs, write_runs
    from perf.merge import catalog_order
    from perf.rows import write_rows

    folder = tmp_path / "h200"
    folder.mkdir()
    rows = sorted((synthetic_row(name, p50, steps) for name, (p50, steps, _) in CHART_ROWS.items()), key=catalog_order)
    write_rows(folder / "results.csv", rows)
    run = {"command": "python -m perf.sweep", "date": "2026-12-01T00:00:00+00:00", "python": "3.12",
           "versions": {"torch": "2.11.0"}, "triton_server": "2.51.0", "gpu": "NVIDIA H200", "cuda": "13.0",
           "driver": "580"}
    write_runs(folder, [run])
    before = (folder / "results.csv").read_text()
    done = subprocess.run([sys.executable, "-m", "perf.merge", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "results.csv").read_text() == before and read_runs(folder) == [run]
    assert list(json.loads(Image.open(folder / "latency.png").info["fluxserve"])) == [row.name for row in rows]
    assert "![latency per stack](latency.png)" in (folder / "results.md").read_text()
    done = subprocess.run([sys.executable, "-m", "perf.merge", str(tmp_path / "nothing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no results.csv" in done.stderr


def test_environment_records_command_and_versions(first_run):
    output, _ = first_run
    (run,) = json.loads((output / "environment.json").read_text())["runs"]
    assert run["command"].startswith("python -m perf.sweep --url") and "--direct bf16 --reload fp16" in run["command"]
    assert run["triton_server"] and run["gpu"] is None
    assert all(run["versions"][package] for package in ("torch", "diffusers", "torchao", "tritonclient"))
    assert run["command"] in (output / "results.md").read_text()


def test_rerun_skips_finished_stacks_and_goes_on_past_a_failing_one(server, first_run):
    output, _ = first_run
    before = (output / "results.csv").read_text()
    done = sweep(server, output, [*MODELS, "bf16-fp8", "bf16-fbcache-0.2"], "--direct", "bf16")
    assert done.returncode == 1  # bf16-fp8 cannot load on CPU
    assert done.stdout.count("already in results.csv for this configuration: skipped") == 5
    assert "bf16-fp8: FAILED: load failed for model 'bf16-fp8'" in done.stdout
    assert "compute capability 8.9" in done.stdout and "Traceback" not in done.stdout + done.stderr
    after = (output / "results.csv").read_text()
    assert after.startswith(before)
    assert [row["name"] for row in csv_rows(output)] == [*EXPECTED_ORDER, "bf16-fbcache-0.2"]
    assert [line["Optimization Technique"] for line in markdown_rows(output)][-1] == "bf16-fbcache-0.2"
    assert len(json.loads((output / "environment.json").read_text())["runs"]) == 2


@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
                                       (None, "cpu")])
def test_results_folder_is_named_for_the_gpu(name, slug):
    from perf.environment import gpu_slug

    assert gpu_slug(name) == slug


def test_results_csv_of_an_older_version_gains_the_new_columns(first_run, tmp_path):
    from perf.rows import append_row, read_rows

    output, _ = first_run
    rows = csv_rows(output)
    old_columns = [name for name in rows[0] if name not in ("second_load_s", "model_s")]
    with open(tmp_path / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[:2])
    append_row(tmp_path / "results.csv", read_rows(output / "results.csv")[2])
    merged = read_rows(tmp_path / "results.csv")
    assert [row.name for row in merged] == EXPECTED_ORDER[:3]
    assert merged[0].model_s is None and merged[0].p50_s == float(rows[0]["p50_s"])
    assert merged[2].second_load_s == float(rows[2]["second_load_s"])


def test_gpu_sweep_refuses_a_plan_with_more_shards_than_gpus(tmp_path):
    import torch

    gpus = torch.cuda.device_count()
    plan = tmp_path / "plan.txt"
    plan.write_text("stacks=bf16\n\n" * (gpus + 1))  # blank lines are no shards
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # its python3 has torch
    done = subprocess.run(["bash", str(ROOT / "perf" / "gpu_sweep.sh"), str(plan), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"has {gpus + 1} shard line(s) on GPU(s) " in done.stderr and f"this host has {gpus} GPU(s)" in done.stderr
    assert not (tmp_path / "out" / "logs" / "gpu0-server.log").exists()  # no server was started


def test_merge_replaces_rows_by_name_but_keeps_one_runs_baseline(first_run, tmp_path):
    import dataclasses

    from perf.environment import read_runs, write_runs
    from perf.rows import read_rows, write_rows

    output, _ = first_run
    measured = {row.name: row for row in read_rows(output / "results.csv")}
    run = read_runs(output)[0]
    later = {name: dataclasses.replace(measured[name], **{column: getattr(measured[name], column) + 1.0
                                                        for column in TIME_COLUMNS.values()})
             for name in ("bf16", "fp16", "bf16-fbcache-0.3")}  # measured again, a second slower
    for folder, rows, date in ((tmp_path / "a", [measured[n] for n in ("bf16", "bf16 (direct)", "fp16")], "1"),
                               (tmp_path / "b", list(later.values()), "2")):
        folder.mkdir()
        write_rows(folder / "results.csv", rows)
        write_runs(folder, [{**run, "date": run["date"] + date}])
    later = {row.name: row for row in read_rows(tmp_path / "b" / "results.csv")}  # as results.csv rounds them

    def merge(*args: str) -> dict[str, float]:
        done = subprocess.run([sys.executable, "-m", "perf.merge", str(tmp_path / "dest"), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return {row["name"]: float(row["p50_s"]) for row in csv_rows(tmp_path / "dest")}

    merged = merge(str(tmp_path / "a"), str(tmp_path / "b"))
    assert list(merged) == ["fp16", "bf16", "bf16 (direct)", "bf16-fbcache-0.3"]  # catalog order
    assert merged["bf16"] == measured["bf16"].p50_s  # the first folder's baseline, not b's
    assert merged["fp16"] == later["fp16"].p50_s and merged["bf16-fbcache-0.3"] == later["bf16-fbcache-0.3"].p50_s
    assert [row["Optimization Technique"] for row in markdown_rows(tmp_path / "dest")] == list(merged)
    assert len(read_runs(tmp_path / "dest")) == 2
    assert merge(str(tmp_path / "b"))["bf16"] == measured["bf16"].p50_s  # the destination's baseline stays
    rebased = merge(str(tmp_path / "b"), "--baseline-from", str(tmp_path / "b"))
    assert rebased["bf16"] == later["bf16"].p50_s and "bf16 (direct)" not in rebased


def test_merge_refuses_a_folder_that_is_not_a_sweep(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, "-m", "perf.merge", str(tmp_path / "dest"), str(tmp_path / "empty")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a sweep folder: no results.csv or environment.json" in done.stderr
    assert not (tmp_path / "dest").exists()
