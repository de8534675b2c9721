"""The headline results of one GPU: the newest served row of every catalog stack, merged from all its runs.

    python3 -m perf.headline perf/results/h200            # write results.csv, results.md, latency.png, README block
    python3 -m perf.headline perf/results/h200 --check    # exit 1 when they differ from what the run folders hold

GPU time comes in short calls, each measuring a few stacks into a run folder of its own (a sub-folder holding a
sweep's results.csv and environment.json, e.g. perf/results/h200/s10-confirm-call5/). The headline takes, for each
catalog stack, the served row at the seed's configuration (1024x1024, 28 steps, guidance 3.5, concurrency 1) that
was measured last (`measured_at`: the newest wins), and gives its speed-up against the baseline measured in that
same run: machines and sessions differ by up to 5%, so a ratio is only fair within one run. The `Run` column names
the folder. The project's README shows the same rows in a block between two markers, written here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from fluxserve.stacks import catalog_by_name
from perf import markdown_table
from perf.chart import write_chart
from perf.environment import write_runs
from perf.merge import catalog_order, merge_runs
from perf.report import table
from perf.rows import Row, read_rows, speedup, write_rows

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BASELINE = "bf16"
SEED_CONFIGURATION = dict(height=1024, width=1024, steps=28, guidance=3.5, concurrency=1)
REPORTS = ("results.csv", "results.md")  # compared by --check; latency.png is drawn from the same rows


def readme_markers(gpu_folder: Path) -> tuple[str, str]:
    """The lines around the README's generated block for this GPU."""
    return (f"<!-- headline {gpu_folder.name}: written by `python3 -m perf.headline`, do not edit -->",
            f"<!-- end of headline {gpu_folder.name} -->")


def run_folders(gpu_folder: Path) -> list[Path]:
    """The sub-folders that hold a sweep's results (results.csv and environment.json), by name."""
    return sorted(folder for folder in gpu_folder.iterdir()
                  if (folder / "results.csv").is_file() and (folder / "environment.json").is_file())


def at_seed_configuration(row: Row) -> bool:
    return all(getattr(row.config, key) == value for key, value in SEED_CONFIGURATION.items())


def headline_candidates(run: Path) -> list[Row]:
    """A run's served catalog rows at the seed's configuration, each with the run's name and baseline P50."""
    rows = [row for row in read_rows(run / "results.csv") if row.mode == "server" and at_seed_configuration(row)]
    base = next((row for row in rows if row.name == BASELINE), None)
    catalog = catalog_by_name()
    return [dataclasses.replace(row, run=run.name, baseline_p50_s=base.p50_s if base else None)
            for row in rows if row.name in catalog]


def headline_rows(gpu_folder: Path) -> list[Row]:
    """The newest candidate row of each stack over every run folder, in catalog order."""
    newest: dict[str, Row] = {}
    for run in run_folders(gpu_folder):
        for row in headline_candidates(run):
            if row.name not in newest or row.measured_at > newest[row.name].measured_at:
                newest[row.name] = row
    return sorted(newest.values(), key=catalog_order)


def headline_markdown(rows: list[Row], gpu: str, runs: list[str]) -> str:
    return (
        f"# FLUX.1-dev stacks through Triton: {gpu}, headline\n\n"
        "The newest served row of every catalog stack measured on this GPU, at the seed's configuration (1024x1024, "
        "28 steps, guidance 3.5, batch 1, concurrency 1), merged from the run folders beside this file by "
        "`python3 -m perf.headline` (commands, versions and readings: README.md; each run's own table: "
        f"`<run>/results.md`). Runs: {', '.join(f'`{run}`' for run in runs)}.\n\n"
        + table(rows, BASELINE)
        + f"\nLatency is client-side, per request, in seconds. Speed-up: the P50 of `{BASELINE}` measured in the "
        "row's own run (the `Run` column) over the row's P50; ratios across runs compare less well (machines and "
        f"sessions differ by up to 5%). PSNR: the row's fixed-seed image against its run's `{BASELINE}` image "
        "(numerical deviation, not quality; inf: identical).\n\n![latency per stack](latency.png)\n"
    )


