"""Start the real tritonserver on model_repository/ in explicit model-control mode.

Uses the system `tritonserver` when there is one (NGC container), else the binary shipped in the
nvidia-pytriton wheel, with a backend directory holding the Python backend and the stub built for the running
Python. Binds to 127.0.0.1 unless told otherwise. Usage: python -m fluxserve.serve [--models bf16,...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from .contract import ADMIN_HEADER, ADMIN_KEY_ENV, WARMUP_BUCKETS
from .server.placement import parse_model_gpus
from .repository import REPOSITORY, placed_repository
from .shared_dirs import CACHE_HOME, COMPILE_CACHE_ENV, content_keyed_directory
from .stacks import DEFAULT_STACK
from .weights import ENV_VAR, default_source, parse_source
from .server.serving import SPECIALISED_SIZES_ENV, WARMUP_SIZES_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Endpoints that change or expose the server's state: only with the admin header when a key is set.
RESTRICTED_APIS = "model-repository,shared-memory,logging,trace"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SYSTEM_TRITON = Path("/opt/tritonserver/bin/tritonserver")
BACKEND_CACHE = CACHE_HOME / "backends"
PLACED_REPOSITORIES = CACHE_HOME / "repositories"  # copies of a repository with models placed by --gpus


@dataclass
class TritonInstall:
    """A tritonserver binary, the backend directory to pass it (None: its own), and environment additions."""

    binary: Path
    backend_directory: Path | None = None
    library_path: list[str] = field(default_factory=list)


def _wheel_install() -> TritonInstall:
    """The tritonserver of the nvidia-pytriton wheel, with a backend directory for this Python's stub."""
    try:
        import pytriton
    except ImportError:
        raise SystemExit("no tritonserver found: install nvidia-pytriton or run inside the NGC Triton image") from None
    wheel = Path(pytriton.__file__).resolve().parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    backend = backend_directory(wheel, version, BACKEND_CACHE / version)
    libraries = [str(wheel.parent.parent / "nvidia_pytriton.libs"), str(libpython_directory(BACKEND_CACHE / version))]
    return TritonInstall(wheel / "bin" / "tritonserver", backend, libraries)


