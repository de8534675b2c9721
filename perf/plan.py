"""Plans for perf/gpu_sweep.sh: one line per shard, each shard one server and its sweeps on GPUs of its own.

A line is space-separated `field=value` items:
  stacks=a,b,c        the stacks to measure, served (the first should be the baseline, bf16)
  direct=a,b          also measured in-process, each right after its served run
  reload=a,b          stacks whose second load (compile caches warm) is timed
  gpus=2 | 2-3 | 2+5  the GPUs the shard's server sees (default: the lowest GPU no line names). A one-GPU stack
                      gets an instance on each (data parallel); a multi-GPU stack needs at least its own count
  concurrency=1,4,8   one sweep per value (default 1): images/s at each
  place=M=0-3,4-7     the server's `--gpus M=0-3,4-7` (several: separated by ';'), e.g. two cp4 instances

Shards run at the same time, so no two may share a GPU. `python -m perf.plan PLAN` checks the plan against this
host and prints one '|'-separated line per shard for gpu_sweep.sh: index, CUDA_VISIBLE_DEVICES, concurrencies,
stacks, direct, reload, placements.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from fluxserve.server.placement import PlacementError, check_placement, parse_instance, parse_model_gpus
from fluxserve.stacks import catalog_by_name

FIELDS = ("stacks", "direct", "reload", "gpus", "concurrency", "place")


class PlanError(ValueError):
    """A plan that cannot run (on this host): the message says which line and why."""


@dataclass(frozen=True)
class Shard:
    stacks: tuple[str, ...]
    direct: tuple[str, ...]
    reload: tuple[str, ...]
    gpus: tuple[int, ...]
    concurrency: tuple[int, ...]
    place: tuple[str, ...] = ()  # the launcher's --gpus values

    @property
    def gpus_needed(self) -> int:
        """The most GPUs one instance of its stacks takes."""
        catalog = catalog_by_name()
        return max(catalog[name].gpus for name in self.stacks + self.direct)


def read_plan(path: Path) -> list[Shard]:
    """The plan's shards, with GPUs assigned and every stack checked against the catalog."""
    lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    fields = []
    for number, items in enumerate(lines, 1):
        line = dict(item.split("=", 1) if "=" in item else (item, "") for item in items)
        unknown = set(line) - set(FIELDS)
        if unknown or "stacks" not in line:
            raise PlanError(f"{path}:{number}: fields are {', '.join(FIELDS)} (stacks required); got {' '.join(items)}")
        fields.append(line)
    named = set()
    for number, line in enumerate(fields, 1):
        if "gpus" in line:
            try:
                gpus = parse_instance(line["gpus"], f"{path}:{number}: gpus")
                check_placement((gpus,), len(gpus), f"line {number}")
            except PlacementError as exc:
                raise PlanError(str(exc)) from None
            if named & set(gpus):
                raise PlanError(f"{path}:{number}: GPU(s) {sorted(named & set(gpus))} already serve another line; "
                                "shards run at once")
            named |= set(gpus)
            line["gpus"] = gpus
    shards, free = [], (gpu for gpu in range(1 << 16) if gpu not in named)
    catalog = catalog_by_name()
    for number, line in enumerate(fields, 1):
        split = {name: tuple(filter(None, line.get(name, "").split(","))) for name in ("stacks", "direct", "reload")}
        unknown = set(sum(split.values(), ())) - set(catalog)
        if unknown:
            raise PlanError(f"{path}:{number}: not in the catalog: {', '.join(sorted(unknown))}")
        try:
            concurrency = tuple(int(value) for value in line.get("concurrency", "1").split(","))
        except ValueError:
            raise PlanError(f"{path}:{number}: concurrency takes whole numbers, got {line['concurrency']}") from None
        place = tuple(filter(None, line.get("place", "").split(";")))
        for spec in place:
            try:
                model, placement = parse_model_gpus(spec)
                if model not in split["stacks"]:
                    raise PlanError(f"{path}:{number}: place={spec} names no stack of the line")
                check_placement(placement, catalog[model].gpus, model)
            except PlacementError as exc:
                raise PlanError(f"{path}:{number}: {exc}") from None
        shard = Shard(**split, gpus=line.get("gpus") or (next(free),), concurrency=concurrency, place=place)
        if shard.gpus_needed > len(shard.gpus) or min(concurrency) < 1:
            raise PlanError(f"{path}:{number}: a stack there takes {shard.gpus_needed} GPUs, the line has "
                            f"{len(shard.gpus)} (gpus=...), or a concurrency is below 1")
        shards.append(shard)
    return shards


def check_host(shards: list[Shard], path: Path, host_gpus: int) -> None:
    """A shard on a GPU the host lacks would start a server that only fails every load."""
    needed = sorted({gpu for shard in shards for gpu in shard.gpus})
    if needed and needed[-1] >= host_gpus:
        raise PlanError(
            f"{path} has {len(shards)} shard line(s) on GPU(s) {', '.join(map(str, needed))} but this host has "
            f"{host_gpus} GPU(s); run it on a host with that many GPUs, or one line per call (sed -n 1p {path} > "
            "/tmp/plan.txt)"
        )


def main(argv: list[str]) -> int:
    import torch

    path = Path(argv[0])
    try:
        shards = read_plan(path)
        check_host(shards, path, torch.cuda.device_count())
    except PlanError as exc:
        print(f"gpu_sweep: {exc}", file=sys.stderr)
        return 2
    for index, shard in enumerate(shards):
        print("|".join([str(index), ",".join(map(str, shard.gpus)), ",".join(map(str, shard.concurrency)),
                        ",".join(shard.stacks), ",".join(shard.direct), ",".join(shard.reload), ";".join(shard.place)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
