"""Which GPUs a model's instances run on.

An instance of a one-GPU stack takes one GPU; an instance of a context-parallel stack takes `stack.gpus` GPUs. A
placement lists a model's instances, each a tuple of GPU ids. It is written into the model's config.pbtxt:

- no placement: one-GPU stacks leave the kind to Triton (an instance per GPU, or one CPU instance without GPUs);
  a multi-GPU stack is one `KIND_MODEL` instance that takes GPUs 0..N-1 (or N CPU processes without GPUs), as
  Triton's vllm_backend models own their workers;
- a placement (the launcher's `--gpus MODEL=SPEC`): `KIND_GPU` instances on each instance's first GPU, Triton's own
  placement, plus the parameter `gpu_groups` from which a multi-GPU instance reads the rest of its GPUs.

Torch-free: the launcher and the repository generator use it.
"""

from __future__ import annotations

GPU_GROUPS_PARAMETER = "gpu_groups"
Placement = tuple[tuple[int, ...], ...]  # one tuple of GPU ids per instance


class PlacementError(ValueError):
    """A placement that cannot be served: malformed, wrong number of GPUs per instance, a GPU used twice."""


def parse_model_gpus(spec: str) -> tuple[str, Placement]:
    """'MODEL=GPUS' (the launcher's --gpus) -> the model and its placement, not yet checked against its stack
    (`check_placement`, which `repository.place_config` calls with the model's own GPU count).

    GPUS: '0,1,2,3' -> four instances of one GPU; '0-1,2-3' or '0+1,2+3' -> two instances of two GPUs. Instances
    are separated by commas; an instance of several GPUs is a range `a-b` or a list `a+b+c`."""
    model, _, gpus = spec.partition("=")
    if not model or not gpus:
        raise PlacementError(f"--gpus {spec}: expected MODEL=GPUS")
    return model, tuple(parse_instance(part.strip(), f"--gpus {spec}") for part in gpus.split(","))


def parse_instance(part: str, where: str) -> tuple[int, ...]:
    """One instance's GPUs: a GPU id, a range `a-b` or a list `a+b+c`."""
    try:
        if "-" in part:
            first, last = (int(bound) for bound in part.split("-"))
            return tuple(range(first, last + 1))
        return tuple(int(gpu) for gpu in part.split("+"))
    except ValueError:
        raise PlacementError(
            f"{where}: {part!r} is not a GPU id, a range a-b or a list a+b (instances are separated by commas)"
        ) from None


def check_placement(placement: Placement, gpus_per_instance: int, model: str = "model") -> None:
    """Each instance has the stack's number of GPUs, ids are >= 0, and no GPU serves two of its instances."""
    if not placement:
        raise PlacementError(f"--gpus {model}: no instances given")
    seen: set[int] = set()
    for gpus in placement:
        if len(gpus) != gpus_per_instance:
            raise PlacementError(
                f"--gpus {model}: an instance of {model} takes {gpus_per_instance} GPU(s), got {len(gpus)} "
                f"({format_instance(gpus)})"
            )
        if min(gpus) < 0:
            raise PlacementError(f"--gpus {model}: GPU ids are >= 0, got {format_instance(gpus)}")
        if seen & set(gpus) or len(set(gpus)) != len(gpus):
            raise PlacementError(f"--gpus {model}: GPU {sorted(seen & set(gpus) or gpus)[0]} is given twice")
        seen |= set(gpus)


def format_instance(gpus: tuple[int, ...]) -> str:
    return "+".join(map(str, gpus))


def format_groups(placement: Placement) -> str:
    """The `gpu_groups` parameter: instances separated by ';', GPUs by ','."""
    return ";".join(",".join(map(str, gpus)) for gpus in placement)


def parse_groups(text: str) -> Placement:
    return tuple(tuple(int(gpu) for gpu in group.split(",")) for group in text.split(";") if group)


def instance_group(gpus_per_instance: int, placement: Placement | None = None) -> str:
    """config.pbtxt's instance_group line for a model whose instances take `gpus_per_instance` GPUs."""
    if placement is not None:
        check_placement(placement, gpus_per_instance)
        firsts = ", ".join(str(gpus[0]) for gpus in placement)
        return f"instance_group [ {{ count: 1, kind: KIND_GPU, gpus: [ {firsts} ] }} ]"
    if gpus_per_instance == 1:
        return "instance_group [ { count: 1 } ]"
    return "instance_group [ { count: 1, kind: KIND_MODEL } ]"


def instance_gpus(parameters: dict[str, str], gpus_per_instance: int, kind: str, device_id: int) -> tuple[int, ...]:
    """The GPUs of the instance Triton started as (`kind`, `device_id`), from the model's `gpu_groups`
    parameter; without it a KIND_MODEL instance takes GPUs 0..N-1 and a KIND_GPU one N GPUs from its own."""
    groups = parse_groups(parameters.get(GPU_GROUPS_PARAMETER, ""))
    if kind == "GPU" and groups:
        for gpus in groups:
            if gpus[0] == device_id:
                return gpus
        raise PlacementError(
            f"instance on GPU {device_id} is not the first GPU of any group in parameter "
            f"{GPU_GROUPS_PARAMETER} ({format_groups(groups)})"
        )
    first = device_id if kind == "GPU" else 0
    return tuple(range(first, first + gpus_per_instance))
