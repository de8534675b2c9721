"""perf/diagnostics/cold_load.py on the CPU: its page-cache helpers on a small file (evicting, counting resident
pages, timed reads, the parallel reader), its checksums, its CLI, and a whole run on a saved synthetic:tiny folder
(onto the CPU, and onto a GPU this host lacks: those phases fail with the reason, the disk phases still run)."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxserve.weights.read_ahead import ReadAhead
from perf.diagnostics import cold_load

ROOT = Path(__file__).resolve().parent.parent
SIZE = 8 * 2**20 + 12345  # not a whole number of pages


@pytest.fixture
def data_file(tmp_path) -> Path:
    if cold_load.filesystem_of(tmp_path).get("type") in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in memory: nothing to evict")
    path = tmp_path / "shard.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_a_file_is_made_cold_and_read_back_into_the_cache(data_file):
    cold_load.read_speed(data_file)  # written and read: resident
    assert cold_load.resident_bytes(data_file) == SIZE
    record = cold_load.make_cold([data_file], try_drop_caches=False)
    assert record["method"] == "fadvise_dontneed" and record["fadvise_files"] == 1
    assert record["before"]["resident_fraction"] == 1.0 and record["after"]["resident_fraction"] <= 0.01
    assert record["verified"] is True and cold_load.resident_bytes(data_file) <= SIZE // 100
    read = cold_load.read_speed(data_file, chunk=2**20)
    assert read["bytes"] == SIZE and read["gb_s"] > 0 and read["file"] == str(data_file)
    assert cold_load.resident_bytes(data_file) == SIZE
    if record["fincore_largest_bytes"] is not None:  # util-linux's count agrees (it counts whole pages)
        assert record["fincore_largest_bytes"] == 0
        assert cold_load.fincore_bytes(data_file) == -(-SIZE // mmap.PAGESIZE) * mmap.PAGESIZE
    assert cold_load.read_speed(data_file, limit_bytes=2**20)["bytes"] == 2**20


def test_the_parallel_reader_reads_its_share_in_order_on_all_threads(data_file, tmp_path):
    second = tmp_path / "second.bin"
    second.write_bytes(os.urandom(3 * 2**20))
    cold_load.make_cold([data_file, second], try_drop_caches=False)
    limited = ReadAhead([data_file, second], threads=3, limit_bytes=5 * 2**20, segment=2**20, chunk=2**19)
    assert [task[1] for task in limited.tasks] == [0, 2**20, 2 * 2**20, 3 * 2**20, 4 * 2**20]
    record = limited.start().join()
    assert record["bytes"] == 5 * 2**20 and record["threads"] == 3 and not record["errors"]
    assert cold_load.resident_bytes(second) == 0
    record = ReadAhead([data_file, second], threads=4, segment=2**20).start().join()
    assert record["bytes"] == SIZE + 3 * 2**20
    assert cold_load.residency([data_file, second])["resident_fraction"] == 1.0


def test_stopped_readers_take_no_further_segment(data_file):
    reader = ReadAhead([data_file], threads=1, segment=2**20)
    reader.stop()  # before they start: the loader was done first
    assert reader.start().join()["bytes"] == 0


def test_the_checksums_see_one_changed_value_and_not_a_dtype_that_keeps_the_values():
    from fluxserve.weights.synthetic import build_synthetic_pipeline

    pipe = build_synthetic_pipeline("tiny", torch.bfloat16, "cpu")
    before = cold_load.model_checksums(pipe)
    assert set(before) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    pipe.text_encoder_2.float()  # bf16 -> fp32 is exact
    assert cold_load.model_checksums(pipe) == before
    with torch.no_grad():
        pipe.transformer.proj_out.weight[0, 0] += 1.0
    after = cold_load.model_checksums(pipe)
    assert after["transformer"] != before["transformer"] and after["vae"] == before["vae"]


def test_the_cli_explains_itself_and_refuses_an_unknown_variant():
    help_text = subprocess.run([sys.executable, "-m", "perf.diagnostics.cold_load", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0, help_text.stderr
    assert "page cache" in help_text.stdout and "--folder" in help_text.stdout and "drop_caches" in help_text.stdout
    with pytest.raises(SystemExit):
        cold_load.parse_args(["--folder", "x", "--variants", "load_pipeline,fastest"])


def test_a_whole_run_builds_saves_evicts_reads_and_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, out = tmp_path / "saved", tmp_path / "out" / "cold_load.json"
    code = cold_load.main(["--folder", str(folder), "--out", str(out), "--device", "cpu",
                           "--build", "synthetic:tiny", "--no-drop-caches", "--threads", "2"])
    report = json.loads(out.read_text())
    assert code == 0 and report["errors"] == {}, report["errors"]
    printed = capsys.readouterr().out
    assert "cold_load [" in printed and '"summary"' in printed  # progress lines, then the report
    assert (folder / "model_index.json").is_file() and not folder.with_name("saved.partial").exists()
    summary = report["summary"]
    assert summary["save_s"] > 0 and summary["files"] == len(cold_load.folder_files(folder))
    assert summary["folder_size_gb"] == report["build"]["size_gb"] > 0
    assert summary["cold_method"] == "fadvise_dontneed" and summary["cold_verified"] is True
    assert summary["disk_read_gb_s"] > 0 and summary["disk_read_parallel_gb_s"] > 0
    assert set(summary["cold_load_s"]) == set(cold_load.VARIANTS)
    assert all(match is True for match in summary["checksums_match"].values())
    assert report["checksum_reference"] == "build"
    for variant in cold_load.VARIANTS:
        load = report["cold_loads"][variant]
        assert load["cold"]["verified"] is True and load["on_device"] == ["cpu"] and load["load_s"] > 0
    assert set(summary["cold_breakdown_s"]["cpu_then_to"]) == {"from_pretrained_cpu", "to_device"}
    assert set(summary["cold_breakdown_s"]["onto_device_no_read_ahead"]) == set(report["build"]["checksums"])
    assert summary["warm_variant"] == summary["fastest_cold"] and summary["warm_load_s"] > 0
    # the warm load starts from a cached folder (the host may have evicted a few pages meanwhile: 0.9993 seen on a
    # 2-core machine running other tests beside it)
    assert report["warm"]["cache_before"]["resident_fraction"] >= 0.99
    assert report["versions"]["diffusers"] and report["versions"]["safetensors"]

    # Again on the saved folder, onto a GPU: not built again; without a GPU the loads fail saying so.
    if torch.cuda.is_available():
        return
    code = cold_load.main(["--folder", str(folder), "--out", str(out), "--no-drop-caches",
                           "--variants", "load_pipeline,cpu_then_to", "--threads", "2"])
    report = json.loads(out.read_text())
    assert code == 1 and "skipped" in report["build"]
    assert set(report["errors"]) == {"device", "load_pipeline", "cpu_then_to"}
    assert all("needs a CUDA GPU" in message for message in report["errors"].values())
    assert report["summary"]["disk_read_gb_s"] > 0 and report["cold"]["verified"] is True
    assert report["warm"] == {"skipped": "no cold load succeeded"}


def test_a_folder_in_the_way_is_not_overwritten(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        cold_load.build_and_save(folder, "synthetic:tiny", torch.device("cpu"))
    assert (folder / "notes.txt").read_text() == "mine"
