"""The traffic mix that perf/locustfile.py sends and perf/mixed_traffic.py plans: image sizes drawn by weight, and
the steady (one request at a time, warm) P50 of each model and size that a mixed run's latencies are judged by.

A size is HEIGHTxWIDTH, as the launcher's --warmup-sizes; a mix is `HEIGHTxWIDTH[:WEIGHT],...` (weights positive
numbers, default 1), e.g. `1024x1024:4,512x512:1,768x1344:2,1344x768:2`. A steady-P50 file is a CSV with the
columns model, size, p50_s.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

SIZES_FORM = "HEIGHTxWIDTH[:WEIGHT],... (weights positive numbers, default 1; e.g. 1024x1024:4,512x512:1)"
STEADY_COLUMNS = ["model", "size", "p50_s"]
_SIZE = re.compile(r"(\d+)x(\d+)")


@dataclass(frozen=True)
class Size:
    height: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}"


@dataclass(frozen=True)
class SizeMix:
    """Sizes with their relative weights, in the order given."""

    sizes: tuple[Size, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> SizeMix:
        """`HEIGHTxWIDTH[:WEIGHT],...`; ValueError naming the bad item and the allowed form."""
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ValueError(f"no sizes in {text!r}; expected {SIZES_FORM}")
        sizes, weights = [], []
        for item in items:
            size_text, _, weight_text = item.partition(":")
            match = _SIZE.fullmatch(size_text.strip())
            try:
                weight = float(weight_text) if weight_text else 1.0
            except ValueError:
                weight = float("nan")
            if not match or not weight > 0:
                raise ValueError(f"{item!r} is not a size with a weight; expected {SIZES_FORM}")
            sizes.append(Size(int(match[1]), int(match[2])))
            weights.append(weight)
        if len(set(sizes)) < len(sizes):
            raise ValueError(f"a size is given twice in {text!r}; expected {SIZES_FORM}")
        return cls(tuple(sizes), tuple(weights))

    @classmethod
    def single(cls, height: int, width: int) -> SizeMix:
        return cls((Size(height, width),), (1.0,))

    def share(self, size: Size) -> float:
        """The fraction of requests that ask for `size`."""
        return self.weights[self.sizes.index(size)] / sum(self.weights)

    def draw(self, rng: random.Random) -> Size:
        return rng.choices(self.sizes, self.weights)[0]

    def mean(self, seconds: dict[Size, float]) -> float:
        """The mix's mean of a per-size quantity (e.g. service time)."""
        return sum(self.share(size) * seconds[size] for size in self.sizes)


def sizes_argument(text: str) -> str:
    """argparse type of a size mix option: checked when parsed, kept as text (Locust sends options to its workers as
    they are); empty stays empty, for a default."""
    try:
        if text:
            SizeMix.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def read_steady_p50(path: Path) -> dict[tuple[str, str], float]:
    """(model, size label) -> steady P50 in seconds, from a CSV with the columns model, size, p50_s."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = set(STEADY_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: needs the columns {', '.join(STEADY_COLUMNS)}; "
                             f"{', '.join(sorted(missing))} missing")
        return {(row["model"], row["size"]): float(row["p50_s"]) for row in reader}


def write_steady_p50(path: Path, p50s: dict[tuple[str, str], float]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(STEADY_COLUMNS)
        writer.writerows([model, size, f"{p50:.6f}"] for (model, size), p50 in p50s.items())
