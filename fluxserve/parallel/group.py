"""The instance's side of a context-parallel stack: start one worker per GPU, send them every request, watch them.

`WorkerGroup` stands where a one-GPU instance has its `StackPipeline` (same `generate` and telemetry), so the
request contract, validation, cancellation, metrics and INFO are the serving layer's, unchanged. Requests are
validated before they reach the workers. A worker that dies, a rank that fails alone (its peers then wait for it in
a collective that never completes), or a group that makes no progress for `timeout_s`, fails the request in flight
with `WorkerFault` (the model answers UNAVAILABLE); the group is then stopped and started again in the background,
and requests meanwhile fail fast with the same error.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from ..contract import GenerationRequest
from ..interpreter import PACKAGE_ROOT, child_environment, python_executable
from ..pipeline import Generation
from .messages import Build, Cancel, Done, Exit, Failed, Generate, Ready, Step

POLL_S = 0.1  # how often the instance checks liveness and cancellation while it waits
EXIT_WAIT_S = 10.0  # a worker told to exit gets this long before it is killed
# Ranks failing together (the same error at the same check, e.g. out of memory on every GPU) report within
# milliseconds of each other and the group stays in step. A rank that failed alone leaves the others waiting for it
# in a collective: after this long without their answers the group is out of step and restarts.
OUT_OF_STEP_S = 5.0


class WorkerFault(RuntimeError):
    """A worker died or the group stopped making progress: the request failed; the group restarts."""


@dataclass(frozen=True)
class Timeouts:
    """How long the instance waits for its workers: `progress_s` without a finished step (or the request's end)
    before it declares the group hung, `load_s` for the group to build and warm up (compiled stacks compile).
    Model parameters `parallel_progress_timeout_s` and `parallel_load_timeout_s` override them."""

    progress_s: float = 120.0
    load_s: float = 1800.0

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> Timeouts:
        defaults = cls()
        return cls(float(parameters.get("parallel_progress_timeout_s", defaults.progress_s)),
                   float(parameters.get("parallel_load_timeout_s", defaults.load_s)))


@dataclass
class Worker:
    rank: int
    device: torch.device
    process: subprocess.Popen
    connection: Connection

    def __str__(self) -> str:
        return f"worker rank {self.rank} ({self.device}, pid {self.process.pid})"

    def exit_status(self) -> str | None:
        """None while it runs, else how it ended."""
        code = self.process.poll()
        if code is None:
            return None
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def spawn(rank: int, device: torch.device) -> Worker:
    """Start one worker with its end of a private socket pair (no port, no key to share)."""
    ours, theirs = Pipe(duplex=True)
    process = subprocess.Popen(
        [python_executable(), "-m", "fluxserve.parallel.worker", str(theirs.fileno())],
        pass_fds=[theirs.fileno()], env=child_environment(), cwd=str(PACKAGE_ROOT),
    )
    theirs.close()
    return Worker(rank, device, process, ours)


def stop(workers: list[Worker], wait_s: float = EXIT_WAIT_S) -> None:
    """Ask the workers to exit, then kill those still running after `wait_s`; reap every one."""
    for worker in workers:
        try:
            worker.connection.send(Exit())
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    for worker in workers:
        try:
            worker.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        worker.connection.close()


def out_of_step(workers: list[Worker], finished: dict) -> str:
    """Why the group must restart when some ranks failed and the others still wait for them in a collective."""
    failed = "; ".join(f"{worker} failed: {finished[worker.rank].message}" for worker in workers
                       if isinstance(finished.get(worker.rank), Failed))
    waiting = ", ".join(str(worker) for worker in workers if worker.rank not in finished)
    return f"{failed}; {waiting} still waited in a collective {OUT_OF_STEP_S:.0f} s later"


class WorkerGroup:
    """N workers running one stack together; looks like a `StackPipeline` to the serving layer."""

    def __init__(self, stack, parameters: dict[str, str], weights: str, devices: list[torch.device],
                 warm_up: GenerationRequest, notify, timeouts: Timeouts = Timeouts(), warm_up_sizes=(),
                 specialised_sizes=()) -> None:
        self.stack = stack
        self.parameters = parameters
        self.weights = weights
        self.devices = devices
        self.device = devices[0]
        self.warm_up_request = warm_up
        self.sizes_to_warm_up = tuple(warm_up_sizes)
        self.sizes_to_specialise = tuple(specialised_sizes)
        self.notify = notify
        self.timeouts = timeouts
        self.restarts = 0
        self.peak_memory: float | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="fluxserve-group-"))
        self._lock = threading.Lock()
        self._spawned: list[Worker] = []  # every worker started and not yet stopped, for close()
        self._problem: str | None = None  # why requests fail fast (restarting, or could not restart)
        self._closed = False
        self._next_request = 0
        started = time.perf_counter()
        self.workers = self._start()
        self.load_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ the StackPipeline interface

    def parallel_info(self) -> dict:
        return {
            "mode": self.stack.parallel,
            "world_size": len(self.devices),
            "devices": [str(device) for device in self.devices],
            "worker_pids": [worker.process.pid for worker in self.workers],
            "restarts": self.restarts,
        }

    def peak_memory_gib(self) -> float | None:
        """The highest peak of any worker's GPU since it was built (None on CPU)."""
        return self.peak_memory

    def generate(self, request: GenerationRequest, should_stop=None) -> Generation:
        """Run the request on every worker; rank 0's generation (with the image) is the result."""
        with self._lock:
            if self._problem is not None:
                raise WorkerFault(self._problem)
            workers = self.workers
            self._next_request += 1
            request_id = self._next_request
        for worker in workers:
            self._send(worker, Generate(request_id, request))
        return self._collect(workers, request_id, should_stop)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop every worker (including a restart in progress) and remove the group's files."""
        with self._lock:
            self._closed = True
            self._problem = "the model is being unloaded"
            spawned, self._spawned = self._spawned, []
        stop(spawned)
        shutil.rmtree(self._folder, ignore_errors=True)

    def _start(self) -> list[Worker]:
        """Spawn the workers, have each build the stack, wait until all are ready; rank 0's telemetry is kept."""
        rendezvous = self._folder / f"rendezvous-{self.restarts}"
        workers = []
        try:
            for rank, device in enumerate(self.devices):
                worker = spawn(rank, device)
                workers.append(worker)
                with self._lock:
                    if self._closed:
                        raise WorkerFault("the model was unloaded while its workers started")
                    self._spawned.append(worker)
            for worker in workers:
                build = Build(self.parameters, self.weights, worker.rank, len(workers), str(worker.device),
                              str(rendezvous), self.warm_up_request, self.timeouts.load_s, self.sizes_to_warm_up,
                              self.sizes_to_specialise)
                try:  # not `_send`: a worker lost while loading fails the load, it is no fault to restart from
                    worker.connection.send(build)
                except OSError:
                    raise RuntimeError(f"{self.stack.name}: {worker} {worker.exit_status() or 'cannot be reached'} "
                                       "while loading (see the server log)") from None
            ready = self._wait_ready(workers)
        except BaseException:
            self._discard(workers)
            raise
        self._adopt(ready[0].telemetry)
        return workers

    def _wait_ready(self, workers: list[Worker]) -> list[Ready]:
        ready: dict[int, Ready] = {}
        deadline = time.monotonic() + self.timeouts.load_s
        while len(ready) < len(workers):
            for worker, message in self._receive(workers, ready):
                if isinstance(message, Failed):
                    raise RuntimeError(f"{self.stack.name}: {worker} failed to load: {message.message}")
                if isinstance(message, Ready):
                    ready[worker.rank] = message
            for worker in workers:
                status = worker.exit_status()
                if status is not None and worker.rank not in ready:
                    raise RuntimeError(f"{self.stack.name}: {worker} {status} while loading (see the server log)")
            if time.monotonic() > deadline:
                waiting = [str(worker) for worker in workers if worker.rank not in ready]
                raise RuntimeError(f"{self.stack.name}: not ready after {self.timeouts.load_s:.0f} s: "
                                   f"{', '.join(waiting)} (parameter parallel_load_timeout_s)")
        return [ready[rank] for rank in sorted(ready)]

    def _adopt(self, telemetry: dict) -> None:
        self.device_name = telemetry["device_name"]
        self.cudnn_version = telemetry["cudnn_version"]
        self.attention_backend = telemetry["attention_backend"]
        self.attention_kernel = telemetry["attention_kernel"]
        self.load_phases = telemetry["load_phases"]
        self.compile_stats = telemetry["compile_stats"]
        self.compile_artifact = telemetry["compile_artifact"]
        self.warm_up_sizes = telemetry["warm_up_sizes"]
        self.specialised_sizes = telemetry["specialised_sizes"]

    # ------------------------------------------------------------------ a request

    def _collect(self, workers: list[Worker], request_id: int, should_stop) -> Generation:
        """Wait for every worker's answer, relaying a cancellation to rank 0, watching liveness and progress."""
        finished: dict[int, Done | Failed] = {}
        cancel_sent = False
        last_progress = time.monotonic()
        first_failure: float | None = None
        while len(finished) < len(workers):
            for worker, message in self._receive(workers, finished):
                if isinstance(message, Step) and message.request_id == request_id:
                    last_progress = time.monotonic()
                elif isinstance(message, (Done, Failed)) and message.request_id == request_id:
                    finished[worker.rank] = message
                    last_progress = time.monotonic()
                    if isinstance(message, Failed) and first_failure is None:
                        first_failure = last_progress
            if not cancel_sent and should_stop is not None and should_stop():
                self._send(workers[0], Cancel(request_id))
                cancel_sent = True
            for worker in workers:
                status = worker.exit_status()
                if status is not None:
                    self._fault(f"{worker} {status} during the request")
            if first_failure is not None and time.monotonic() - first_failure > OUT_OF_STEP_S:
                self._fault(out_of_step(workers, finished))
            if time.monotonic() - last_progress > self.timeouts.progress_s:
                hung = ", ".join(str(worker) for worker in workers if worker.rank not in finished)
                self._fault(f"no progress for {self.timeouts.progress_s:.0f} s (parameter "
                            f"parallel_progress_timeout_s): {hung} hung")
        peaks = [m.peak_memory_gib for m in finished.values() if isinstance(m, Done) and m.peak_memory_gib is not None]
        if peaks:
            self.peak_memory = max([*peaks, self.peak_memory or 0.0])
        failures = [message for message in finished.values() if isinstance(message, Failed)]
        if any(failure.out_of_memory for failure in failures):
            raise torch.OutOfMemoryError(next(f.message for f in failures if f.out_of_memory))
        if failures:
            raise RuntimeError("; ".join(f"worker rank {failure.rank}: {failure.message}" for failure in failures))
        return finished[0].generation

    def _receive(self, workers: list[Worker], done: dict):
        """(worker, message) for each message waiting within POLL_S from a worker not yet in `done`. A closed
        connection is a dead worker: it is reaped (killed if it still runs) so that its exit status tells."""
        waiting = {worker.connection: worker for worker in workers if worker.rank not in done}
        for connection in wait(list(waiting), timeout=POLL_S):
            try:
                yield waiting[connection], connection.recv()
            except (EOFError, OSError):
                worker = waiting[connection]
                try:
                    worker.process.wait(EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()

    def _send(self, worker: Worker, message) -> None:
        """Send to a serving worker; one that cannot be reached is a fault."""
        try:
            worker.connection.send(message)
        except OSError:
            self._fault(f"{worker} {worker.exit_status() or 'cannot be reached'}")

    # ------------------------------------------------------------------ faults

    def _fault(self, reason: str):
        """Stop the group, restart it in the background, and fail the request in flight."""
        with self._lock:
            workers, self.workers = self.workers, []
            self._problem = (f"{self.stack.name}: the worker group is restarting after a fault ({reason}); ready "
                             f"again in about {self.load_seconds:.0f} s")
        self.notify(f"{self.stack.name}: {reason}; stopping the worker group and starting it again")
        self._discard(workers, wait_s=0.0)
        threading.Thread(target=self._restart, name=f"{self.stack.name}-restart", daemon=True).start()
        raise WorkerFault(f"{self.stack.name}: {reason}; the request failed and the worker group restarts (about "
                          f"{self.load_seconds:.0f} s): retry later")

    def _discard(self, workers: list[Worker], wait_s: float = EXIT_WAIT_S) -> None:
        with self._lock:
            self._spawned = [worker for worker in self._spawned if worker not in workers]
        stop(workers, wait_s)

    def _restart(self) -> None:
        self.restarts += 1
        try:
            workers = self._start()
        except BaseException as exc:
            with self._lock:
                if not self._closed:
                    self._problem = (f"{self.stack.name}: the worker group could not restart after a fault ({exc}); "
                                     "unload and load the model")
            self.notify(f"{self.stack.name}: restart failed: {exc}")
            return
        with self._lock:
            self.workers, self._problem = workers, None
        self.notify(f"{self.stack.name}: worker group restarted ({self.restarts} restart(s)): "
                    f"{', '.join(str(worker) for worker in workers)}")
