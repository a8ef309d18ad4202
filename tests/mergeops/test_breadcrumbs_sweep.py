"""Breadcrumbs' rank window under the position tie rule, found from row slices
(``ops.streamed_topk.SliceWindow`` / ``OrderedWindowCut``): the same masks and merges as the
whole-tensor window (``ops.selection.window_cut``), no whole τ_t read."""

from __future__ import annotations

import pytest
import torch

import mergeops
from mergeops.ops.selection import WindowCut, window_bounds, window_cut
from mergeops.ops.streamed_topk import OrderedWindowCut, SliceWindow
from tests.mergeops.families import tied_family


def _whole_mask(magnitude: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    cut = window_cut(magnitude.reshape(-1), lo, hi, "position")
    if cut is None:
        return torch.ones_like(magnitude, dtype=torch.bool)
    return cut.mask_rows(magnitude.reshape(-1), 0).reshape(magnitude.shape)


def _swept_mask(magnitude: torch.Tensor, lo: int, hi: int, slice_rows: int) -> torch.Tensor:
    selector = SliceWindow(magnitude.numel(), lo, hi)
    pieces = list(magnitude.split(slice_rows))
    while True:
        for piece in pieces:
            selector.observe(piece.contiguous())
        if not selector.next_pass():
            break
    cut = selector.cut()
    if cut is None:
        return torch.ones_like(magnitude, dtype=torch.bool)
    row = magnitude[0].numel()
    masks = [cut.mask_rows(p, i * slice_rows * row) for i, p in enumerate(pieces)]
    return torch.cat(masks).reshape(magnitude.shape)


@pytest.mark.parametrize(
    ("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.3, 0.3), (0.02, 0.01), (1.0, 0.2)]
)
@pytest.mark.parametrize("slice_rows", [1, 7, 64])
def test_swept_window_equals_the_whole_tensor_window(
    density: float, gamma: float, slice_rows: int
) -> None:
    """Huge tie groups (six distinct magnitudes): both cuts fall inside groups, the runs start
    and end inside slices; the mask is the whole-tensor position-rule mask."""
    gen = torch.Generator().manual_seed(int(density * 100) + slice_rows)
    magnitude = torch.randint(0, 6, (64, 300), generator=gen).float()
    lo, hi = window_bounds(magnitude.numel(), density, gamma)
    expected = _whole_mask(magnitude, lo, hi)
    assert torch.equal(_swept_mask(magnitude, lo, hi, slice_rows), expected)
    assert int(expected.sum()) == hi - lo


@pytest.mark.parametrize(("lo", "hi"), [(0, 5), (3, 6), (5, 9), (2, 12), (0, 12), (4, 4)])
def test_window_edges_one_group_and_empty(lo: int, hi: int) -> None:
    """Both cuts in one tie group (its middle run kept), a window from rank 0, the whole tensor
    (None) and an empty window (nothing kept)."""
    magnitude = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.5, 2.0], [2.0, 2.0, 3.0], [2.0, 1.0, 4.0]])
    expected = _whole_mask(magnitude, lo, hi)
    for rows in (1, 2, 4):
        assert torch.equal(_swept_mask(magnitude, lo, hi, rows), expected), rows
    assert int(expected.sum()) == hi - lo


def test_window_cut_kinds_and_slices_in_order() -> None:
    magnitude = torch.tensor([1.0, 2.0, 2.0, 3.0, 2.0, 0.5, 2.0, 2.0])
    selector = SliceWindow(magnitude.numel(), 2, 5)  # ranks 2..4: three of the five 2s, first ones
    selector.observe(magnitude)
    assert not selector.next_pass()
    cut = selector.cut()
    assert isinstance(cut, OrderedWindowCut) and cut.low == cut.high == 2.0
    kept = cut.mask_rows(magnitude, 0).nonzero().reshape(-1).tolist()
    assert kept == [1, 2, 4]  # 0.5 and 1.0 rank 0 and 1, then the 2s by position
    cut.mask_rows(magnitude[:3], 0)
    with pytest.raises(ValueError, match="expected offset 3, got 6"):
        cut.mask_rows(magnitude[6:], 6)
    empty = SliceWindow(8, 3, 3)
    assert not empty.next_pass() and isinstance(empty.cut(), WindowCut)
    assert SliceWindow(8, 0, 8).cut() is None


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_chunked_breadcrumbs_by_sweeps_equals_the_whole_merge(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked breadcrumbs under the position rule takes its windows from sweeps over the
    slices (never a whole τ_t) and equals the whole-tensor merge bit for bit."""
    from mergeops import chunking
    from mergeops.methods.task_vector.breadcrumbs import _Breadcrumbs

    base, models = tied_family(5)
    params = {"weight": [1.0, 0.7, 0.4], "density": [0.5, 0.3, 1.0], "gamma": [0.05, 0.2, 0.1]}
    whole = mergeops.merge(method, models, base=base, device="cpu", tie_break="position", **params)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the position rule must not read whole task vectors")

    monkeypatch.setattr(_Breadcrumbs, "tensor_stats", refuse)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)  # 8 slices of 8 rows
    chunked = mergeops.merge(
        method, models, base=base, device="cpu", tie_break="position", **params
    )
    assert torch.equal(whole["w"].view(torch.int16), chunked["w"].view(torch.int16))


@pytest.mark.parametrize("params", [{"tie_break": "mergekit"}, {"rescale": True}])
def test_other_rules_keep_the_whole_tensor_window(
    params: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """mergekit's tie rule and rescale need whole τ_t: those merges still take
    ``tensor_stats`` when chunked, with the unchunked result."""
    from mergeops import chunking
    from mergeops.methods.task_vector.breadcrumbs import _Breadcrumbs

    base, models = tied_family(6)
    shared = {"density": 0.4, "gamma": 0.1, **params}
    whole = mergeops.merge("breadcrumbs", models, base=base, device="cpu", **shared)
    calls: list[str] = []
    stats = _Breadcrumbs.tensor_stats

    def counted(self, key, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(key)
        return stats(self, key, *args, **kwargs)

    monkeypatch.setattr(_Breadcrumbs, "tensor_stats", counted)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    chunked = mergeops.merge("breadcrumbs", models, base=base, device="cpu", **shared)
    assert calls == ["w"]
    assert torch.equal(whole["w"].view(torch.int16), chunked["w"].view(torch.int16))
