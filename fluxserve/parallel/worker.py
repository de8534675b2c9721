"""One worker of a context-parallel stack: joins the process group, builds the stack on its device, serves requests.

Started by `group.WorkerGroup` as `python -m fluxserve.parallel.worker FD`, FD being its end of a private socket
pair. It exits when the instance says so, when the socket closes, or when the instance's process is gone, so that an
instance Triton killed leaves no worker holding GPU memory.

Fault injection for tests and drills: a request whose prompt equals `FLUXSERVE_INJECT_ONE_RANK_OOM_PROMPT` runs out of
memory on the last rank alone, inside the transformer of its second step, while the other ranks wait for it in an
attention's all-to-all: the real case of one GPU out of memory mid-step (`FLUXSERVE_INJECT_OOM_PROMPT` fails every
rank at the same check, in lockstep).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from ..pipeline import StackPipeline, build_pipeline, release_memory
from ..stacks import Stack
from ..weights import parse_source
from .messages import Build, Cancel, Done, Exit, Failed, Generate, Ready, Step

PARENT_POLL_S = 1.0
INJECT_ONE_RANK_OOM_ENV = "FLUXSERVE_INJECT_ONE_RANK_OOM_PROMPT"
INJECTED_OOM_STEP = 2  # mid-request: the ranks have exchanged tokens in earlier steps


def exit_with_parent() -> None:
    """Exit as soon as the process that started this one is gone (its children are re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def join_and_build(build: Build) -> StackPipeline:
    """Join the group (NCCL for the GPUs' tensors and gloo for the host's, or gloo alone on CPU), then build the
    stack as a one-GPU instance would, context parallelism included (`optimizations.apply.apply_context_parallel`)."""
    device = torch.device(build.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL and diffusers' device mesh take the current device
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // build.world_size))  # the ranks share the cores
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{build.rendezvous}", rank=build.rank, world_size=build.world_size,
        timeout=timedelta(seconds=build.timeout_s), device_id=device if device.type == "cuda" else None,
    )
    return build_pipeline(Stack.from_parameters(build.parameters), parse_source(build.weights), device, build.warm_up,
                          build.warm_up_sizes, specialised_sizes=build.specialised_sizes)


def telemetry(pipeline: StackPipeline) -> dict:
    """What the instance reports of its stack in INFO (rank 0's)."""
    return {
        "device_name": pipeline.device_name,
        "cudnn_version": pipeline.cudnn_version,
        "attention_backend": pipeline.attention_backend,
        "attention_kernel": pipeline.attention_kernel,
        "load_phases": pipeline.load_phases,
        "compile_stats": pipeline.compile_stats,
        "compile_artifact": pipeline.compile_artifact,
        "warm_up_sizes": pipeline.warm_up_sizes,
        "specialised_sizes": pipeline.specialised_sizes,
    }


class StepAgreement:
    """`should_stop` for one request on one rank. Every rank must stop after the same step, or the others would
    wait forever in the next step's collectives: rank 0 reports each step to the instance and reads whether the
    client cancelled, and every rank learns its decision from one broadcast (on the host, through gloo)."""

    def __init__(self, connection: Connection, request_id: int, rank: int) -> None:
        self.connection = connection
        self.request_id = request_id
        self.rank = rank
        self.steps = 0
        self.exit_after = False  # the instance asked the worker to exit while the request ran

    def __call__(self) -> bool:
        self.steps += 1
        flag = torch.zeros(1, dtype=torch.uint8)
        if self.rank == 0:
            self.connection.send(Step(self.request_id, self.steps))
            flag[0] = self._stop_asked()
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _stop_asked(self) -> bool:
        while self.connection.poll():
            message = self.connection.recv()
            if isinstance(message, Exit):
                self.exit_after = True
                return True
            if isinstance(message, Cancel) and message.request_id == self.request_id:
                return True
        return False  # a Cancel of an earlier request arrived after it ended: nothing to stop


@contextmanager
def injected_oom(pipeline: StackPipeline, prompt: str, rank: int):
    """For the marked prompt on the last rank, run out of memory as the first single block of step
    INJECTED_OOM_STEP starts: the earlier blocks' collectives have passed, the other ranks go on to this block's
    all-to-all and wait there for this one (see the module's docstring)."""
    marker = os.environ.get(INJECT_ONE_RANK_OOM_ENV)
    if not marker or prompt != marker or rank != dist.get_world_size() - 1:
        yield
        return
    calls = 0

    def fail_at_the_step(module, args) -> None:
        nonlocal calls
        calls += 1
        if calls == INJECTED_OOM_STEP:
            raise torch.OutOfMemoryError(f"injected by {INJECT_ONE_RANK_OOM_ENV} on rank {rank}, step {calls}")

    handle = pipeline.pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(fail_at_the_step)
    try:
        yield
    finally:
        handle.remove()


def run(connection: Connection, pipeline: StackPipeline, rank: int, message: Generate) -> bool:
    """Generate one request; only rank 0 decodes the image. Returns False when the worker should exit."""
    should_stop = StepAgreement(connection, message.request_id, rank)
    try:
        with injected_oom(pipeline, message.request.prompt, rank):
            generation = pipeline.generate(message.request, should_stop, decode=rank == 0)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        release_memory(pipeline.device)
        connection.send(Failed(message.request_id, rank, f"out of memory on {pipeline.device}: {exc}",
                               out_of_memory=True))
    except Exception as exc:  # the request fails; the instance decides whether the group is still sound
        traceback.print_exc()
        connection.send(Failed(message.request_id, rank, f"{type(exc).__name__}: {exc}"))
    else:
        connection.send(Done(message.request_id, rank, generation, pipeline.peak_memory_gib()))
    return not should_stop.exit_after


def serve(connection: Connection, pipeline: StackPipeline, rank: int) -> None:
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if isinstance(message, Exit):
            return
        if isinstance(message, Generate) and not run(connection, pipeline, rank, message):
            return
        # a Cancel of a request that already ended: nothing to stop


def main(argv: list[str]) -> int:
    connection = Connection(int(argv[0]))
    exit_with_parent()
    build = connection.recv()
    try:
        pipeline = join_and_build(build)
    except Exception as exc:
        traceback.print_exc()
        connection.send(Failed(None, build.rank, f"{type(exc).__name__}: {exc}"))
        return 1
    connection.send(Ready(build.rank, os.getpid(), telemetry(pipeline)))
    serve(connection, pipeline, build.rank)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