def backend_directory(wheel: Path, version: str, folder: Path) -> Path:
    """A backend directory (`python/`: the wheel's Python backend plus the stub for Python `version`) under
    `folder`, named after the content of those files.

    `folder` is shared by every checkout and environment of the user, and a running server maps these files
    (the stub is the executable of every model process, libtriton_python.so is loaded into the server):
    overwriting them crashes it. So a directory is never changed once made: other files get another directory,
    the same files reuse the existing one."""
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise SystemExit(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    files = [path for path in (wheel / "backends" / "python").iterdir() if path.is_file()] + [stub]

    def fill(directory: Path) -> None:
        (directory / "python").mkdir()
        for source in files:
            shutil.copy2(source, directory / "python" / source.name)

    def rekey(directory: Path) -> str:
        return content_key([path for path in (directory / "python").iterdir() if path.is_file()])

    return content_keyed_directory(folder, "backend", content_key(files), fill, rekey)


def content_key(files: list[Path]) -> str:
    """A digest of the files' names, executable bits and bytes (not their times: a reinstall of the same wheel
    is the same backend)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda path: path.name):
        status = path.stat()
        digest.update(f"{path.name}\0{bool(status.st_mode & 0o111)}\0{status.st_size}\0".encode())
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def libpython_directory(folder: Path) -> Path:
    """A directory holding only a link to this Python's shared libpython, which the stub loads.

    Not the interpreter's LIBDIR itself: on Debian and Ubuntu that is /usr/lib/x86_64-linux-gnu, and on
    LD_LIBRARY_PATH it outranks the RUNPATH through which torch finds its own cuDNN, cuBLAS and NCCL, so a
    system cuDNN there would silently replace torch's in the model processes. Named after the link's target,
    like the backend directory, so that no launcher of another Python replaces it under a running server."""
    name = sysconfig.get_config_var("INSTSONAME") or ""
    library = Path(sysconfig.get_config_var("LIBDIR") or "") / name
    if not name.startswith("libpython") or not name.endswith((".so", ".so.1.0")) or not library.is_file():
        raise SystemExit(f"the Python backend stub needs this Python's shared library, {library}: not found "
                         f"(a Python built with --enable-shared, e.g. the distribution's libpython package)")
    key = hashlib.sha256(f"{name}\0{library}".encode()).hexdigest()[:16]
    return content_keyed_directory(folder, "lib", key, lambda directory: (directory / name).symlink_to(library))


def find_triton() -> TritonInstall:
    """The system tritonserver if present, else the wheel's."""
    system = shutil.which("tritonserver") or (str(SYSTEM_TRITON) if SYSTEM_TRITON.is_file() else None)
    return TritonInstall(Path(system)) if system else _wheel_install()


def server_command(
    install: TritonInstall, models: list[str], repository: Path = REPOSITORY, address: str = "127.0.0.1",
    http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002, admin_key: str | None = None,
    exit_timeout_s: int = 120, extra: list[str] = (),
) -> list[str]:
    command = [
        str(install.binary),
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        *(f"--load-model={model}" for model in models),
        f"--http-address={address}", f"--http-port={http_port}",
        f"--grpc-address={address}", f"--grpc-port={grpc_port}",
        f"--metrics-address={address}", f"--metrics-port={metrics_port}",
        "--exit-on-error=true",
        # On SIGTERM Triton stops taking requests and lets in-flight ones finish for this long.
        f"--exit-timeout-secs={exit_timeout_s}",
        # Server readiness: up, with its startup models loaded (they are READY only after warm-up). Not strict:
        # a stack that later fails to load must not take the models that serve out of a load balancer.
        "--strict-readiness=false",
        # Every config.pbtxt is complete (generated from the catalog), so Triton need not start a Python stub per
        # load just to ask model.py to complete it: that stub imports torch and diffusers, seconds of every load.
        "--disable-auto-complete-config",
    ]
    if install.backend_directory is not None:
        command.append(f"--backend-directory={install.backend_directory}")
    if admin_key:
        command += [
            f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}",
            f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}",
        ]
    return [*command, *extra]


def check_admin_exposure(address: str, admin_key: str | None, open_admin_api: bool) -> None:
    """Refuse to expose load/unload to the network without a key, unless the operator says so."""
    if admin_key or address in LOOPBACK:
        return
    if not open_admin_api:
        raise SystemExit(
            f"refusing to listen on {address} with the model-repository API (load/unload) open to anyone: set "
            f"{ADMIN_KEY_ENV} (clients then send the '{ADMIN_HEADER}' header), or pass --open-admin-api"
        )
    print(f"fluxserve: WARNING: load/unload is open to anyone who reaches {address}", file=sys.stderr)


