"""ram, ramplus_tl and sce merge large tensors in row slices: sliced == whole bit for bit
(every parameter variant, bfloat16 and float32 inputs, blocks straddling slices), and a
sliced tensor of over 1M entries still gives mergekit 0.1.5's numbers."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking
from mergeops.methods.base import ElementwiseMethod, SliceStatsMethod, get_method
from mergeops.ops.sce import top_variance
from tests.mergeops.mergekit.harness import assert_close
from tests.mergeops.test_slice_stats import (
    _bits_equal,
    _family,
    _merge,
    assert_sliced_matches_whole,
)

CASES: list[tuple[str, dict[str, Any]]] = [
    ("ram", {}),
    ("ram", {"epsilon": 0.3}),
    ("ramplus_tl", {}),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5, "epsilon": 0.3}),
    ("ramplus_tl", {"r": 0.5, "alpha": 2.0, "epsilon": 0.0}),
    ("sce", {}),
    ("sce", {"select_topk": 0.5}),
    ("sce", {"select_topk": 0.013}),
    ("sce", {"select_topk": 0.0}),
    ("sce", {"select_topk": 0.5, "int8_mask": True}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sliced_merge_matches_whole(
    monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any], dtype: torch.dtype
) -> None:
    family = _family(dtype, 3)
    assert isinstance(get_method(method), (SliceStatsMethod, ElementwiseMethod))
    assert_sliced_matches_whole(monkeypatch, method, family[1:], family[0], **params)


@pytest.mark.parametrize(("n", "k_frac"), [(40_000, 0.5), (40_000, 0.01)])
def test_top_variance_breaks_ties_as_mergekit(n: int, k_frac: float) -> None:
    """Variances with many equal values straddling the cut (both of topk's CPU paths: a
    partial sort for small k, nth_element otherwise): the same positions as mergekit."""
    from mergekit.merge_methods.sce import sce_mask

    gen = torch.Generator().manual_seed(3)
    taus = torch.randint(-3, 4, (3, n), generator=gen).float()
    theirs = sce_mask(taus, k_frac, torch.float32)
    ours = top_variance(torch.var(taus, dim=0, unbiased=False), k_frac)
    assert ours.dtype == torch.bool
    assert 0 < int(ours.sum()) < n
    assert torch.equal(ours.float(), theirs)


def _large(dtype: torch.dtype, count: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1100, 1024, generator=gen)
    models = []
    for i in range(count):
        tau = torch.randn(1100, 1024, generator=gen) * 0.01
        tau[torch.rand(1100, 1024, generator=gen) < 0.3 + 0.1 * i] = 0  # unmoved entries
        models.append((base + tau).to(dtype))
    return base.to(dtype), models


CASES_LARGE = [("ram", {}), ("ramplus_tl", {"r": 0.3, "alpha": 0.5}), ("sce", {}),
               ("sce", {"select_topk": 0.5})]  # fmt: skip


@pytest.mark.parametrize(("method", "params"), CASES_LARGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_large_tensor_matches_mergekit(
    method: str, params: dict[str, Any], dtype: torch.dtype
) -> None:
    """Over 1M entries in row slices (default slice and block sizes) against mergekit computing
    in float32 (``dtype: float32``): ram and ramplus_tl exactly; sce's energies are block sums
    (mergekit: one mean), so within 1e-6 relative, or 1 bf16 ulp after the cast."""
    from mergekit.merge_methods.api import merge_tensors

    base, models = _large(dtype)
    assert chunking.rows_for(get_method(method), (1100, 1024)) == 512
    theirs = merge_tensors([base, *models], method, parameters=params, base_index=0,
                           dtype=torch.float32, out_dtype=dtype)  # fmt: skip
    ours = mergeops.merge(method, [{"w": m} for m in models], base={"w": base}, device="cpu",
                          **params)  # fmt: skip
    if method == "sce":
        assert_close(ours, {"w": theirs}, dtype)
    else:
        assert torch.equal(ours["w"], theirs)


# ---- della / breadcrumbs: per-model selections held compactly ------------------------------
DELLA_CASES: list[tuple[str, dict[str, Any]]] = [
    ("della", {"weight": [1.0, 0.8, 0.6], "density": [0.6, 0.8, 1.0], "epsilon": 0.1}),
    ("della_linear", {"weight": [1.0, 0.8, 0.6], "density": 0.7, "rescale_by": "l1"}),
    ("della_linear", {"density": 0.5, "epsilon": 0.2, "rescale_by": "keep_probability"}),
]


@pytest.mark.parametrize(("method", "params"), DELLA_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_della_keep_masks_drawn_in_row_blocks_match_whole(
    monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any], dtype: torch.dtype
) -> None:
    """Keep probabilities and draws over row slices of 4096 bytes (``DellaRows``), masks held
    packed, L1 factors from lane sums: the whole-tensor draw exactly, and no whole τ read."""

    def no_whole_tau(self: Any, index: int) -> None:
        raise AssertionError("DELLA read a whole task vector on the CPU")

    monkeypatch.setattr(chunking.ChunkedMerge, "_task_vector", no_whole_tau)
    family = _family(dtype, 3)
    whole = _merge(monkeypatch, 1 << 40, method, family, seed=3, **params)
    chunked = _merge(monkeypatch, 4096, method, family, seed=3, **params)
    _bits_equal(whole, chunked)


def test_packed_window_masks_equal_the_indexed_ones() -> None:
    from mergeops.ops.packed_cut import PackedWindow, compact_window
    from mergeops.ops.selection import window_cut

    gen = torch.Generator().manual_seed(2)
    magnitude = torch.randint(0, 6, (50, 30), generator=gen).float()  # large tie groups
    cut = window_cut(magnitude, 300, 1300, "mergekit")
    assert cut is not None and cut.ties.numel() > 1500 / 64
    packed = compact_window(cut, 1500)
    assert isinstance(packed, PackedWindow)
    for rows in (1, 3, 7, 50):  # offsets of 30 entries: not byte-aligned
        for start in range(0, 50, rows):
            part = magnitude[start : start + rows]
            assert torch.equal(packed.mask_rows(part, start * 30), cut.mask_rows(part, start * 30))
    few = window_cut(torch.arange(1500.0), 300, 1300, "mergekit")
    assert compact_window(few, 1500) is few  # no ties: the indices stay


def _quantized_family(dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Deltas on a grid of 1/8: tie groups straddle the window's cuts (mergekit's sort)."""
    family = _family(torch.float32, 3)
    base = family[0]
    out = [base] + [
        {k: base[k] + ((m[k] - base[k]) * 8).round() / 8 for k in base} for m in family[1:]
    ]
    return [{k: v.to(dtype) for k, v in m.items()} for m in out]


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_breadcrumbs_mergekit_ties_sliced_match_whole(
    monkeypatch: pytest.MonkeyPatch, rescale: bool, dtype: torch.dtype
) -> None:
    """The statistics pass sorts its own |τ| in place (without rescale): the same order as
    the whole-tensor merge's sort of a copy."""
    params = {"weight": [1.0, 0.8, 0.6], "density": 0.7, "gamma": 0.05,
              "tie_break": "mergekit", "rescale": rescale}  # fmt: skip
    family = _quantized_family(dtype)
    whole = _merge(monkeypatch, 1 << 40, "breadcrumbs", family, **params)
    chunked = _merge(monkeypatch, 4096, "breadcrumbs", family, **params)
    _bits_equal(whole, chunked)


def test_sliced_breadcrumbs_of_a_large_tensor_matches_mergekit() -> None:
    """Over 1M entries with tie groups straddling both cuts, sliced: mergekit's numbers."""
    from mergekit.merge_methods.api import merge_tensors

    gen = torch.Generator().manual_seed(6)
    base = torch.randn(1100, 1024, generator=gen)
    models = [base + (torch.randn(1100, 1024, generator=gen) * 4).round() / 256 for _ in range(2)]
    params = {"weight": 1.0, "density": 0.6, "gamma": 0.05}
    theirs = merge_tensors([base, *models], "breadcrumbs", parameters=params, base_index=0)
    ours = mergeops.merge("breadcrumbs", [{"w": m} for m in models], base={"w": base},
                          device="cpu", tie_break="mergekit", **params)  # fmt: skip
    assert torch.equal(ours["w"], theirs)
