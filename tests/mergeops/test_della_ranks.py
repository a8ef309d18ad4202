"""DELLA's keep probabilities rank equal magnitudes in index order (a stable sort), and the
radix kernel (``kernels.della_probabilities``, ``rank.c``) gives the bits of the torch path:
per row, over several threads, for every row length; a DELLA merge gives the same bytes with
the kernels off."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mergeops import kernel_settings, kernels
from mergeops.kernels import rank
from mergeops.ops.prune import della_keep_probability
from tests.mergeops.kernel_calls import (
    count_kernel_calls,
    merged_bytes_with_kernels_on_and_off,
    write_family,
)

if not (shutil.which("cc") or shutil.which("gcc")) and os.environ.get("CI") != "true":
    pytest.skip("no C compiler: the fused kernels are off here", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("kernel_dir")  # kernels on, in a fresh folder


def _torch_path(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    kernel_settings.configure(enabled=False)
    try:
        assert kernels.library() is None
        return della_keep_probability(tensor, density, epsilon)
    finally:
        kernel_settings.configure(enabled=True)


def _rows(seed: int, count: int, cols: int) -> torch.Tensor:
    """τ of bf16 checkpoints (many equal magnitudes per row), with zero, -0.0 and sign rows."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(count, cols, generator=gen).bfloat16().float()
    rows = (a - torch.randn(count, cols, generator=gen).bfloat16().float()) * 0.01
    rows[0, : cols // 2] = 0.0
    rows[1] = -0.0
    rows[2, ::2] *= -1
    rows[3] = torch.arange(cols, dtype=torch.float32).flip(0) % 3  # three values, long ties
    return rows


def test_equal_magnitudes_rank_in_index_order() -> None:
    """Rows of three magnitudes in long ties (where torch's unstable sort mixes them): each
    entry's rank is the count of smaller magnitudes plus that of equal ones before it."""
    gen = torch.Generator().manual_seed(2)
    tau = torch.randint(0, 3, (4, 200), generator=gen).float() * 0.25
    tau[:, ::3] *= -1
    magnitude = tau.abs().tolist()
    ranks = torch.tensor([
        [sum(m < v for m in row) + sum(m == v for m in row[:i]) for i, v in enumerate(row)]
        for row in magnitude
    ], dtype=torch.float32)  # fmt: skip
    expected = torch.tensor(0.5 - 0.1) + ((ranks / 199) * 2) * torch.tensor(0.1)
    assert torch.equal(della_keep_probability(tau, 0.5, 0.1), expected)
    assert torch.equal(_torch_path(tau, 0.5, 0.1), expected)


@pytest.mark.parametrize("cols", [2, 3, 17, 256, 640, 5000])
def test_the_kernel_gives_the_torch_bits(cols: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(cols, 40, cols)
    expected = _torch_path(rows, 0.4, 0.15)
    monkeypatch.setattr(rank, "PARALLEL_MIN", 64)  # split even these rows over threads
    for workers in (1, 2, 3):
        got = kernels.della_probabilities(rows, 0.4, 0.15, workers=workers)
        assert got is not None
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), workers


def test_the_kernel_refuses_what_it_cannot_take() -> None:
    rows = _rows(1, 8, 64)
    assert kernels.della_probabilities(rows[:, :1].contiguous(), 0.5, 0.1) is None  # 1 column
    assert kernels.della_probabilities(rows.t(), 0.5, 0.1) is None  # not contiguous
    assert kernels.della_probabilities(rows.double(), 0.5, 0.1) is None
    assert kernels.della_probabilities(rows.reshape(8, 8, 8), 0.5, 0.1) is None
    # what the kernel refuses still ranks stably through torch
    single = della_keep_probability(torch.tensor([[3.0], [1.0]]), 0.5, 0.1)
    assert torch.equal(single, torch.full((2, 1), 0.5))


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_a_della_merge_gives_the_same_bytes_with_and_without_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    rows = _rows(5, 1024 * 3, 1024)
    base, models = rows[0:1024], [rows[1024:2048], rows[2048:]]
    calls = count_kernel_calls(monkeypatch, ["della_probabilities"])
    folders = write_family(tmp_path, base, models, torch.float32)
    on, off = merged_bytes_with_kernels_on_and_off(
        tmp_path, method, folders, params={"density": 0.5, "epsilon": 0.1}
    )
    assert on == off
    assert calls["della_probabilities"] >= 2  # one whole-tensor draw per model
