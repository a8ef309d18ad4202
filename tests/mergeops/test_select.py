"""Histogram order statistics (``ops.select``) and the cuts built on them: exact, equal to
``kthvalue`` and to the sort-based selections they replaced."""

from __future__ import annotations

import pytest
import torch

from mergeops.ops import select
from mergeops.ops.select import RankStat, rank_stats
from mergeops.ops.selection import topk_cut_by, window_cut
from mergeops.ops.sparsify import first_equal, keep_count


def _tied(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Non-negative values with large tie groups, zeros and some spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (n,), generator=g).float() * 0.37
    x[::5] = torch.rand(x[::5].numel(), generator=g) * 3
    x[::11] = 0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 63, 5000, 70_001])
def test_rank_stats_equal_kthvalue_and_counts(
    dtype: torch.dtype, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(select, "BLOCK", 4096)  # several blocks on small tensors
    x = _tied(n, dtype, seed=n)
    ranks = sorted({1, n, (n + 1) // 2, max(1, n // 7), max(1, n - n // 9)})
    for rank, stat in zip(ranks, rank_stats(x, ranks), strict=True):
        value = x.float().kthvalue(rank).values.to(dtype)
        assert stat.value == float(value)
        assert stat.below == int((x < value).sum())
        assert stat.equal == int((x == value).sum())
        assert stat.below < rank <= stat.below + stat.equal


def test_rank_stats_float32_exact_on_close_values() -> None:
    """Values differing only in their low bits land in one high bin: the second pass decides."""
    base = torch.tensor(1.5)
    bits = base.view(torch.int32) + torch.randint(0, 300, (20_000,), dtype=torch.int32)
    x = bits.view(torch.float32)
    for rank, stat in zip([1, 777, 20_000], rank_stats(x, [1, 777, 20_000]), strict=True):
        assert stat.value == float(x.kthvalue(rank).values)


def test_rank_stats_refuses_negative_values_and_bad_ranks() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        rank_stats(torch.tensor([1.0, -2.0, 3.0]), [1])
    with pytest.raises(ValueError, match=r"rank 4 is outside 1\.\.3"):
        rank_stats(torch.tensor([1.0, 2.0, 3.0]), [4])


def test_rank_stats_other_dtypes_use_kthvalue() -> None:
    x = _tied(3000, torch.float64)
    stat = rank_stats(x, [1200])[0]
    assert stat.value == float(x.kthvalue(1200).values)
    assert stat.below == int((x < stat.value).sum())


def test_first_equal_stops_at_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergeops.ops import sparsify

    monkeypatch.setattr(sparsify, "_TIE_BLOCK", 100)
    x = _tied(1000, torch.float32)
    every = (x == 0).nonzero().reshape(-1)
    assert torch.equal(first_equal(x, 0.0, 7), every[:7])
    assert torch.equal(first_equal(x, 0.0, 10_000), every)
    assert first_equal(x, 0.0, 0).numel() == 0


def _reference_topk(magnitude: torch.Tensor, k: int, tie_break: str) -> torch.Tensor:
    flat = magnitude.reshape(-1)
    if tie_break == "position":
        order = torch.sort(flat.float(), descending=True, stable=True).indices
    else:  # what mergekit keeps: its unstable argsort on float32 keys
        order = torch.argsort(flat.float(), descending=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(magnitude.shape)


@pytest.mark.parametrize("tie_break", ["position", "mergekit"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_cut_keeps_the_reference_set(tie_break: str, density: float, dtype: torch.dtype):
    magnitude = _tied(6000, dtype, seed=3).view(60, 100)
    cut = topk_cut_by(magnitude, density, tie_break)  # type: ignore[arg-type]
    assert cut is not None
    mask = cut.mask_rows(magnitude, 0)
    k = keep_count(magnitude.numel(), density)
    assert int(mask.sum()) == k
    assert torch.equal(mask, _reference_topk(magnitude, k, tie_break))
    rows = torch.cat([cut.mask_rows(magnitude[r : r + 7], r * 100) for r in range(0, 60, 7)])
    assert torch.equal(rows, mask)  # slices apply the same cut


def test_topk_cut_whole_tie_group_is_inclusive() -> None:
    """When every entry equal to the threshold survives no tie indices are listed."""
    magnitude = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5, 2.0])
    cut = topk_cut_by(magnitude, 4 / 6, "position")
    assert cut is not None and cut.inclusive and cut.ties.numel() == 0
    assert cut.mask_rows(magnitude, 0).tolist() == [True, False, True, True, False, True]
    partial = topk_cut_by(magnitude, 3 / 6, "position")
    assert partial is not None and not partial.inclusive
    assert partial.mask_rows(magnitude, 0).tolist() == [True, False, True, True, False, False]


@pytest.mark.parametrize("tie_break", ["position", "mergekit"])
@pytest.mark.parametrize(("lo", "hi"), [(0, 4000), (1000, 5000), (2500, 2600), (10, 5999)])
def test_window_cut_keeps_the_reference_ranks(tie_break: str, lo: int, hi: int) -> None:
    magnitude = _tied(6000, torch.float32, seed=5)
    cut = window_cut(magnitude, lo, hi, tie_break)  # type: ignore[arg-type]
    assert cut is not None
    stable = tie_break == "position"
    order = torch.sort(magnitude, stable=stable).indices
    reference = torch.zeros(6000, dtype=torch.bool)
    reference[order[lo:hi]] = True
    assert torch.equal(cut.mask_rows(magnitude, 0), reference)


def test_rank_stats_same_with_one_and_two_threads() -> None:
    x = _tied(300_000, torch.float32, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rank_stats(x, [5, 150_000, 299_000])
        torch.set_num_threads(2)
        two = rank_stats(x, [5, 150_000, 299_000])
    finally:
        torch.set_num_threads(before)
    assert one == two


def _bf16_task_vector(n: int, seed: int) -> torch.Tensor:
    """|θ_ft - θ_0| of bf16 weights in float32: mostly zero low bits, a few not."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).bfloat16()
    tuned = (base.float() + torch.randn(n, generator=g) * 1e-3).bfloat16()
    return (tuned.float() - base.float()).abs()


@pytest.mark.parametrize("pieces", [1, 3, 17])
def test_rank_counter_over_slices_equals_rank_stats(pieces: int) -> None:
    x = _bf16_task_vector(50_000, seed=pieces)
    ranks = [1, 12_345, 25_000, 50_000]
    counter = select.RankCounter(x.numel(), ranks, torch.float32)
    sweeps = 0
    while True:
        sweeps += 1
        for piece in x.tensor_split(pieces):
            counter.observe(piece)
        if not counter.next_pass():
            break
    assert counter.result() == rank_stats(x, ranks)
    for rank, stat in zip(ranks, counter.result(), strict=True):
        assert stat.value == float(x.kthvalue(rank).values)
    assert sweeps <= 2


def test_rank_counter_one_sweep_when_the_rank_is_an_exact_high_bin() -> None:
    """Patterns with zero low bits (bf16-representable) resolve in one sweep; a rank among
    entries with low bits set takes a second sweep, and both are exact."""
    exact = torch.tensor([0.5, 0.25, 0.25, 0.75, 1.0]).repeat(100)
    counter = select.RankCounter(exact.numel(), [250], torch.float32)
    counter.observe(exact)
    assert not counter.next_pass()
    assert counter.result()[0] == RankStat(0.5, 200, 100)

    near = exact.view(torch.int32) + torch.arange(exact.numel(), dtype=torch.int32) % 3
    x = near.view(torch.float32)
    counter = select.RankCounter(x.numel(), [250], torch.float32)
    counter.observe(x)
    assert counter.next_pass()  # rank 250 falls among 0.5's neighbours with low bits set
    counter.observe(x)
    assert not counter.next_pass()
    stat = counter.result()[0]
    assert stat.value == float(x.kthvalue(250).values)
    assert stat.below == int((x < stat.value).sum()) and stat.equal == int((x == stat.value).sum())


def test_rank_counter_checks_what_it_is_fed() -> None:
    counter = select.RankCounter(10, [3], torch.float32)
    with pytest.raises(TypeError, match="float32"):
        counter.observe(torch.ones(10, dtype=torch.float64))
    counter.observe(torch.ones(9))
    with pytest.raises(ValueError, match="observed 9 values, expected 10"):
        counter.next_pass()
    with pytest.raises(RuntimeError, match="before its last sweep"):
        counter.result()
