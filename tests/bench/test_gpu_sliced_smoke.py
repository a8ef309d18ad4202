"""Smoke run of ``bench.gpu_sliced`` (the CUDA check's parity/throughput/RSS table) with the
CPU standing in for the device, at tiny size: what bench/gpu_check.sh runs on a GPU."""

from pathlib import Path

from bench import gpu_sliced
from bench._synth import SHAPES, write_family


def test_compare_finds_differences_and_identical_tensors(tmp_path: Path) -> None:
    folders = write_family(tmp_path / "m", shape=SHAPES["tiny"], finetunes=1)
    same = gpu_sliced.compare(folders[0], folders[0])
    assert same.max_abs == 0 and same.identical == same.tensors > 0 and same.largest > 0
    other = gpu_sliced.compare(folders[0], folders[1])
    assert 0 < other.max_abs < 1 and other.identical < other.tensors


def test_one_method_runs_twice_and_reports_parity_throughput_and_memory(tmp_path: Path) -> None:
    folders = write_family(tmp_path / "m", shape=SHAPES["tiny"], finetunes=2)
    row = gpu_sliced.run_method(tmp_path, "task_arithmetic", folders, "cpu")
    assert row.parity is not None and row.parity.max_abs == 0
    assert row.parity.identical == row.parity.tensors
    assert row.merge_s > 0 and row.moved > 0 and row.dev.peak_rss > 0
    table = gpu_sliced.report([row], h2d=25.0, device="cpu")
    assert table.splitlines()[2].split()[:3] == ["task_arithmetic", "0", "21/21"]
    assert not list(tmp_path.glob("out-*"))  # outputs removed after the comparison
