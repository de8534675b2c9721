"""What the instance and its workers say to each other over their private socket pairs (pickled)."""

from __future__ import annotations

from dataclasses import dataclass

from ..contract import GenerationRequest
from ..pipeline import Generation


# instance -> worker
@dataclass(frozen=True)
class Build:
    """Join the process group and build the stack (every rank the same stack, its own device)."""

    parameters: dict[str, str]  # the model's config parameters: the stack and its limits
    weights: str
    rank: int
    world_size: int
    device: str
    rendezvous: str  # file for torch.distributed's FileStore, fresh for every start of the group
    warm_up: GenerationRequest
    timeout_s: float
    warm_up_sizes: tuple[tuple[int, int], ...] = ()  # other sizes a compiled or graphed stack runs at load
    specialised_sizes: tuple[tuple[int, int], ...] = ()  # sizes a compiled stack compiles code for alone


@dataclass(frozen=True)
class Generate:
    request_id: int
    request: GenerationRequest


@dataclass(frozen=True)
class Cancel:
    """Stop the request at the next step (read by rank 0, which tells the others)."""

    request_id: int


@dataclass(frozen=True)
class Exit:
    pass


# worker -> instance
@dataclass(frozen=True)
class Ready:
    """The stack is built and warmed up; rank 0's telemetry (the instance reports it in INFO)."""

    rank: int
    pid: int
    telemetry: dict


@dataclass(frozen=True)
class Step:
    """Rank 0 finished a denoising step: the group is making progress."""

    request_id: int
    steps_run: int


@dataclass(frozen=True)
class Done:
    request_id: int
    rank: int
    generation: Generation  # rank 0's carries the image
    peak_memory_gib: float | None


@dataclass(frozen=True)
class Failed:
    """The build or a request failed on this rank; `out_of_memory` tells the instance to answer UNAVAILABLE."""

    request_id: int | None  # None: the build
    rank: int
    message: str
    out_of_memory: bool = False
