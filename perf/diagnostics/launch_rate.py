"""Host-side speed of this Python process: plain bytecode and eager CUDA kernel launches.

Eager diffusion on a fast GPU is partly bound by how fast the host enqueues kernels, so a slower interpreter
(for example one running through a shared libpython, as Triton's Python backend stub embeds it; most
distributions link their python3 executable statically) shows up as latency. Run it under `python3` and under
`embedded_python` (beside this file) on the same host and compare; prints one JSON line.
"""

import json
import sys
import sysconfig
import time

import torch

LOOP_ITERATIONS = 3_000_000
LAUNCHES = 20_000


def bytecode_ns() -> float:
    """Nanoseconds per iteration of a plain Python loop."""
    started = time.perf_counter_ns()
    total = 0
    for i in range(LOOP_ITERATIONS):
        total += i & 7
    return (time.perf_counter_ns() - started) / LOOP_ITERATIONS


def launch_us(device: torch.device) -> float:
    """Microseconds of host time per eager kernel launch (tiny in-place adds: the GPU is never the bound)."""
    x = torch.zeros(16, device=device)
    for _ in range(1000):
        x.add_(1.0)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(LAUNCHES):
        x.add_(1.0)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / LAUNCHES * 1e6


def main() -> None:
    device = torch.device("cuda:0")
    best = {"bytecode_ns": min(bytecode_ns() for _ in range(3)), "launch_us": min(launch_us(device) for _ in range(3))}
    print(json.dumps({
        "executable": sys.executable, "python": sys.version.split()[0],
        "shared_libpython": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
        **{key: round(value, 3) for key, value in best.items()},
    }))


if __name__ == "__main__":
    main()
