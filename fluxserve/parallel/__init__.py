"""Multi-GPU workers: one Triton model instance that runs a context-parallel stack on several GPUs.

The instance's own process (Triton's Python backend stub) validates requests and answers Triton; it starts one
worker process per GPU (`worker`), which together form a torch.distributed group (NCCL on GPUs, gloo on CPU), each
building the same stack. `group.WorkerGroup` sends every request to all of them, watches them, and turns a worker
that dies or hangs into a clear error for the request in flight, then restarts the group.
"""

from .group import WorkerFault, WorkerGroup

__all__ = ["WorkerFault", "WorkerGroup"]