def readme_block(rows: list[Row], gpu_folder: Path) -> str:
    """The README's short headline: the fastest uncached and the fastest of any kind, and the rows by P50."""
    catalog = catalog_by_name()
    uncached = [row for row in rows if catalog[row.name].cache == "none"]

    def ratio(row: Row) -> str:
        value = speedup(row, None)
        return "n/a" if value is None else f"{value:.2f}x"

    def figure(row: Row) -> str:
        return f"`{row.name}`, {row.p50_s:.2f} s P50, {ratio(row)} its run's `{BASELINE}`"

    lines = []
    if uncached:
        lines.append(f"Fastest without a step cache: {figure(min(uncached, key=lambda row: row.p50_s))}. "
                     f"Fastest of any kind: {figure(min(rows, key=lambda row: row.p50_s))}.\n")
    cells = [[f"`{row.name}`", f"{row.p50_s:.2f}", f"{row.p99_s:.2f}", f"{row.steps_computed:.0f}/{row.config.steps}",
              ratio(row), f"{row.load_s:.1f}", row.run]
             for row in sorted(rows, key=lambda row: row.p50_s)]
    lines.append(markdown_table(["stack", "P50 (s)", "P99 (s)", "steps computed", f"vs its run's {BASELINE}",
                                 "load (s)", "run"], cells))
    start, end = readme_markers(gpu_folder)
    return "\n".join([start, *lines, end])


def readme_with_block(readme: str, block: str, gpu_folder: Path) -> str:
    start, end = readme_markers(gpu_folder)
    if start not in readme or end not in readme:
        raise SystemExit(f"error: README.md has no headline block for {gpu_folder.name} ({start!r} ... {end!r})")
    before, rest = readme.split(start, 1)
    return before + block + rest.split(end, 1)[1]


def write_headline(gpu_folder: Path, out: Path, readme: Path) -> None:
    """results.csv, results.md, latency.png and environment.json into `out`; the README's block into `readme`."""
    runs = run_folders(gpu_folder)
    rows = headline_rows(gpu_folder)
    environments = merge_runs(runs)
    gpu = next((run["gpu"] for run in reversed(environments) if run.get("gpu")), gpu_folder.name)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "results.csv", rows)
    write_runs(out, environments)
    (out / "results.md").write_text(headline_markdown(rows, gpu, [run.name for run in runs]))
    if rows:
        write_chart(out / "latency.png", rows, f"{gpu}, newest served row of each stack", BASELINE)
    readme.write_text(readme_with_block(readme.read_text(), readme_block(rows, gpu_folder), gpu_folder))


def check(gpu_folder: Path, readme: Path) -> list[str]:
    """What differs between the committed headline and the one the run folders give (empty: nothing)."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        fresh_readme = scratch / "README.md"
        fresh_readme.write_text(readme.read_text())
        write_headline(gpu_folder, scratch / "headline", fresh_readme)
        stale = [name for name in REPORTS
                 if not (gpu_folder / name).exists()
                 or (gpu_folder / name).read_text() != (scratch / "headline" / name).read_text()]
        if fresh_readme.read_text() != readme.read_text():
            stale.append(str(readme))
    return stale


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.headline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gpu_folder", type=Path, help="a GPU's results folder, e.g. perf/results/h200")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the headline is stale")
    parser.add_argument("--readme", type=Path, default=README, help="the README holding the headline block")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not run_folders(args.gpu_folder):
        print(f"error: {args.gpu_folder} holds no run folder (a sub-folder with results.csv and environment.json)",
              file=sys.stderr)
        return 2
    if args.check:
        stale = check(args.gpu_folder, args.readme)
        if stale:
            print(f"stale headline: {', '.join(stale)}; run `python3 -m perf.headline {args.gpu_folder}`",
                  file=sys.stderr)
            return 1
        print(f"headline of {args.gpu_folder} is up to date")
        return 0
    write_headline(args.gpu_folder, args.gpu_folder, args.readme)
    print(f"headline: {len(headline_rows(args.gpu_folder))} row(s) in {args.gpu_folder / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
