"""Merge sweep folders into one results folder, as perf/results/<gpu>/ is made from several GPU calls.

    python3 -m perf.merge DEST SRC [SRC ...] [--baseline-from SRC]
    python3 -m perf.merge DEST          # no source: only writes results.md and latency.png again

GPU time comes in short calls on one or more GPUs, so one table is measured into several folders (one per call
and GPU: perf/gpu_sweep.sh's OUT/gpu<i>/). Each SRC's rows replace DEST's rows of the same name and
configuration, in the order given, and add the others. The baseline's rows (`bf16` and `bf16 (direct)`) are the
exception: the table's speed-ups are ratios against one run's baseline, so DEST's stay, or, when DEST has none,
the first SRC's; --baseline-from names the folder whose baseline stands instead. Rows are kept in catalog order,
environment.json gains the sources' runs, and results.md and latency.png are written again from results.csv.
Without SRC nothing is merged: the reports are drawn again from DEST's results.csv (after a change to the table or
the chart's code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxserve.stacks import CATALOG
from perf.environment import read_runs, write_runs
from perf.report import write_reports
from perf.rows import DIRECT_SUFFIX, Row, read_rows, write_rows

CATALOG_ORDER = {stack.name: index for index, stack in enumerate(CATALOG)}


def catalog_order(row: Row) -> tuple[int, bool, str]:
    """Catalog order, each stack's direct row right after its served one; names outside the catalog last."""
    stack = row.name.removesuffix(DIRECT_SUFFIX)
    return CATALOG_ORDER.get(stack, len(CATALOG_ORDER)), row.name != stack, row.name


def merge_rows(dest: list[Row], sources: list[list[Row]], baseline: str, baseline_from: int | None) -> list[Row]:
    """DEST's rows with each source's replacing those of the same name and configuration; the baseline's rows
    from source `baseline_from` if given, else DEST's, else the first source's that has them."""
    baseline_names = {baseline, baseline + DIRECT_SUFFIX}

    def has_baseline(rows: list[Row]) -> bool:
        return any(row.name in baseline_names for row in rows)

    if baseline_from is None and not has_baseline(dest):
        baseline_from = next((index for index, rows in enumerate(sources) if has_baseline(rows)), None)
    merged = {(row.name, row.config): row for row in dest if baseline_from is None or row.name not in baseline_names}
    for index, rows in enumerate(sources):
        for row in rows:
            if row.name not in baseline_names or index == baseline_from:
                merged[(row.name, row.config)] = row
    return sorted(merged.values(), key=catalog_order)


def merge_runs(folders: list[Path]) -> list[dict]:
    """Every run of every folder's environment.json, once each, by date."""
    runs = {(run["command"], run["date"]): run for folder in folders for run in read_runs(folder)}
    return sorted(runs.values(), key=lambda run: run["date"])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m perf.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="the results folder to merge into (made if missing)")
    parser.add_argument("sources", type=Path, nargs="*",
                        help="sweep folders, oldest first (none: only write DEST's reports again)")
    parser.add_argument("--baseline", default="bf16", help="the stack the table's ratios compare with (default bf16)")
    parser.add_argument("--baseline-from", type=Path, help="the source whose baseline rows stand")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for folder in args.sources:
        missing = [name for name in ("results.csv", "environment.json") if not (folder / name).exists()]
        if missing:
            print(f"error: {folder} is not a sweep folder: no {' or '.join(missing)}", file=sys.stderr)
            return 2
    if not args.sources and not (args.dest / "results.csv").exists():
        print(f"error: {args.dest} has no results.csv to draw the reports from", file=sys.stderr)
        return 2
    if args.baseline_from is not None and args.baseline_from not in args.sources:
        print(f"error: --baseline-from {args.baseline_from} is not one of the sources", file=sys.stderr)
        return 2
    baseline_from = args.sources.index(args.baseline_from) if args.baseline_from is not None else None
    rows = merge_rows(read_rows(args.dest / "results.csv"), [read_rows(f / "results.csv") for f in args.sources],
                      args.baseline, baseline_from)
    runs = merge_runs([args.dest, *args.sources])
    args.dest.mkdir(parents=True, exist_ok=True)
    write_rows(args.dest / "results.csv", rows)
    write_runs(args.dest, runs)
    config = next((row.config for row in rows if row.name == args.baseline), rows[0].config if rows else None)
    if config is not None:
        write_reports(args.dest, config, args.baseline, runs[-1])
    print(f"merge: {len(rows)} row(s) in {args.dest / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
