"""Two launchers on one host: the backend directories they write into the user's cache are never changed under
a running server (issue 16). Unit tests of the content-keyed directories, then two real servers."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from conftest import make_inputs, start_server
from fluxserve import serve, shared_dirs

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
# Bounds on a server that stops answering, not on a slow one: a one-step 64x64 request takes about a second on 2
# CPU cores while the other server loads beside it.
ANSWER_TIMEOUT_S = 180


def fake_wheel(root: Path, utils: str = "# utils\n", stub: bytes = b"#!stub\n") -> Path:
    """The layout of the nvidia-pytriton wheel's `tritonserver/` folder, with small files."""
    wheel = root / "pytriton" / "tritonserver"
    (wheel / "backends" / "python").mkdir(parents=True)
    (wheel / "backends" / "python" / "libtriton_python.so").write_bytes(b"\x7fELF backend")
    (wheel / "backends" / "python" / "triton_python_backend_utils.py").write_text(utils)
    (wheel / "backends" / "python" / "__pycache__").mkdir()
    (wheel / "python_backend_stubs" / VERSION).mkdir(parents=True)
    (wheel / "python_backend_stubs" / VERSION / "triton_python_backend_stub").write_bytes(stub)
    (wheel / "python_backend_stubs" / VERSION / "triton_python_backend_stub").chmod(0o755)
    return wheel


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `directory` with its inode, modification time and bytes."""
    return {str(path.relative_to(directory)): (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_same_files_reuse_the_directory_even_when_newer(tmp_path):
    wheel, cache = fake_wheel(tmp_path / "env"), tmp_path / "cache"
    first = serve.backend_directory(wheel, VERSION, cache)
    assert sorted(path.name for path in (first / "python").iterdir()) == [
        "libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert os.access(first / "python" / "triton_python_backend_stub", os.X_OK)
    before = snapshot(first)
    later = time.time() + 3600  # an upgrade that installs the same files again
    for path in wheel.rglob("*"):
        os.utime(path, (later, later))
    assert serve.backend_directory(wheel, VERSION, cache) == first
    assert snapshot(first) == before
    assert [path.name for path in cache.iterdir()] == [first.name]


def test_other_files_get_another_directory_and_leave_the_first_alone(tmp_path):
    cache = tmp_path / "cache"
    first = serve.backend_directory(fake_wheel(tmp_path / "a"), VERSION, cache)
    before = snapshot(first)
    second = serve.backend_directory(fake_wheel(tmp_path / "b", utils="# utils, newer release\n"), VERSION, cache)
    third = serve.backend_directory(fake_wheel(tmp_path / "c", stub=b"#!another stub\n"), VERSION, cache)
    assert len({first, second, third}) == 3
    assert snapshot(first) == before
    assert (second / "python" / "triton_python_backend_utils.py").read_text() == "# utils, newer release\n"
    assert (third / "python" / "triton_python_backend_stub").read_bytes() == b"#!another stub\n"


def test_a_half_written_directory_is_never_used(tmp_path, monkeypatch):
    wheel, cache = fake_wheel(tmp_path / "env"), tmp_path / "cache"
    copied, copy = [], shutil.copy2

    def copy_then_die(source, target):  # the launcher dies after the first file
        if copied:
            raise KeyboardInterrupt
        copied.append(copy(source, target))

    monkeypatch.setattr(serve.shutil, "copy2", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        serve.backend_directory(wheel, VERSION, cache)
    assert list(cache.iterdir()) == []  # its temporary directory is gone, and nothing took the final name
    monkeypatch.undo()
    # a launcher killed outright leaves its temporary directory behind: it is never taken for the backend
    leftover = cache / f"{shared_dirs.PARTIAL}backend-killed"
    (leftover / "python").mkdir(parents=True)
    (leftover / "python" / "libtriton_python.so").write_bytes(b"half")
    made = serve.backend_directory(wheel, VERSION, cache)
    assert made.name.startswith("backend-") and len(list((made / "python").iterdir())) == 3
    assert leftover.exists()  # young: another launcher may still be writing it
    old = time.time() - shared_dirs.STALE_PARTIAL_S - 60
    os.utime(leftover, (old, old))
    shutil.rmtree(made)
    serve.backend_directory(wheel, VERSION, cache)
    assert not leftover.exists()  # stale: removed


def test_launchers_side_by_side_make_one_directory(tmp_path):
    wheel, cache = fake_wheel(tmp_path / "env"), tmp_path / "cache"
    start, made, errors = threading.Barrier(8), [], []

    def install():
        start.wait()
        try:
            made.append(serve.backend_directory(wheel, VERSION, cache))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=install) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(made)) == 1
    assert [path.name for path in cache.iterdir()] == [made[0].name]


def test_libpython_directory_is_named_after_its_link(tmp_path, monkeypatch):
    import sysconfig

    first = serve.libpython_directory(tmp_path)
    (link,) = first.iterdir()
    assert serve.libpython_directory(tmp_path) == first and link.is_symlink()
    # another Python (another LIBDIR) gets its own directory: the first link stays as it was
    other = tmp_path / "other-python"
    other.mkdir()
    (other / link.name).write_bytes(b"")
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: str(other) if name == "LIBDIR" else real(name))
    second = serve.libpython_directory(tmp_path)
    assert second != first and os.readlink(second / link.name) == str(other / link.name)
    assert os.readlink(link) == str(Path(real("LIBDIR")) / link.name)


# ---------------------------------------------------------------- two real servers


def second_environment(root: Path) -> Path:
    """A second environment's nvidia-pytriton, as after an upgrade: the same server binary, but the Python backend
    and stub installed later (newer files) and one of them changed. Returns the folder to put on PYTHONPATH."""
    real = Path(importlib.util.find_spec("pytriton").origin).parent
    site = root / "site-packages"
    wheel = site / "pytriton" / "tritonserver"
    wheel.mkdir(parents=True)
    (site / "pytriton" / "__init__.py").write_text("")
    (site / "nvidia_pytriton.libs").symlink_to(real.parent / "nvidia_pytriton.libs")
    for name in ("bin", "caches"):
        (wheel / name).symlink_to(real / "tritonserver" / name)
    for folder in ("backends/python", f"python_backend_stubs/{VERSION}"):
        (wheel / folder).mkdir(parents=True)
        for source in (real / "tritonserver" / folder).iterdir():
            if source.is_file():
                shutil.copy(source, wheel / folder / source.name)  # copy, not copy2: the files are newer
    with (wheel / "backends" / "python" / "triton_python_backend_utils.py").open("a") as utils:
        utils.write("\n# a newer release\n")
    return site


def backend_of(server) -> str:
    return re.search(r"--backend-directory=(\S+)", server.log()).group(1)


def small_request(server) -> None:
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=ANSWER_TIMEOUT_S)
    try:
        client.infer("bf16", make_inputs(httpclient, "a red fox", SEED=1, STEPS=1, HEIGHT=64, WIDTH=64))
    finally:
        client.close()


def test_a_second_launcher_with_newer_backend_files_leaves_the_first_server_serving(tmp_path):
    if shutil.which("tritonserver") or serve.SYSTEM_TRITON.is_file():
        pytest.skip("a system tritonserver brings its own backends: the launcher writes none")
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # both launchers share one user cache, as on a host
    first = start_server(tmp_path, ["bf16"], env_extra=cache)
    served, failures, stop = [], [], threading.Event()

    def keep_asking():  # requests to the first server, back to back, while the second one starts
        while not stop.is_set():
            try:
                small_request(first)
                served.append(time.monotonic())
            except Exception as error:  # noqa: BLE001
                failures.append(repr(error))
                time.sleep(0.2)

    asking = threading.Thread(target=keep_asking, daemon=True)
    asking.start()
    second = second_error = None
    try:
        site = second_environment(tmp_path / "env2")
        path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        try:
            second = start_server(tmp_path, ["bf16"], env_extra={**cache, "PYTHONPATH": path})
            small_request(second)
        except Exception as error:  # noqa: BLE001  (reported after the first server's fate)
            second_error = error
        second_up = time.monotonic()
        deadline = second_up + ANSWER_TIMEOUT_S
        while sum(when > second_up for when in served) < 2 and not failures and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        asking.join(timeout=ANSWER_TIMEOUT_S + 60)  # its last request ends within its timeout
        if second is not None:
            second.stop()
        code = first.stop()
    crashes = (r"Signal \((?!15\))", "Segmentation fault", "not healthy")  # signal 15: the test's SIGTERM
    assert failures == [], failures[:3]
    assert sum(when > second_up for when in served) >= 2, "the first server stopped answering"
    assert code == 0 and not any(re.search(crash, first.log()) for crash in crashes), first.log()[-3000:]
    assert second_error is None, second_error
    assert not any(re.search(crash, second.log()) for crash in crashes), second.log()[-3000:]
    backends = backend_of(first), backend_of(second)
    assert backends[0] != backends[1]
    assert str(site) in second.log() and str(site) not in first.log()  # the second really ran the other wheel
    for backend in backends:  # each directory still holds what its name says (the stub adds a __pycache__)
        files = [path for path in (Path(backend) / "python").iterdir() if path.is_file()]
        assert Path(backend).name == f"backend-{serve.content_key(files)}"
