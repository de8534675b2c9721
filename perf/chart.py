"""latency.png: a sweep's rows as horizontal latency bars, coloured by the family of their stack."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from fluxserve.stacks import catalog_by_name
from perf.rows import DIRECT_SUFFIX, Row, speedup

# Families of the chart, in legend order, with their colours (derived from the catalog's Stack fields).
FAMILIES = {
    "eager": "#4c72b0",
    "step cache": "#55a868",
    "fp8 / int8, eager": "#c44e52",
    "compiled": "#8172b3",
    "compiled + fp8": "#dd8452",
    "multi-GPU": "#64b5cd",
    "other": "#b0b0b0",  # a name outside the catalog
}


def chart_family(name: str) -> str:
    """The chart's family of a row: its catalog stack's (a `<stack> (direct)` row is its stack's), checked in
    this order: several GPUs (context parallel), compiled (with fp8: `compiled + fp8`), quantized without
    compilation, a step cache, else eager (any dtype, attention kernel or CUDA graph); `other` outside the
    catalog."""
    stack = catalog_by_name().get(name.removesuffix(DIRECT_SUFFIX))
    if stack is None:
        return "other"
    if stack.gpus > 1:
        return "multi-GPU"
    if stack.compile != "none":
        return "compiled + fp8" if stack.quantization in ("fp8", "fp8row") else "compiled"
    if stack.quantization != "none":
        return "fp8 / int8, eager"
    return "step cache" if stack.cache != "none" else "eager"


def _has_step_cache(name: str) -> bool:
    stack = catalog_by_name().get(name.removesuffix(DIRECT_SUFFIX))
    return stack is not None and stack.cache != "none"


def _steps_label(row: Row) -> str:
    steps = row.steps_computed
    return f"{steps:.0f}/{row.config.steps}" if abs(steps - round(steps)) < 0.05 else f"{steps:.1f}/{row.config.steps}"


def write_chart(path: Path, rows: list[Row], title: str, baseline: str = "bf16") -> None:
    """Horizontal P50 bars, fastest at the top, coloured by family (`chart_family`), with P90 marks and P99
    whiskers; each bar labelled with its P50, its speed-up against the baseline (whose P50 is a dashed line) and,
    for step-cache stacks, the steps computed (`9/28`). Log scale when the latencies span more than 10x (eager
    int8 at 40 s would flatten the 2-5 s rows that matter). About 1200 px wide; the plotted numbers go into the
    PNG's `fluxserve` text, by row in results.csv order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ordered = sorted(rows, key=lambda row: row.p50_s)
    y = np.arange(len(ordered))
    p50, p90, p99 = (np.array([getattr(row, key) for row in ordered]) for key in ("p50_s", "p90_s", "p99_s"))
    families = [chart_family(row.name) for row in ordered]
    base = next((row for row in rows if row.name == baseline), None)
    log = p99.max() / p50.min() > 10
    legend_in = 0.6  # inches below the axes for the legend
    height = 1.9 + legend_in + 0.28 * len(ordered)
    figure = Figure(figsize=(10, height))
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots()
    bars = axes.barh(y, p50, height=0.7, color=[FAMILIES[family] for family in families], edgecolor="white",
                     linewidth=0.5)
    for bar, row in zip(bars, ordered):
        if row.name.endswith(DIRECT_SUFFIX):
            bar.set_hatch("///")
        if row.name == baseline:
            bar.set_edgecolor("black")
            bar.set_linewidth(1.5)
    axes.errorbar(p50, y, xerr=[np.zeros_like(p50), p99 - p50], fmt="none", ecolor="black", elinewidth=0.8,
                  capsize=3)
    axes.scatter(p90, y, marker="|", s=90, color="black", linewidths=1.5, zorder=3)
    notes = []
    for position, row, end in zip(y, ordered, p99):
        parts = [f"{row.p50_s:.2f} s"]
        ratio = speedup(row, base)
        if ratio is not None:
            parts.append(f"{ratio:.2f}x")
        if _has_step_cache(row.name):
            parts.append(f"{_steps_label(row)} steps")
        notes.append(axes.annotate("   ".join(parts), (end, position), textcoords="offset points", xytext=(5, 0),
                                   va="center", fontsize=8, zorder=4,  # over the baseline's line
                                   bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"}))
    labels = [f"{row.name} (baseline)" if row.name == baseline else row.name for row in ordered]
    axes.set_yticks(y, labels, fontsize=8)
    for label, row in zip(axes.get_yticklabels(), ordered):
        if row.name == baseline:
            label.set_fontweight("bold")
    axes.set_ylim(len(ordered) - 0.5, -0.5)  # fastest at the top
    if log:
        axes.set_xscale("log")
        axes.set_xlim(10 ** np.floor(np.log10(p50.min())), p99.max() * 1.5)
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    else:
        axes.set_xlim(0, p99.max() * 1.5)
    axes.grid(axis="x", which="major", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.set_xlabel("latency per request (s" + (", log scale" if log else "") + "): bar P50, tick P90, whisker P99")
    handles = [Patch(color=color, label=family) for family, color in FAMILIES.items() if family in families]
    handles += [Line2D([], [], color="black", marker="|", linestyle="none", markersize=9, label="P90"),
                Line2D([], [], color="black", linewidth=0.8, label="P99")]
    if any(row.name.endswith(DIRECT_SUFFIX) for row in ordered):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="in-process, no server"))
    if base is not None:
        axes.axvline(base.p50_s, color="black", linestyle="--", linewidth=0.8, zorder=1)
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=0.8,
                              label=f"baseline {baseline}: {base.p50_s:.2f} s"))
    figure.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    if any(row.baseline_p50_s is not None for row in rows):
        ratio_note = f"; Nx: speed-up against the {baseline} P50 of the row's own run"
    else:
        ratio_note = f"; Nx: speed-up against {baseline}'s P50" if base is not None else ""
    figure.suptitle(textwrap.fill(f"{title}{ratio_note}; N/M steps: steps computed by step-cache stacks", 110),
                    fontsize=9)
    figure.tight_layout(rect=(0, legend_in / height, 1, 1))
    # a label that would run past the axes goes inside its bar instead (the slowest rows)
    renderer = canvas.get_renderer()
    right = axes.get_window_extent(renderer).x1
    for note, value in zip(notes, p50):
        if note.get_window_extent(renderer).x1 > right:
            note.xy = (value, note.xy[1])
            note.set_position((-5, 0))
            note.set_horizontalalignment("right")
            note.set_color("white")
            note.set_fontweight("bold")
            note.get_bbox_patch().set_visible(False)
    rank = {id(row): index for index, row in enumerate(ordered)}
    data = {row.name: {"p50_s": row.p50_s, "p90_s": row.p90_s, "p99_s": row.p99_s, "family": chart_family(row.name),
                       "rank": rank[id(row)]} for row in rows}
    figure.savefig(path, format="png", dpi=120, metadata={"fluxserve": json.dumps(data)})