def server_environment(install: TritonInstall, weights: str, base: dict | None = None) -> dict[str, str]:
    """The server's environment: this Python first on PATH (the backend runs the stub with it), the
    wheel's libraries on LD_LIBRARY_PATH, this checkout on PYTHONPATH, a persistent compile cache (unless
    TORCHINDUCTOR_CACHE_DIR is set), and the weights source."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*install.library_path, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env.setdefault(COMPILE_CACHE_ENV, str(CACHE_HOME / "inductor"))
    # A UTF-8 locale for the backend's embedded Python (see triton_model): under "C" text files open as ASCII.
    if "UTF-8" not in env.get("LC_ALL", env.get("LANG", "")).upper().replace("UTF8", "UTF-8"):
        env["LC_ALL"] = "C.UTF-8"
    env[ENV_VAR] = weights
    return env


def resolve_weights(spec: str | None) -> str:
    """The weights source to serve: the one given, else the default, announced loudly when synthetic."""
    if spec:
        return str(parse_source(spec))
    source, why = default_source()
    if source.kind == "synthetic":
        banner = "!" * 78
        print(f"{banner}\n! fluxserve: {why}.\n! Serving {source}: images are noise. "
              f"Give real weights with --weights or {ENV_VAR}.\n{banner}", file=sys.stderr, flush=True)
    return str(source)


def place_models(repository: Path, specs: list[str]) -> Path:
    """The repository to serve: `repository` itself, or a copy with the models of `--gpus MODEL=SPEC` placed."""
    if not specs:
        return repository
    try:  # each placement is checked against its model's stack as its config is placed
        return placed_repository(repository, dict(map(parse_model_gpus, specs)), PLACED_REPOSITORIES)
    except ValueError as exc:  # a PlacementError, or a config whose stack parameters are invalid
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_STACK, help=f"comma-separated stacks to load (default {DEFAULT_STACK}); '' loads none")
    parser.add_argument("--weights", default=os.environ.get(ENV_VAR), help=f"weights source (default: ${ENV_VAR}, else cached FLUX.1-dev, else synthetic)")
    parser.add_argument("--address", default="127.0.0.1", help="address for HTTP, gRPC and metrics (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--warmup-sizes", metavar="HxW,...",
                         help="sizes each load runs once, the first in full, the others on compiled or graphed stacks "
                              "only (no request at them compiles or captures a graph; default: the models' default "
                              f"size, then {','.join(f'{h}x{w}' for h, w in WARMUP_BUCKETS)}; sets {WARMUP_SIZES_ENV}; "
                              "a model's warmup_sizes parameter wins)")
    parser.add_argument("--warmup-size", type=int, metavar="N", help="warm up at NxN alone (--warmup-sizes NxN; "
                                                                         "--warmup-sizes wins when both are given)")
    parser.add_argument("--specialised-sizes", metavar="HxW,...",
                        help="sizes compiled stacks also compile code for alone at load, faster than their general "
                             f"graph (default: the models' default size on a GPU, none on the CPU; 'none' for none; "
                             f"sets {SPECIALISED_SIZES_ENV}; a model's specialised_sizes parameter wins)")
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    parser.add_argument("--gpus", action="append", default=[], metavar="MODEL=GPUS",
                        help="place MODEL's instances (repeatable): instances separated by commas, each a GPU id, a "
                             "range a-b or a list a+b of as many GPUs as the stack uses, e.g. --gpus bf16=0,1 --gpus "
                             "bf16-cp2=2-3,4-5 (default: a one-GPU stack on every GPU, a multi-GPU stack on 0..N-1)")
    parser.add_argument("--exit-timeout", type=int, default=120, help="seconds in-flight requests get to finish on shutdown (default 120)")
    parser.add_argument("--open-admin-api", action="store_true", help=f"allow a non-loopback address without {ADMIN_KEY_ENV}")
    parser.add_argument("tritonserver_args", nargs="*", help="further tritonserver flags, after --")
    args = parser.parse_args(argv)
    admin_key = os.environ.get(ADMIN_KEY_ENV) or None
    check_admin_exposure(args.address, admin_key, args.open_admin_api)
    repository = place_models(args.repository, args.gpus)
    install = find_triton()
    models = [model for model in args.models.split(",") if model]
    env = server_environment(install, resolve_weights(args.weights))
    if args.warmup_size or args.warmup_sizes:
        env[WARMUP_SIZES_ENV] = args.warmup_sizes or f"{args.warmup_size}x{args.warmup_size}"
    if args.specialised_sizes:
        env[SPECIALISED_SIZES_ENV] = args.specialised_sizes
    command = server_command(install, models, repository, args.address, args.http_port, args.grpc_port,
                             args.metrics_port, admin_key, args.exit_timeout, args.tritonserver_args)
    shown = [part.replace(admin_key, "***") if admin_key else part for part in command]
    print("fluxserve: " + " ".join(shown), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
