"""Radix selection (``kernels.select_ranks``, ``select.c``) gives the order statistics numpy's
introselect gives, and arcee_fusion's quartiles and merges are the same with the kernels on
and off."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import mergeops
from mergeops import kernel_settings, kernels
from mergeops.ops.fusion import RADIX_MIN, quartile_indices, quartiles_in_place

if not (shutil.which("cc") or shutil.which("gcc")) and os.environ.get("CI") != "true":
    pytest.skip("no C compiler: the fused kernels are off here", allow_module_level=True)


def _values(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "wide":  # both signs, magnitudes over many octaves
        return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    if kind == "ties":  # ±0, a repeated value, few distinct values
        values = (torch.randint(-3, 4, (n,), generator=g) * 0.25).float()
        values[torch.rand(n, generator=g) < 0.2] = -0.0
        return values
    if kind == "same-bin":  # all in one high-16-bit bin: the second pass decides
        return 1.0 + torch.randint(0, 100, (n,), generator=g).float() * 2**-23
    return torch.tensor([float("inf"), -float("inf"), 1e-45, -1e-45, 3.0] * (n // 5))


@pytest.mark.parametrize("kind", ["wide", "ties", "same-bin", "extremes"])
@pytest.mark.parametrize("n", [5, 1001, 70_000])
def test_select_ranks_gives_numpy_s_order_statistics(kernel_dir: Path, kind: str, n: int) -> None:
    values = _values(kind, n)
    n = values.numel()
    ranks = [0, *quartile_indices(n)][:4] if n > 1 else [0]
    got = kernels.select_ranks(values, ranks)
    assert got is not None
    array = values.numpy().copy()
    array.partition(ranks)
    assert torch.equal(got, torch.from_numpy(array[ranks].copy()))  # -0.0 == +0.0
    assert torch.equal(values, _values(kind, values.numel()) if kind != "extremes" else values)


def test_select_ranks_refuses_what_it_cannot_take(kernel_dir: Path) -> None:
    values = _values("wide", 100)
    assert kernels.select_ranks(values, [100]) is None  # out of range
    assert kernels.select_ranks(values, [1, 2, 3, 4, 5]) is None  # more than 4 ranks
    assert kernels.select_ranks(values.double(), [1]) is None
    values[7] = float("nan")
    assert kernels.select_ranks(values, [1]) is None


def test_quartiles_are_the_same_with_the_kernels_off(kernel_dir: Path) -> None:
    values = _values("wide", RADIX_MIN + 13)
    fused = quartiles_in_place(values.clone())
    kernel_settings.configure(enabled=False)
    assert kernels.library() is None
    assert torch.equal(fused, quartiles_in_place(values.clone()))


def test_an_arcee_fusion_merge_is_the_same_with_the_kernels_off(
    kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = []
    real = kernels.select_ranks
    monkeypatch.setattr(kernels, "select_ranks", lambda *a: taken.append(real(*a)) or taken[-1])
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(640, 512, generator=g)}  # 327K entries: radix selection
    model = {"w": base["w"] + torch.randn(640, 512, generator=g) * 0.01}
    outputs = []
    for on in (True, False):
        kernel_settings.configure(enabled=on)
        outputs.append(mergeops.merge("arcee_fusion", [model], base=base, device="cpu")["w"])
    assert torch.equal(outputs[0], outputs[1])
    assert taken and taken[0] is not None  # the merge with the kernels on selected by radix
    kept = outputs[0] != base["w"]
    assert 0 < int(kept.sum()) < kept.numel()
