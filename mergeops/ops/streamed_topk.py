"""Per-tensor top-k magnitude cuts found from a tensor's row slices, without the whole tensor.

``SliceTopK`` feeds each slice's magnitudes to a ``RankCounter`` (``ops.select``): one sweep
over the slices finds the exact k-th largest value and how many entries lie above and at it
(two sweeps when that value has low bits set, rare for task vectors of bf16 checkpoints). The
cut keeps entries above the threshold plus the first ``k - above`` entries equal to it in flat
order — TIES's position tie rule — and ``OrderedTieCut`` applies it to slices that arrive in
ascending order, counting the equal entries as it goes instead of listing their indices first.
Exact: the same masks as ``ops.sparsify.topk_cut`` / ``tie_cut`` on the whole tensor.
Paper (TIES): https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

import torch

from mergeops import kernels
from mergeops.ops.scratch import scratch_like
from mergeops.ops.select import RankCounter
from mergeops.ops.sparsify import TrimCut, keep_count

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
        if offset == 0:
            return self.quota
        if offset != self._next:
            raise ValueError(
                f"slices of a position-ordered cut must come in order: expected offset "
                f"{self._next}, got {offset}"
            )
        return self._left

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


class SliceTopK:
    """The cut keeping the k = max(1, ⌊density·n⌋) largest of ``numel`` non-negative float32
    magnitudes, fed slice by slice: ``observe`` each slice, ``next_pass()``; repeat while it
    returns True; then ``cut()`` (None: every entry is kept)."""

    def __init__(self, numel: int, density: float) -> None:
        self.k = keep_count(numel, density)
        self.numel = numel
        self._counter = (
            RankCounter(numel, [numel - self.k + 1], torch.float32) if self.k < numel else None
        )
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
