"""Rank selections of magnitudes with a choice of who wins ties: top-k (TIES) and a rank
window (Model Breadcrumbs: drop the largest and the smallest).

Two tie rules:

- ``position``: the entries a *stable* sort in the selection's direction keeps (top-k: lower
  flat index first; window: by ascending (magnitude, index)). Found with ``kthvalue``, no sort.
- ``mergekit``: the entries mergekit 0.1.5 keeps — it runs an unstable ``torch.argsort`` /
  ``torch.sort`` (on float32 magnitudes on CPU) and slices it. That choice is defined only by
  the sort itself, so when a group of equal magnitudes straddles a cut we run the same sort
  algorithm (on the CPU only where it reaches the straddling positions,
  ``kernels.sort_windows``); when no group straddles, both rules agree and the fast path is
  used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mergeops import kernels
from mergeops.ops.select import rank_stats
from mergeops.ops.sparsify import TrimCut, keep_count, tie_cut, topk_stats

TieBreak = Literal["position", "mergekit"]


def sort_keys(magnitude: torch.Tensor) -> torch.Tensor:
    """Flat magnitudes as mergekit sorts them (float32 on CPU, own dtype elsewhere)."""
    flat = magnitude.reshape(-1)
    return flat.float() if flat.device.type == "cpu" else flat


def _indices(flat: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    return (flat == value).nonzero().reshape(-1)


def topk_cut_by(
    magnitude: torch.Tensor, density: float, tie_break: TieBreak, *, consume: bool = False
) -> TrimCut | None:
    """The cut keeping the k = max(1, ⌊density·n⌋) largest magnitudes (None: keep all).

    Ties at the threshold go to lower flat indices (``position``) or to the entries
    mergekit's ``argsort(descending=True)[:k]`` keeps (``mergekit``). ``consume``: a float32
    ``magnitude`` on the CPU may be sorted in place (the same order, one whole copy less).
    """
    n = magnitude.numel()
    k = keep_count(n, density)
    if k >= n:
        return None
    flat = magnitude.reshape(-1)
    threshold, above, equal = topk_stats(flat, k)
    if tie_break == "position" or above + equal == k:  # mergekit: the whole group survives
        return tie_cut(magnitude, threshold, k - above, equal)
    # mergekit keeps argsort(descending)[:k]; sorted descending, the entries equal to the
    # threshold are exactly positions [above, k) of that order (no gather over the top k).
    in_place = consume and flat.device.type == "cpu" and flat.dtype == torch.float32
    order = _sorted_at(sort_keys(flat), [(above, k)], in_place=in_place, descending=True)
    return TrimCut(threshold=threshold, ties=order[above:k].sort().values)


def topk_mask_by(values: torch.Tensor, density: float, tie_break: TieBreak) -> torch.Tensor:
    """Bool mask of the top-k magnitudes of ``values`` (see ``topk_cut_by``)."""
    magnitude = values.abs()
    cut = topk_cut_by(magnitude, density, tie_break)
    if cut is None:
        return torch.ones_like(magnitude, dtype=torch.bool)
    return cut.mask_rows(magnitude, 0)


def window_bounds(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """mergekit's breadcrumbs window of ascending ranks [lo, hi): target ⌊density·n⌋ kept,
    ⌊gamma·n⌋ largest dropped first (fewer when the target needs them)."""
    target = int(density * numel)
    top = int(gamma * numel)
    lo = max(0, numel - target - top)
    return lo, lo + target


@dataclass(frozen=True)
class WindowCut:
    """A rank window of one whole tensor, applicable to row slices of it: keep magnitudes
    strictly between ``low`` and ``high`` plus the entries at the flat indices ``ties``
    (ascending; the kept entries equal to ``low`` or ``high``)."""

    low: float
    high: float
    ties: torch.Tensor

    def mask_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """The keep mask of a slice whose first entry has flat index ``offset``."""
        mask = (magnitude > self.low) & (magnitude < self.high)
        first = int(torch.searchsorted(self.ties, offset))
        last = int(torch.searchsorted(self.ties, offset + magnitude.numel()))
        if last > first:
            mask.view(-1)[self.ties[first:last] - offset] = True
        return mask

    def keep_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """``mask_rows`` as 1.0 / 0.0 in ``magnitude``'s dtype."""
        return self.mask_rows(magnitude, offset).to(magnitude.dtype)


