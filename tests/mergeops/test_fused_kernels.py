"""The fused C combines (``mergeops.kernels``) give the torch path's bits, and a merge falls back
to the torch path, with the same result, when they cannot be built or loaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mergeops import kernel_settings, kernels
from mergeops.ops.basic import blocked_weighted_sum
from mergeops.ops.blocked_combine import blocked_combine, fused_task_arithmetic
from mergeops.ops.sign_consensus import stacked_combine
from tests.mergeops.kernel_calls import count_kernel_calls, write_family

HAVE_CC = bool(shutil.which("cc") or shutil.which("gcc"))
if not HAVE_CC and os.environ.get("CI") != "true":
    pytest.skip("no C compiler: the fused kernels are off here", allow_module_level=True)


def _switch(on: bool) -> None:
    kernel_settings.configure(enabled=on)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def _case(seed: int, count: int, length: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16-valued base and fine-tunes in float32 with the awkward values a merge meets: τ of
    every magnitude, exact zeros (sparsified τ, equal weights), ±0 and subnormal products."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(length, generator=g) * 0.02).bfloat16().float()
    models = []
    for t in range(count):
        scale = 10.0 ** float(torch.randint(-7, 1, (1,), generator=g))
        model = (base + torch.randn(length, generator=g) * scale).bfloat16().float()
        same = torch.rand(length, generator=g) < 0.3
        model[same] = base[same]  # τ exactly 0
        if t == 0:
            model[:64] = base[:64]  # τ exactly 0
            model[64:128] = 1e-38  # products below the normal range
        models.append(model)
    base[128:192] = -0.0
    return base, models


WEIGHTS = {
    "ones": lambda n: [1.0] * n,
    "mixed": lambda n: [0.9 - 0.35 * t for t in range(n)],  # some negative
    "cancel": lambda n: [1.0 if t % 2 == 0 else -1.0 for t in range(n)],  # Σ w may be 0
}


@pytest.mark.parametrize("count", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("weights", sorted(WEIGHTS))
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_kernels_give_the_reference_bits(
    kernel_dir: Path, count: int, weights: str, normalize: bool, scale: float
) -> None:
    base, models = _case(count * 7 + len(weights), count, 64 * 389)
    w = WEIGHTS[weights](count)
    taus = [m - base for m in models]
    for t, tau in enumerate(taus):
        tau[torch.rand(tau.numel(), generator=torch.Generator().manual_seed(t)) < 0.4] = 0
    assert kernels.library() is not None  # built here, in CI too (gcc is installed)
    for consensus in (False, True):
        ref = stacked_combine(base, taus, w, consensus=consensus, normalize=normalize, scale=scale)
        got = blocked_combine(base, taus, w, consensus=consensus, normalize=normalize, scale=scale)
        assert torch.equal(_bits(got), _bits(ref)), (consensus, normalize, scale)
    ref = stacked_combine(base, [m - base for m in models], w, consensus=False,
                          normalize=normalize, scale=scale)  # fmt: skip
    out = torch.empty_like(base)
    assert fused_task_arithmetic(base, models, w, normalize=normalize, scale=scale, out=out)
    assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.parametrize("divisor", [None, 2.6, 3.0000001])
def test_linear_sum_gives_the_torch_bits(kernel_dir: Path, divisor: float | None) -> None:
    _, models = _case(3, 5, 64 * 100)
    w = [1.0, 0.8, 0.6, 0.4, 0.3]
    fused = blocked_weighted_sum(models, w, divisor)
    _switch(False)
    plain = blocked_weighted_sum(models, w, divisor)
    assert kernels.library() is None
    assert torch.equal(_bits(fused), _bits(plain))


def test_kernels_refuse_what_they_cannot_take(kernel_dir: Path) -> None:
    base, models = _case(1, 2, 64 * 10)
    w = torch.tensor([1.0, 0.5])
    # The output may not overlap an input (the kernel's pointers are restrict).
    assert not kernels.weighted_sum(base, models, w, models=True, divisor=None, scale=1.0,
                                    out=models[0])  # fmt: skip
    halves = torch.empty(2 * base.numel())
    assert not kernels.weighted_sum(
        base, models, w, models=True, divisor=None, scale=1.0, out=halves[::2]
    )  # fmt: skip (not contiguous)
    assert not kernels.weighted_sum(base.double(), [m.double() for m in models], w,
                                    models=True, divisor=None, scale=1.0,
                                    out=torch.empty_like(base.double()))  # fmt: skip
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.weighted_sum(base, models, w.double(), models=True, divisor=None, scale=1.0,
                             out=torch.empty_like(base))  # fmt: skip


def test_built_once_into_a_private_folder(kernel_dir: Path) -> None:
    assert kernels.library() is not None
    built = list(kernel_dir.glob("combine-*.so"))
    assert len(built) == 1 and kernel_dir.stat().st_mode & 0o077 == 0
    stamp = built[0].stat().st_mtime_ns
    kernel_settings.reset()  # other settings, then these again: the library is loaded anew
    kernel_settings.configure(cache_dir=kernel_dir)
    assert kernels.library() is not None  # loaded from the cache, not rebuilt
    assert [p.stat().st_mtime_ns for p in kernel_dir.glob("combine-*.so")] == [stamp]


def test_a_shared_folder_or_a_failed_build_falls_back_to_torch(kernel_dir: Path) -> None:
    base, models = _case(5, 4, 64 * 50)
    w = [1.0, 0.8, 0.6, 0.4]
    _switch(False)
    expected = blocked_combine(base, [m - base for m in models], w, consensus=True,
                               normalize=True, scale=1.0)  # fmt: skip
    _switch(True)
    kernel_dir.mkdir(mode=0o700)
    kernel_dir.chmod(0o777)  # others could plant code here: not loaded
    assert kernels.library() is None
    kernel_dir.chmod(0o700)
    kernel_settings.configure(compiler=["false"])  # a compiler that fails
    assert kernels.library() is None
    got = blocked_combine(base, [m - base for m in models], w, consensus=True, normalize=True,
                          scale=1.0)  # fmt: skip
    assert torch.equal(_bits(got), _bits(expected))


def test_a_merge_gives_the_same_bytes_with_and_without_the_kernels(
    kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergeops import merge_files

    base, models = _case(9, 3, 1024 * 1024)  # 4 MiB of float32: merged in row slices
    calls = count_kernel_calls(monkeypatch, ["weighted_sum", "consensus_sum", "trim",
                                             "tau_key_counts", "window_trim"])  # fmt: skip
    folders = write_family(tmp_path, base, models, torch.bfloat16)
    outputs = {}
    method_params: dict[str, dict[str, Any]] = {
        "task_arithmetic": {},
        "ties": {"density": [0.5, 0.3, 1.0]},
        "linear": {},
        "breadcrumbs_ties": {"density": [0.5, 0.3, 1.0], "gamma": 0.1, "tie_break": "position"},
    }
    for method, params in method_params.items():
        for switch in ("1", "0"):
            _switch(switch == "1")
            out = tmp_path / f"out-{method}-{switch}"
            merge_files(
                method=method,
                base=folders[0] if method != "linear" else None,
                models=folders[1:],
                out_dir=out,
                device="cpu",
                dtype="float32",
                progress=False,
                **params,
            )
            files = sorted(out.glob("*.safetensors"))
            assert files, method
            outputs[method, switch] = b"".join(f.read_bytes() for f in files)
        assert outputs[method, "1"] == outputs[method, "0"], method
    assert calls["weighted_sum"] >= 4 and calls["consensus_sum"] >= 2  # slices took the kernels
    assert calls["trim"] >= 4 and calls["tau_key_counts"] >= 8  # TIES's trims, both sweeps
    assert calls["window_trim"] >= 4  # breadcrumbs' windows


def test_key_counts_are_the_bincount_of_the_torch_sweep(kernel_dir: Path) -> None:
    from mergeops.ops.select import RankCounter, rank_stats

    base, models = _case(4, 2, 64 * 4096)
    tau = (models[1] - base).abs_()
    tau[:4096] = torch.rand(4096) * 1e-3  # float32 values with low bits (a second sweep)
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    assert kernels.key_counts(tau.view(torch.int32), counts)
    bits = tau.view(torch.int32)
    keys = (bits >> 16) * 2 + (bits & 0xFFFF != 0).int()
    assert torch.equal(counts, torch.bincount(keys, minlength=1 << 16))
    ranks = [1, 7, tau.numel() // 5, tau.numel() // 2, tau.numel()]
    fused = rank_stats(tau, ranks)
    _switch(False)
    assert rank_stats(tau, ranks) == fused
    _switch(True)
    counter = RankCounter(8, [1], torch.float32)
    with pytest.raises(ValueError, match="non-negative"):
        counter.observe(torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0, 1.0, 2.0, 3.0]))


def _tied(seed: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a model whose |τ| take a few values only: ties at any threshold."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(length, generator=g) * 0.02).bfloat16().float()
    steps = torch.randint(-3, 4, (length,), generator=g).float() * 0.25
    return base, base + steps  # exact: small multiples of 1/4 added to bf16 values


@pytest.mark.parametrize(
    ("inclusive", "quota"), [(True, 0), (False, 0), (False, 1), (False, 700), (False, 10**9)]
)
def test_trim_gives_the_torch_bits_slice_after_slice(
    kernel_dir: Path, quota: int, inclusive: bool
) -> None:
    """``kernels.trim`` against the torch trim (``sub_``, ``keep_rows``, ``mul_``): the same
    bits (a dropped negative τ is -0), the tie quota spent in flat order across slices."""
    from mergeops.methods.task_vector._per_model import CutStat
    from mergeops.ops.sparsify import TrimCut
    from mergeops.ops.streamed_topk import OrderedTieCut

    base, model = _tied(5, 64 * 1024)
    empty = torch.empty(0, dtype=torch.int64)

    def cut() -> Any:
        if quota == 0:
            return TrimCut(0.25, empty, inclusive=inclusive)
        return OrderedTieCut(0.25, quota)

    fused, torch_path = CutStat(cut(), None), CutStat(cut(), None)
    for start in range(0, base.numel(), 8192):
        rows = slice(start, start + 8192)
        got = model[rows].clone()
        assert fused.trim_model(got, base[rows], start)
        expected = torch_path.apply(model[rows].clone().sub_(base[rows]), start, in_place=True)
        assert torch.equal(_bits(got), _bits(expected)), start
    assert int((model - base).abs().eq(0.25).sum()) > 2 * 700  # the quota ended mid-way


@pytest.mark.parametrize(
    ("density", "gamma"), [(0.3, 0.1), (0.5, 0.0), (0.05, 0.01), (0.9, 0.05), (0.02, 0.3)]
)
@pytest.mark.parametrize("rows", [8192, 5000])
def test_window_trim_gives_the_torch_bits_slice_after_slice(
    kernel_dir: Path, density: float, gamma: float, rows: int
) -> None:
    """``kernels.window_trim`` against the torch window (``sub_``, ``keep_rows``, ``mul_``):
    the same bits, the tie runs at both ends started and ended in flat order across slices
    (|τ| takes four values, so both cuts fall inside tie groups, some in one group)."""
    from mergeops.methods.task_vector._per_model import CutStat
    from mergeops.ops.selection import window_bounds
    from mergeops.ops.streamed_topk import SliceWindow

    base, model = _tied(7, 64 * 1024)
    window = window_bounds(base.numel(), density, gamma)

    def cut() -> Any:
        selector = SliceWindow(base.numel(), *window)
        selector.observe((model - base).abs())
        assert not selector.next_pass()
        return selector.cut()

    fused, torch_path = CutStat(cut(), None), CutStat(cut(), None)
    kept = 0
    for start in range(0, base.numel(), rows):
        span = slice(start, start + rows)
        got = model[span].clone()
        assert fused.trim_model(got, base[span], start)
        expected = torch_path.apply(model[span].clone().sub_(base[span]), start, in_place=True)
        assert torch.equal(_bits(got), _bits(expected)), start
        kept += int((got != 0).sum())
    nonzero = (model - base) != 0
    assert kept <= window[1] - window[0] <= kept + int((~nonzero).sum())


def test_the_sweep_counts_the_magnitudes_of_the_differences(kernel_dir: Path) -> None:
    from mergeops.ops.select import RankCounter

    base, models = _case(6, 1, 64 * 4096)
    ranks = [1, 1000, base.numel() // 2, base.numel()]
    fused = RankCounter(base.numel(), ranks, torch.float32)
    for start in range(0, base.numel(), 4096):
        fused.observe_difference(models[0][start : start + 4096], base[start : start + 4096])
    while fused.next_pass():
        for start in range(0, base.numel(), 4096):
            fused.observe_difference(models[0][start : start + 4096], base[start : start + 4096])
    plain = RankCounter(base.numel(), ranks, torch.float32)
    magnitude = (models[0] - base).abs()
    while True:
        plain.observe(magnitude)
        if not plain.next_pass():
            break
    assert fused.result() == plain.result()
