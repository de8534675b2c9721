"""The committed GPU results: each GPU's headline table, chart and README block hold the newest served row of
every catalog stack of every run folder (perf.headline), and the check that says so fails when one is missing."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from PIL import Image

from conftest import ROOT
from fluxserve.stacks import catalog_by_name
from perf import headline
from perf.rows import read_rows, write_rows

RESULTS = ROOT / "perf" / "results"
GPU_FOLDERS = [folder for folder in sorted(RESULTS.iterdir()) if folder.is_dir() and headline.run_folders(folder)]


def test_there_are_gpu_results_to_check():
    assert [folder.name for folder in GPU_FOLDERS] == ["h200"]


@pytest.mark.parametrize("gpu_folder", GPU_FOLDERS, ids=lambda folder: folder.name)
def test_the_headline_holds_every_runs_newest_served_catalog_row(gpu_folder):
    table = {row.name: row for row in read_rows(gpu_folder / "results.csv")}
    catalog = catalog_by_name()
    for run in headline.run_folders(gpu_folder):
        for row in read_rows(run / "results.csv"):
            if row.mode != "server" or row.name not in catalog or not headline.at_seed_configuration(row):
                continue
            assert row.name in table, f"{run.name} measured {row.name}, which the headline of {gpu_folder} lacks"
            assert table[row.name].measured_at >= row.measured_at, (row.name, run.name, table[row.name].run)
    for row in table.values():
        measured_in = gpu_folder / row.run / "results.csv"
        base = next(r for r in read_rows(measured_in) if r.name == headline.BASELINE and r.mode == "server")
        assert row.baseline_p50_s == base.p50_s  # the ratio's base is the row's own run's bf16


@pytest.mark.parametrize("gpu_folder", GPU_FOLDERS, ids=lambda folder: folder.name)
def test_the_committed_headline_table_chart_and_readme_block_are_up_to_date(gpu_folder):
    assert headline.check(gpu_folder, headline.README) == []
    plotted = json.loads(Image.open(gpu_folder / "latency.png").text["fluxserve"])
    assert set(plotted) == {row.name for row in read_rows(gpu_folder / "results.csv")}


def copy_runs(gpu_folder, tmp_path):
    """The run folders' results alone (no logs, no images) in a scratch GPU folder, and a README with the block."""
    scratch = tmp_path / gpu_folder.name
    for run in headline.run_folders(gpu_folder):
        (scratch / run.name).mkdir(parents=True)
        for name in ("results.csv", "environment.json"):
            shutil.copy(run / name, scratch / run.name / name)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n" + "\n".join(headline.readme_markers(scratch)) + "\nrest\n")
    return scratch, readme


def test_the_check_fails_when_a_row_is_missing_a_run_is_added_or_the_readme_block_edited(tmp_path):
    scratch, readme = copy_runs(GPU_FOLDERS[0], tmp_path)
    assert headline.main([str(scratch), "--readme", str(readme)]) == 0
    assert headline.main([str(scratch), "--check", "--readme", str(readme)]) == 0
    rows = read_rows(scratch / "results.csv")
    write_rows(scratch / "results.csv", rows[1:])
    assert headline.check(scratch, readme) == ["results.csv"]
    assert headline.main([str(scratch), "--check", "--readme", str(readme)]) == 1
    headline.main([str(scratch), "--readme", str(readme)])
    assert headline.check(scratch, readme) == []
    newer = scratch / "z-newer-run"
    shutil.copytree(scratch / rows[0].run, newer)
    write_rows(newer / "results.csv", [dataclasses.replace(row, measured_at="2030-01-01T00:00:00+00:00")
                                       for row in read_rows(newer / "results.csv")])
    assert headline.check(scratch, readme) == ["results.csv", "results.md", str(readme)]
    headline.main([str(scratch), "--readme", str(readme)])
    readme.write_text(readme.read_text().replace(f"`{rows[0].name}`", "`renamed`"))
    assert headline.check(scratch, readme) == [str(readme)]


def test_the_newest_row_wins_and_its_ratio_is_against_its_own_runs_baseline(tmp_path):
    scratch, readme = copy_runs(GPU_FOLDERS[0], tmp_path)
    older_run = headline.run_folders(scratch)[0]
    template = next(row for row in read_rows(older_run / "results.csv") if row.name == "bf16" and row.mode == "server")
    stack = "bf16-compile-regional"
    for name, bf16_s, stack_s, when in (("a-old", 5.0, 2.5, "2030-01-01T00:00:00+00:00"),
                                        ("b-new", 4.0, 2.0, "2030-01-02T00:00:00+00:00")):
        run = scratch / name
        run.mkdir()
        shutil.copy(older_run / "environment.json", run / "environment.json")
        write_rows(run / "results.csv", [
            dataclasses.replace(template, p50_s=bf16_s, measured_at=when),
            dataclasses.replace(template, name=stack, p50_s=stack_s, measured_at=when),
            dataclasses.replace(template, name=stack, mode="direct", p50_s=0.1, measured_at=when),  # not served
            dataclasses.replace(template, name="not-in-the-catalog", p50_s=0.1, measured_at=when),
        ])
    headline.main([str(scratch), "--readme", str(readme)])
    table = {row.name: row for row in read_rows(scratch / "results.csv")}
    assert table[stack].run == "b-new" and table[stack].p50_s == 2.0 and table[stack].baseline_p50_s == 4.0
    assert table["bf16"].run == "b-new" and "not-in-the-catalog" not in table
    assert f"| `{stack}` | 2.00 |" in readme.read_text() and "| 2.00x |" in readme.read_text()
    markdown = (scratch / "results.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {stack} |"))
    assert "| 2.00x |" in line and line.endswith("| b-new |")