def window_cut(
    magnitude: torch.Tensor, lo: int, hi: int, tie_break: TieBreak, *, consume: bool = False
) -> WindowCut | None:
    """The cut keeping ascending magnitude ranks [lo, hi) (None: every entry is kept).

    ``position`` ranks equal magnitudes by flat index; ``mergekit`` as
    ``torch.sort(magnitude).indices[lo:hi]`` does (sorted only when a tie group straddles a cut).
    ``consume``: ``magnitude`` may be sorted in place on CPU (the same order, one copy less).
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    empty = torch.empty(0, dtype=torch.int64, device=flat.device)
    if hi <= lo:
        return WindowCut(low=math.inf, high=-math.inf, ties=empty)
    if lo == 0 and hi >= n:
        return None
    stats = rank_stats(flat, [lo + 1, hi])  # (value, first ascending rank, count) of each
    spans = {s.value: (s.value, s.below, s.equal) for s in stats}
    low, high = stats[0].value, stats[1].value
    straddles = any(r < cut < r + e for _, r, e in spans.values() for cut in (lo, hi))
    if tie_break == "mergekit" and straddles:
        # Sorted ascending, [lo, hi) holds the tail of low's tie group, everything strictly
        # between, and the head of high's group: the kept ties are those two runs.
        _, low_first, low_count = spans[float(low)]
        _, high_first, _ = spans[float(high)]
        windows = (
            [(lo, hi)]
            if float(low) == float(high)
            else [(lo, low_first + low_count), (high_first, hi)]
        )
        in_place = consume and flat.device.type == "cpu" and flat.dtype == torch.float32
        order = _sorted_at(sort_keys(flat), windows, in_place=in_place)
        kept = torch.cat([order[first:last] for first, last in windows])
        return WindowCut(low=float(low), high=float(high), ties=kept.sort().values)
    runs = [
        _indices(flat, value)[max(0, lo - first_rank) : max(0, hi - first_rank)]
        for value, first_rank, _ in spans.values()
    ]
    return WindowCut(low=float(low), high=float(high), ties=torch.cat(runs).sort().values)


def _sorted_at(
    keys: torch.Tensor,
    windows: list[tuple[int, int]],
    *,
    in_place: bool,
    descending: bool = False,
) -> torch.Tensor:
    """Indices whose slices ``[first:last]`` for each window are those of
    ``torch.sort(keys, descending=…).indices`` (elsewhere in no particular order): on the CPU
    by running torch's sort algorithm only where it reaches a window (``kernels.sort_windows``,
    several times faster than the whole sort), else by the whole sort. ``in_place``: ``keys``
    may be permuted (no copy)."""
    if keys.device.type == "cpu" and keys.dtype == torch.float32:
        work = keys if in_place else keys.clone()
        order = kernels.sort_windows(work.reshape(-1), windows, descending=descending)
        if order is not None:
            return order
        keys = work  # kernels off, a NaN, or restored: the same values in the same order
    return _sort_order(keys, in_place=in_place, descending=descending)


def _sort_order(keys: torch.Tensor, *, in_place: bool, descending: bool = False) -> torch.Tensor:
    """``torch.sort(keys, descending=…).indices``; ``in_place`` sorts ``keys`` itself (no
    values copy; the same permutation: the same sort runs on the same values)."""
    if not in_place:
        return torch.sort(keys, descending=descending).indices
    order = torch.empty(keys.shape, dtype=torch.int64, device=keys.device)
    torch.sort(keys, descending=descending, out=(keys, order))
    return order


def rank_window_mask(
    magnitude: torch.Tensor, lo: int, hi: int, tie_break: TieBreak
) -> torch.Tensor:
    """Bool mask of the entries whose ascending magnitude rank is in [lo, hi) (see
    ``window_cut``)."""
    cut = window_cut(magnitude, lo, hi, tie_break)
    if cut is None:
        return torch.ones_like(magnitude, dtype=torch.bool)
    return cut.mask_rows(magnitude, 0)
