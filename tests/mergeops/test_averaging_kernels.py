"""The averaging family's fused kernels (``averaging.c``: nearswap, linear combinations, Gram
lane sums) give their torch reference's bits, and merges are the same with the kernels on and
off."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import mergeops
from mergeops import kernel_settings, kernels
from mergeops.ops.fusion import nearswap
from mergeops.ops.gram import LaneGram, linear_combination
from mergeops.ops.spherical import nuslerp_apply, nuslerp_coefficients, nuslerp_cosine
from tests.mergeops.kernel_calls import count_kernel_calls

if not (shutil.which("cc") or shutil.which("gcc")) and os.environ.get("CI") != "true":
    pytest.skip("no C compiler: the fused kernels are off here", allow_module_level=True)


def _pair(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-valued base and model: differences of every size, equal entries, ±0."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16().float()
    step = torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 0, (n,), generator=g)
    other = (base + step).bfloat16().float()
    other[: n // 10] = base[: n // 10]
    base[n // 10 : n // 5], other[n // 10 : n // 5] = -0.0, 0.0
    return base, other


@pytest.mark.parametrize("t", [1e-6, 1e-4, 0.3, 5.0])
def test_nearswap_kernel_gives_the_torch_bits(kernel_dir: Path, t: float) -> None:
    base, other = _pair(1, 64 * 211 + 5)
    fused = kernels.nearswap(base, other, t)
    assert fused is not None
    kernel_settings.configure(enabled=False)
    reference = nearswap(base, other, t)
    assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))


def test_nearswap_kernel_refuses_what_it_cannot_take(kernel_dir: Path) -> None:
    base, other = _pair(2, 100)
    assert kernels.nearswap(base, other, 0.0) is None  # t <= 0: the torch path's clamps
    assert kernels.nearswap(base.bfloat16(), other.bfloat16(), 0.1) is None
    assert kernels.nearswap(base, other[:50], 0.1) is None


def test_a_nearswap_merge_is_the_same_with_the_kernels_off(
    kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, other = _pair(3, 1024 * 1024)  # 4 MiB of float32: merged in row slices
    taken = []
    real = kernels.nearswap
    monkeypatch.setattr(kernels, "nearswap", lambda *a: taken.append(real(*a)) or taken[-1])
    outputs = []
    for on in (True, False):
        kernel_settings.configure(enabled=on)
        merged = mergeops.merge("nearswap", [{"w": other.reshape(1024, 1024)}],
                                base={"w": base.reshape(1024, 1024)}, t=1e-3, device="cpu")  # fmt: skip
        outputs.append(merged["w"])
    assert torch.equal(outputs[0].view(torch.int32), outputs[1].view(torch.int32))
    assert taken and taken[0] is not None


@pytest.mark.parametrize("count", [1, 2, 4, 16])
@pytest.mark.parametrize("with_base", [False, True])
def test_gram_lanes_kernel_gives_the_torch_bits(
    kernel_dir: Path, count: int, with_base: bool
) -> None:
    n = 64 * 37 + 5  # a short last lane row
    g = torch.Generator().manual_seed(count)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16().float()
    tensors = [base + torch.randn(n, generator=g) * 10.0**-t for t in range(count)]
    grams = []
    for on in (True, False):
        kernel_settings.configure(enabled=on)
        lanes = LaneGram(count, torch.device("cpu"))
        for start in range(0, n, 64 * 5):  # slices starting at multiples of 8
            lanes.observe([t[start : start + 64 * 5] for t in tensors],
                          base[start : start + 64 * 5] if with_base else None)  # fmt: skip
        grams.append(lanes.gram())
    assert torch.equal(grams[0], grams[1])
    vectors = [(t - base if with_base else t).double() for t in tensors]
    exact = torch.tensor(
        [[math.fsum((a * b).tolist()) for b in vectors] for a in vectors], dtype=torch.float64
    )
    assert torch.allclose(grams[0], exact, rtol=1e-13, atol=0)


@pytest.mark.parametrize("with_base", [False, True])
def test_linear_combination_kernel_gives_the_torch_bits(kernel_dir: Path, with_base: bool) -> None:
    base, other = _pair(5, 64 * 40 + 3)
    tensors = [other, base * 0.5, -other]
    coefficients = torch.tensor([0.7, -1.25, 0.3000001])
    fused = linear_combination(coefficients, tensors, base if with_base else None)
    kernel_settings.configure(enabled=False)
    reference = linear_combination(coefficients, tensors, base if with_base else None)
    assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))


def test_nuslerp_spherical_step_gives_the_torch_bits(kernel_dir: Path) -> None:
    base, other = _pair(6, 64 * 30 + 1)
    gram = torch.tensor([[2.0, 1.1], [1.1, 3.0]], dtype=torch.float64)
    coefficients = nuslerp_coefficients(0.35, nuslerp_cosine(gram))
    assert not bool(coefficients[3].any())  # not collinear: the spherical branch
    fused = nuslerp_apply(0.35, coefficients, base, other, branch="spherical")
    assert kernels.nuslerp_apply(base, other, 1.0, 1.0, 1.0) is not None
    kernel_settings.configure(enabled=False)
    reference = nuslerp_apply(0.35, coefficients, base, other, branch="spherical")
    assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))


def test_a_model_stock_merge_is_the_same_with_the_kernels_off(
    kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model_stock's Gram lanes and final linear combination take the kernels (row slices of
    a 4 MiB tensor) and give the torch path's bytes."""
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(1024, 1024, generator=gen)
    models = [{"w": base + 0.1 * torch.randn(1024, 1024, generator=gen)} for _ in range(3)]
    calls = count_kernel_calls(monkeypatch, ["gram_lanes", "linear_combination"])
    outputs = []
    for on in (True, False):
        kernel_settings.configure(enabled=on)
        outputs.append(mergeops.merge("model_stock", models, base={"w": base}, device="cpu")["w"])
    assert torch.equal(outputs[0].view(torch.int32), outputs[1].view(torch.int32))
    assert calls["gram_lanes"] >= 2 and calls["linear_combination"] >= 2  # every slice
    assert not torch.equal(outputs[0], base)
