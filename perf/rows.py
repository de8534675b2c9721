"""A sweep's rows: one measured stack per line of results.csv (the one source of every table and chart), its
Config (what makes two measurements comparable), and a row's speed-up, which the table and the chart both show."""

from __future__ import annotations

import csv
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

DIRECT_SUFFIX = " (direct)"  # a stack measured in-process (--direct) is the row `<stack> (direct)`


@dataclass(frozen=True)
class Config:
    """What makes two measurements comparable; a row is skipped on rerun when its name and Config match."""

    protocol: str
    height: int
    width: int
    steps: int
    guidance: float
    requests: int
    concurrency: int
    seed: int
    prompts: str  # digest of the prompt set

    def describe(self) -> str:
        return (f"{self.height}x{self.width}, {self.steps} steps, guidance {self.guidance:g}, {self.requests} requests "
                f"at concurrency {self.concurrency} over {self.protocol}, seeds from {self.seed}, "
                f"prompt set {self.prompts}")

    def image_name(self, name: str) -> str:
        """File name of a stack's reference image: it depends on the request settings, not on the load."""
        slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
        return (f"{slug}_{self.height}x{self.width}_{self.steps}steps_g{self.guidance:g}_seed{self.seed}_"
                f"{self.prompts}.png")


@dataclass(frozen=True)
class Row:
    """One measured stack: a line of results.csv (latencies in seconds, memory in GiB), its Config flattened."""

    name: str
    mode: str  # "server", or "direct": in-process, no server
    config: Config
    count: int
    average_s: float
    min_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    images_per_s: float | None  # measured requests / the wall time they took, at the configured concurrency
    steps_computed: float  # mean over the measured requests
    load_s: float
    second_load_s: float | None  # a second load right after the first (--reload): torch.compile's caches warm
    queue_s: float | None  # Triton's mean queue time per request (server rows)
    compute_s: float | None  # Triton's mean compute time per request (server rows)
    model_s: float | None  # mean time in the model's request handler (INFO.latency_ms); the rest is serving
    denoise_s: float | None  # mean time of the denoising loop alone (INFO.timings_ms), to split model from overhead
    text_encode_s: float | None  # mean time of the text encoders (INFO.timings_ms; results.csv only)
    vae_decode_s: float | None  # mean time of the VAE's decoding: with text_encode_s, most of what the loop leaves
    peak_memory_gib: float | None
    psnr_db: float | None  # reference image vs the baseline's: numerical deviation, not quality
    psnr_one_gpu_db: float | None  # a multi-GPU stack's image vs the same stack's on one GPU, when measured
    image: str
    device: str
    weights: str
    attention_kernel: str
    cudnn_version: int | None  # the cuDNN the model's process loaded (INFO), None without a GPU
    measured_at: str
    run: str | None = None  # a headline row (perf.headline): the run folder it was measured in
    baseline_p50_s: float | None = None  # a headline row: the baseline's P50 in that same run, its speed-up's base

    @staticmethod
    def columns() -> list[dataclasses.Field]:
        """The CSV columns: the row's fields with `config` replaced by the Config's fields."""
        fields = []
        for f in dataclasses.fields(Row):
            fields += dataclasses.fields(Config) if f.name == "config" else [f]
        return fields

    def to_csv(self) -> dict[str, str]:
        config = dataclasses.asdict(self.config)
        return {f.name: _format(config[f.name] if f.name in config else getattr(self, f.name)) for f in self.columns()}

    @classmethod
    def from_csv(cls, record: dict[str, str]) -> Row:
        # .get: a column added since an older results.csv was written reads as empty (None).
        values = {f.name: _parse(record.get(f.name, ""), f.type) for f in cls.columns()}
        config = Config(**{f.name: values.pop(f.name) for f in dataclasses.fields(Config)})
        return cls(config=config, **values)


def _format(value) -> str:
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _parse(text: str, annotation: str):
    if text == "" and "None" in annotation:
        return None
    return {"int": int, "float": float, "str": str}[annotation.split(" ")[0]](text)


def read_rows(path: Path) -> list[Row]:
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return [Row.from_csv(record) for record in csv.DictReader(file)]


def write_rows(path: Path, rows: list[Row]) -> None:
    """results.csv holding exactly `rows`, in the current columns."""
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[f.name for f in Row.columns()])
        writer.writeheader()
        writer.writerows(row.to_csv() for row in rows)


def append_row(path: Path, row: Row) -> None:
    """Write one stack's row at once, so an interrupted sweep keeps what it measured. A results.csv written
    with other columns (an older version) is rewritten with the current ones, this row added."""
    columns = [f.name for f in Row.columns()]
    if path.exists():
        with path.open(newline="") as file:
            header = next(csv.reader(file), [])
        if header == columns:
            with path.open("a", newline="") as file:
                csv.DictWriter(file, fieldnames=columns).writerow(row.to_csv())
            return
    write_rows(path, [*read_rows(path), row])


def speedup(row: Row, base: Row | None) -> float | None:
    """The baseline's P50 over the row's: the baseline of the row's own run when it names one (headline rows),
    else the table's."""
    reference = row.baseline_p50_s if row.baseline_p50_s is not None else (base.p50_s if base else None)
    return None if reference is None else reference / row.p50_s
