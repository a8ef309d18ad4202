"""Per-tensor magnitude cuts found from a tensor's row slices, without the whole tensor: TIES's
top-k and breadcrumbs' rank window, ties kept by position.

``SliceTopK`` and ``SliceWindow`` feed each slice's magnitudes to a ``RankCounter``
(``ops.select``): one sweep over the slices finds the exact values at the cut ranks and how
many entries lie below and at each (two sweeps when a value has low bits set, rare for task
vectors of bf16 checkpoints). Equal magnitudes rank by flat index, so a cut keeps a run of
each tie group it meets in flat order: TIES the first ``k - above`` entries equal to its
threshold, breadcrumbs the tail of its low value's group and the head of its high value's.
``OrderedTieCut`` and ``OrderedWindowCut`` apply the cuts to slices that arrive in ascending
order, counting the equal entries as they go instead of listing their indices first.
Exact: the same masks as ``ops.sparsify.topk_cut`` / ``tie_cut`` and ``ops.selection``'s
``window_cut`` (position rule) on the whole tensor.
Papers: TIES https://arxiv.org/abs/2306.01708, Model Breadcrumbs https://arxiv.org/abs/2312.06795
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergeops import kernels
from mergeops.ops.scratch import scratch_like
from mergeops.ops.select import RankCounter
from mergeops.ops.selection import WindowCut
from mergeops.ops.sparsify import TrimCut, keep_count, new_pass

_NO_TIES = torch.empty(0, dtype=torch.int64)


class OrderedTieCut:
    """Keep magnitudes above ``threshold`` plus the first ``quota`` entries equal to it (flat
    order); ``mask_rows`` must see a tensor's slices in ascending order from offset 0 (a new
    offset 0 starts over)."""

    def __init__(self, threshold: float, quota: int) -> None:
        self.threshold, self.quota = threshold, quota
        self._next, self._left = 0, quota

    def mask_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """The keep mask of a slice whose first entry has flat index ``offset`` (bool)."""
        return self.keep_rows(magnitude, offset) > 0

    def _left_at(self, offset: int) -> int:
        """The tie quota left at a slice starting at ``offset``: what the previous slice left,
        or the whole quota at offset 0 (a new pass over the tensor)."""
        return self.quota if new_pass("a position-ordered cut", offset, self._next) else self._left

    def trim_model(self, model: torch.Tensor, base: torch.Tensor, offset: int) -> bool:
        """``model`` (a float32 slice) becomes its trimmed τ, ``(model - base) * keep``, in one
        fused pass that counts the ties as it goes (``kernels.trim``; the bits of ``sub_``,
        ``keep_rows`` and ``mul_``); False (nothing written) when the kernels are off."""
        left = kernels.trim(model, base, self.threshold, inclusive=False,
                            quota=self._left_at(offset))  # fmt: skip
        if left is None:
            return False
        self._next, self._left = offset + model.numel(), left
        return True

    def keep_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """The keep mask as float32 1.0 / 0.0 (a product with it is exact and several times
        faster than with a bool mask); a per-thread scratch tensor, valid until the next call."""
        self._left = self._left_at(offset)
        self._next = offset + magnitude.numel()
        keep = torch.gt(magnitude, self.threshold, out=scratch_like("keep", magnitude))
        if self._left > 0:
            equal = torch.eq(magnitude, self.threshold, out=scratch_like("equal", magnitude))
            count = int(equal.sum())  # exact: a slice has far fewer than 2^24 entries
            if count <= self._left:
                keep.add_(equal)  # disjoint from the entries above
            else:
                _keep_first(keep.view(-1), equal.view(-1), self._left)
            self._left -= min(count, self._left)
        return keep


_RUN = 16384
"""Entries per run when looking for where a slice's tie quota runs out."""


def _keep_first(keep: torch.Tensor, equal: torch.Tensor, quota: int) -> None:
    """Mark the first ``quota`` entries of ``equal`` (1.0 / 0.0) in ``keep`` (flat views): the
    runs before the one where the quota runs out whole, then the first ties of that run —
    one count per run and ``nonzero`` of one run, not of the whole slice."""
    whole = equal.numel() - equal.numel() % _RUN
    counts = equal[:whole].view(-1, _RUN).sum(1)  # exact integers in float32
    if whole < equal.numel():
        counts = torch.cat([counts, equal[whole:].sum().reshape(1)])
    run = int(torch.searchsorted(torch.cumsum(counts, 0), float(quota)))  # first cum >= quota
    start = run * _RUN
    keep[:start].add_(equal[:start])
    left = quota - int(counts[:run].sum())
    first = equal[start : start + _RUN].nonzero().reshape(-1)[:left]
    keep[start + first] = 1.0


class _SliceRanks:
    """Rank statistics of ``numel`` non-negative float32 magnitudes fed slice by slice (no
    counter: nothing to find): ``observe`` each slice, ``next_pass()``; repeat while it
    returns True."""

    def __init__(self, numel: int, ranks: list[int] | None) -> None:
        self.numel = numel
        self._counter = None if ranks is None else RankCounter(numel, ranks, torch.float32)
        self.done = self._counter is None

    def observe(self, magnitude: torch.Tensor) -> None:
        """Count one slice's magnitudes (skipped once the cut is known)."""
        if not self.done:
            assert self._counter is not None
            self._counter.observe(magnitude)

    def observe_difference(self, model: torch.Tensor, base: torch.Tensor) -> None:
        """``observe(|model - base|)`` of float32 slices, the magnitudes taken per element
        where the counter can (``RankCounter.observe_difference``)."""
        if not self.done:
            assert self._counter is not None
            self._counter.observe_difference(model, base)

    def next_pass(self) -> bool:
        """Finish a sweep; True when another sweep over every slice is needed."""
        if self.done:
            return False
        assert self._counter is not None
        self.done = not self._counter.next_pass()
        return not self.done


