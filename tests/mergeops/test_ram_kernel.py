"""RAM's fused kernel (``kernels.ram_combine`` / ``ram_counts``, ``ram.c``) gives the bits of
the torch ops of ``mergeops.ops.ram``, and a RAM merge the same bytes with the kernels off."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mergeops import kernel_settings, kernels
from mergeops.ops import ram
from tests.mergeops.kernel_calls import (
    count_kernel_calls,
    merged_bytes_with_kernels_on_and_off,
    write_family,
)

if not (shutil.which("cc") or shutil.which("gcc")) and os.environ.get("CI") != "true":
    pytest.skip("no C compiler: the fused kernels are off here", allow_module_level=True)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def _torch_path(fn: Any, *args: Any) -> Any:
    kernel_settings.configure(enabled=False)
    try:
        assert kernels.library() is None
        return fn(*args)
    finally:
        kernel_settings.configure(enabled=True)


def _case(seed: int, count: int, epsilon: float, length: int = 64 * 301):
    """Task vectors of every size around ε: exactly float32(ε) and its neighbours, zeros, ±0,
    entries one model moved and entries several moved."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(length, generator=g) * 0.02).bfloat16().float()
    base[:64] = -0.0
    eps = torch.tensor(epsilon, dtype=torch.float32)
    near = torch.stack([torch.nextafter(eps, torch.tensor(0.0)), eps,
                        torch.nextafter(eps, torch.tensor(1.0))])  # fmt: skip
    models = []
    for _ in range(count):
        scale = 10.0 ** float(torch.randint(-7, 0, (1,), generator=g))
        tau = torch.randn(length, generator=g) * scale
        edge = torch.rand(length, generator=g) < 0.2
        tau[edge] = near[torch.randint(0, 3, (int(edge.sum()),), generator=g)]
        tau[torch.rand(length, generator=g) < 0.5] = 0.0  # unmoved, some entries by every model
        tau *= torch.where(torch.rand(length, generator=g) < 0.5, -1.0, 1.0)
        models.append(base + tau)
    return base, models


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("epsilon", [1e-5, 0.1, 0.0])
def test_ram_kernel_gives_the_torch_bits(kernel_dir: Path, count: int, epsilon: float) -> None:
    base, models = _case(count, count, epsilon)
    assert kernels.library() is not None  # built here, in CI too (gcc is installed)
    fused = ram.ram_merge(base, models, epsilon)
    assert torch.equal(_bits(fused), _bits(_torch_path(ram.ram_merge, base, models, epsilon)))

    shared, unique = ram.mover_counts(base, models, epsilon)
    ref_shared, ref_unique = _torch_path(ram.mover_counts, base, models, epsilon)
    assert torch.equal(shared, ref_shared) and torch.equal(unique, ref_unique)
    assert int(unique.sum()) > 0 and (count == 1 or int(shared.sum()) > 0)

    scale = ram.ramplus_scale(shared, unique, 0.1, 0.2, epsilon)
    scale[0] = 1.0000001  # a factor that rounds
    fused = ram.ramplus_combine(base, models, scale, epsilon)
    ref = _torch_path(ram.ramplus_combine, base, models, scale, epsilon)
    assert torch.equal(_bits(fused), _bits(ref))


def test_ram_kernel_refuses_what_it_cannot_take(kernel_dir: Path) -> None:
    base, models = _case(5, 17, 1e-5, 64)
    assert kernels.ram_combine(base, models, 1e-5) is None  # more than 16 models
    assert kernels.ram_combine(base.bfloat16(), [m.bfloat16() for m in models[:2]], 1e-5) is None
    assert kernels.ram_counts(base, [m[:32] for m in models[:2]], 1e-5) is None  # sizes differ
    assert kernels.ram_counts(base, models, 1e-5) is not None  # counts take any number
    with pytest.raises(ValueError, match="float32"):
        kernels.ram_combine(base, models[:2], 1e-5, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_a_ram_merge_gives_the_same_bytes_with_and_without_the_kernel(
    kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    base, models = _case(9, 3, 1e-5, 1024 * 1024)  # 4 MiB of float32: merged in row slices
    calls = count_kernel_calls(monkeypatch, ["ram_combine", "ram_counts"])
    folders = write_family(tmp_path, base, models, torch.float32)
    on, off = merged_bytes_with_kernels_on_and_off(tmp_path, method, folders)
    assert on == off
    assert calls["ram_combine"] >= 2  # every slice took the kernel
    assert calls["ram_counts"] >= (2 if method == "ramplus_tl" else 0)