class SliceTopK(_SliceRanks):
    """The cut keeping the k = max(1, ⌊density·n⌋) largest of ``numel`` non-negative float32
    magnitudes, fed slice by slice; then ``cut()`` (None: every entry is kept)."""

    def __init__(self, numel: int, density: float) -> None:
        self.k = keep_count(numel, density)
        super().__init__(numel, [numel - self.k + 1] if self.k < numel else None)

    def cut(self) -> TrimCut | OrderedTieCut | None:
        """The finished cut: the whole tie group kept (``TrimCut`` inclusive) or part of it."""
        if self._counter is None:
            return None
        stat = self._counter.result()[0]
        above = self.numel - stat.below - stat.equal
        ties = self.k - above
        if ties == stat.equal:
            return TrimCut(threshold=stat.value, ties=_NO_TIES, inclusive=True)
        return OrderedTieCut(stat.value, ties)


class SliceWindow(_SliceRanks):
    """The cut keeping ascending magnitude ranks [lo, hi) of ``numel`` non-negative float32
    magnitudes, ties ranked by flat index, fed slice by slice; then ``cut()`` (None: every
    entry is kept)."""

    def __init__(self, numel: int, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        trivial = hi <= lo or (lo == 0 and hi >= numel)
        super().__init__(numel, None if trivial else [lo + 1, hi])

    def cut(self) -> OrderedWindowCut | WindowCut | None:
        """The finished window (``WindowCut`` keeping nothing for an empty one)."""
        if self._counter is None:
            if self.hi <= self.lo:
                return WindowCut(low=math.inf, high=-math.inf, ties=_NO_TIES)
            return None
        low, high = self._counter.result()
        skip = self.lo - low.below  # the low group's entries ranked below lo
        if low.value == high.value:
            return OrderedWindowCut(
                low.value, high.value, (TieRun(low.value, skip, self.hi - self.lo),)
            )
        return OrderedWindowCut(
            low.value,
            high.value,
            (
                TieRun(low.value, skip, low.equal - skip),
                TieRun(high.value, 0, self.hi - high.below),
            ),
        )


@dataclass(frozen=True)
class TieRun:
    """Of the entries equal to ``value`` in flat order, skip ``skip`` and keep the next ``keep``."""

    value: float
    skip: int
    keep: int


class OrderedWindowCut:
    """Keep magnitudes strictly between ``low`` and ``high`` plus, of each tie group in
    ``runs``, its run in flat order; ``mask_rows`` must see a tensor's slices in ascending
    order from offset 0 (a new offset 0 starts over)."""

    def __init__(self, low: float, high: float, runs: tuple[TieRun, ...]) -> None:
        self.low, self.high, self.runs = low, high, runs
        self._next = 0
        self._seen = [0] * len(runs)  # entries of each group met in earlier slices

    def mask_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """The keep mask of a slice whose first entry has flat index ``offset`` (bool)."""
        return self.keep_rows(magnitude, offset) > 0

    def _seen_at(self, offset: int) -> list[int]:
        """Each group's entries met before a slice starting at ``offset``: what the previous
        slices met, or none at offset 0 (a new pass over the tensor)."""
        if new_pass("a position-ordered window", offset, self._next):
            return [0] * len(self.runs)
        return self._seen

    def trim_model(self, model: torch.Tensor, base: torch.Tensor, offset: int) -> bool:
        """``model`` (a float32 slice) becomes its windowed τ, ``(model - base) * keep``, in
        one fused pass that counts the ties as it goes (``kernels.window_trim``; the bits of
        ``sub_``, ``keep_rows`` and ``mul_``); False (nothing written) when the kernels are off."""
        runs = [(run.value, run.skip, run.skip + run.keep) for run in self.runs]
        seen = kernels.window_trim(model, base, self.low, self.high, runs, self._seen_at(offset))
        if seen is None:
            return False
        self._next, self._seen = offset + model.numel(), seen
        return True

    def keep_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """The keep mask as float32 1.0 / 0.0 in a per-thread scratch tensor, valid until the
        next call."""
        self._seen = list(self._seen_at(offset))
        self._next = offset + magnitude.numel()
        keep = torch.gt(magnitude, self.low, out=scratch_like("keep", magnitude))
        below = torch.lt(magnitude, self.high, out=scratch_like("below", magnitude))
        keep.mul_(below)
        for i, run in enumerate(self.runs):
            seen = self._seen[i]
            if seen >= run.skip + run.keep:
                continue  # this group's run is behind us
            equal = torch.eq(magnitude, run.value, out=scratch_like("equal", magnitude))
            count = int(equal.sum())  # exact: a slice has far fewer than 2^24 entries
            self._seen[i] = seen + count
            if seen >= run.skip and seen + count <= run.skip + run.keep:
                keep.add_(equal)  # the whole group's part here is in the run
            elif seen + count > run.skip:  # the run starts or ends inside this slice
                _keep_run(
                    keep.view(-1), equal.view(-1), run.skip - seen, run.skip + run.keep - seen
                )
        return keep


def _keep_run(keep: torch.Tensor, equal: torch.Tensor, first: int, last: int) -> None:
    """Mark in ``keep`` the entries of ``equal`` (1.0 / 0.0, flat views) whose ordinal among the
    equal entries of this slice (0-based) lies in [first, last)."""
    ordinal = torch.cumsum(equal, 0)  # 1-based ordinals at the equal entries; exact integers
    inside = (ordinal > first) & (ordinal <= last)
    keep.add_(equal * inside)
