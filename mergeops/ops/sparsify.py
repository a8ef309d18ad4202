"""Sparsification: exact magnitude top-k (per tensor or model-wide) and DARE random drops.

Thresholds are found with ``kthvalue`` (per tensor) or an exact two-pass radix select over
float32 bit patterns (model-wide, streaming), never with a full sort. Ties at the threshold
are broken by position (lower flat index first, tensors in stream order) so that exactly k
entries survive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergeops import kernels
from mergeops.ops.scratch import scratch, scratch_like
from mergeops.ops.select import rank_stats

_BINS = 1 << 16


def keep_count(numel: int, density: float) -> int:
    """k = max(1, ⌊density·n⌋) entries survive (all of them when density >= 1)."""
    if density >= 1:
        return numel
    return max(1, math.floor(density * numel))


def _keep_first_ties(
    above: torch.Tensor, magnitude: torch.Tensor, threshold: float, ties: int
) -> torch.Tensor:
    """Set the first ``ties`` entries equal to ``threshold`` (flat order) in ``above``."""
    if ties > 0:
        # Indices of the equal entries only: no int64 cumsum over the whole tensor.
        first = (magnitude.reshape(-1) == threshold).nonzero().reshape(-1)[:ties]
        above.view(-1)[first] = True
    return above


def threshold_mask(magnitude: torch.Tensor, threshold: float, ties: int) -> torch.Tensor:
    """Entries above ``threshold`` plus the first ``ties`` entries equal to it (flat order)."""
    return _keep_first_ties(magnitude > threshold, magnitude, threshold, ties)


_SAMPLE = 1 << 16


def kth_smallest(flat: torch.Tensor, rank: int) -> torch.Tensor:
    """``flat.kthvalue(rank).values``, exactly, without a full selection on large tensors.

    A strided sample brackets the answer; only the entries inside the bracket (about 2 %)
    go through ``kthvalue``. If the bracket misses (counts disagree), falls back to the full
    ``kthvalue``, so the result is always exact.
    """
    n = flat.numel()
    if n <= 16 * _SAMPLE:
        return flat.kthvalue(rank).values
    sample = flat[:: n // _SAMPLE].contiguous()
    m = sample.numel()
    q = rank / n
    margin = 5 * math.sqrt(q * (1 - q) / m) + 4 / m
    lo = sample.kthvalue(max(1, math.floor((q - margin) * m))).values
    hi = sample.kthvalue(min(m, math.ceil((q + margin) * m))).values
    below = int(torch.count_nonzero(flat < lo))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if 1 <= rank - below <= inside.numel():
        return inside.kthvalue(rank - below).values
    return flat.kthvalue(rank).values


def topk_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k = max(1, ⌊density·n⌋) largest magnitudes of ``values``.

    Returns:
        A bool tensor shaped like ``values`` with exactly k True entries.
    """
    magnitude = values.abs()
    n = magnitude.numel()
    k = keep_count(n, density)
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    threshold = float(kth_smallest(magnitude.reshape(-1), n - k + 1))
    above = magnitude > threshold
    return _keep_first_ties(above, magnitude, threshold, k - int(torch.count_nonzero(above)))


@dataclass(frozen=True)
class TrimCut:
    """A top-k cut of one whole tensor, applicable to row slices of it: keep magnitudes above
    ``threshold`` plus the entries at the flat indices ``ties`` (ascending)."""

    threshold: float
    ties: torch.Tensor
    inclusive: bool = False
    """Keep every entry equal to ``threshold`` too (the whole tie group survives)."""

    def mask_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """The keep mask of a slice whose first entry has flat index ``offset``."""
        return self._mark_ties(
            magnitude >= self.threshold if self.inclusive else magnitude > self.threshold,
            offset,
        )

    def keep_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """``mask_rows`` as float32 1.0 / 0.0 (for floating ``magnitude``): a product with it
        is exact and several times faster than with a bool mask. A per-thread scratch tensor,
        valid until the next call."""
        keep = scratch_like("keep", magnitude)
        compare = torch.ge if self.inclusive else torch.gt
        return self._mark_ties(compare(magnitude, self.threshold, out=keep), offset)

    def trim_model(self, model: torch.Tensor, base: torch.Tensor, offset: int) -> bool:
        """``model`` (a float32 slice) becomes its trimmed τ, ``(model - base) * keep``, in one
        fused pass (``kernels.trim``; the bits of ``sub_``, ``keep_rows`` and ``mul_``); False
        (nothing written) when the kernels are off or ties are listed by index."""
        if self.ties.numel():
            return False
        return (
            kernels.trim(model, base, self.threshold, inclusive=self.inclusive, quota=0) is not None
        )

    def _mark_ties(self, mask: torch.Tensor, offset: int) -> torch.Tensor:
        lo = int(torch.searchsorted(self.ties, offset))
        hi = int(torch.searchsorted(self.ties, offset + mask.numel()))
        if hi > lo:
            mask.view(-1)[self.ties[lo:hi] - offset] = 1
        return mask


def tie_cut(magnitude: torch.Tensor, threshold: float, ties: int, equal: int = -1) -> TrimCut:
    """The cut ``threshold_mask(magnitude, threshold, ties)`` makes, as a ``TrimCut``.

    ``equal``: how many entries equal ``threshold``, when known; if all of them are kept the
    cut is ``inclusive`` and no pass looks for their indices.
    """
    if ties > 0 and ties == equal:
        return TrimCut(threshold=threshold, ties=_NO_TIES, inclusive=True)
    index = first_equal(magnitude.reshape(-1), threshold, ties)
    return TrimCut(threshold=threshold, ties=index.to(magnitude.device))


_NO_TIES = torch.empty(0, dtype=torch.int64)
_TIE_BLOCK = 1 << 20


def first_equal(flat: torch.Tensor, value: float, count: int) -> torch.Tensor:
    """Ascending flat indices of the first ``count`` entries equal to ``value`` (fewer if there
    are fewer), scanning in blocks and stopping once ``count`` are found."""
    if count <= 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    found: list[torch.Tensor] = []
    left = count
    for start in range(0, flat.numel(), _TIE_BLOCK):
        hits = (flat[start : start + _TIE_BLOCK] == value).nonzero().reshape(-1)[:left]
        found.append(hits + start)
        left -= hits.numel()
        if left == 0:
            break
    return torch.cat(found).contiguous()


def topk_stats(flat: torch.Tensor, k: int) -> tuple[float, int, int]:
    """(k-th largest value, entries above it, entries equal to it) of magnitudes ``flat``."""
    stat = rank_stats(flat, [flat.numel() - k + 1])[0]
    return stat.value, flat.numel() - stat.below - stat.equal, stat.equal


def topk_cut(magnitude: torch.Tensor, density: float) -> TrimCut | None:
    """The cut ``topk_mask`` makes on ``magnitude`` (None: every entry is kept)."""
    n = magnitude.numel()
    k = keep_count(n, density)
    if k >= n:
        return None
    threshold, above, equal = topk_stats(magnitude.reshape(-1), k)
    return tie_cut(magnitude, threshold, k - above, equal)


def magnitude_trim(values: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the top-k magnitudes of ``values`` (TIES trim)."""
    if density >= 1:
        return values
    return values * topk_mask(values, density)


def dare_drop(values: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability 1 - density and rescale survivors by 1/density."""
    keep = dare_keep(values.shape, density, generator, values.device)
    return values if keep is None else values * keep / density


def dare_keep(
    shape: tuple[int, ...] | torch.Size,
    density: float,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor | None:
    """DARE's keep mask (``rand < density``; None when density >= 1, nothing drawn). On the CPU
    the uniforms are drawn ``DRAW_BLOCK`` at a time into scratch (the generator draws in
    element order, so the mask is the same), not as one whole float32 tensor."""
    if density >= 1:
        return None
    if device.type != "cpu":
        return torch.rand(tuple(shape), generator=generator, device=device) < density
    keep = torch.empty(tuple(shape), dtype=torch.bool)
    flat = keep.view(-1)
    for start in range(0, flat.numel(), DRAW_BLOCK):
        part = flat[start : start + DRAW_BLOCK]
        uniform = scratch("dare-uniform", part.shape, torch.float32, part.device)
        torch.rand(part.shape, generator=generator, out=uniform)
        torch.lt(uniform, density, out=part)
    return keep


DRAW_BLOCK = 1 << 20
"""Uniforms drawn per call for a whole DARE mask on the CPU (4 MiB of float32 scratch)."""


def new_pass(what: str, offset: int, expected: int) -> bool:
    """For statistics applied to a tensor's row slices in ascending order: True when the slice
    at ``offset`` starts a new pass over the tensor (offset 0), False when it continues the
    previous slice (``expected``: where that one ended); ValueError otherwise."""
    if offset == 0:
        return True
    if offset != expected:
        raise ValueError(
            f"slices of {what} must come in order: expected offset {expected}, got {offset}"
        )
    return False


class DareRows:
    """DARE's keep mask of one tensor drawn a row slice at a time, in flat order, on the CPU:
    the CPU generator draws uniforms in element order, so the slices' masks are those of one
    ``dare_keep`` call, without the whole mask (nor its float32 uniforms) in memory. Slices must
    come in ascending order; offset 0 starts over with a fresh ``generator()``."""

    def __init__(self, generator: Callable[[], torch.Generator], density: float) -> None:
        self._generator, self.density = generator, density
        self._gen: torch.Generator | None = None
        self._next = 0

    def keep_rows(self, like: torch.Tensor, offset: int) -> torch.Tensor:
        """The keep mask of the slice shaped like ``like`` starting at flat index ``offset``: as
        1.0 / 0.0 in a per-thread float32 scratch tensor for float32 slices (a product with it
        is several times faster than with a bool mask, and the same), else bool."""
        if new_pass("a DARE mask", offset, self._next):
            self._gen = self._generator()
        assert self._gen is not None  # the first slice has offset 0
        self._next = offset + like.numel()
        uniform = scratch("dare-uniform", like.shape, torch.float32, like.device)
        torch.rand(like.shape, generator=self._gen, out=uniform)
        if like.dtype == torch.float32:
            return torch.lt(uniform, self.density, out=scratch_like("keep", like))
        return uniform < self.density


@dataclass(frozen=True)
class GlobalThreshold:
    """A model-wide top-k cut: keep > ``threshold``, plus ``tie_quota[key]`` ties per tensor."""

    threshold: float
    tie_quota: dict[str, int]

    def mask(self, key: str, magnitude: torch.Tensor) -> torch.Tensor:
        """The keep mask of one tensor's magnitudes."""
        return threshold_mask(magnitude, self.threshold, self.tie_quota.get(key, 0))


class RadixTopK:
    """Exact k-th largest of non-negative float32 values streamed tensor by tensor.

    Pass 1 histograms the high 16 bits of the bit patterns (monotone for x >= 0); pass 2
    resolves the low 16 bits inside the one bin holding the k-th value and counts, per tensor,
    how many entries equal it, so tie quotas can be handed out in stream order. Memory is
    two 65536-bin histograms plus small per-tensor tables, independent of model size.
    """

    def __init__(self, density: float) -> None:
        self.density = density
        self.pass_index = 0
        self.numel = 0
        self._high = torch.zeros(_BINS, dtype=torch.int64)
        self._bin = -1
        self._need_in_bin = 0
        self._low = torch.zeros(_BINS, dtype=torch.int64)
        self._per_tensor: dict[str, torch.Tensor] = {}
        self._order: list[str] = []

    def observe(self, key: str, magnitude: torch.Tensor) -> None:
        """Feed one tensor's non-negative values (call for every tensor, every pass)."""
        bits = magnitude.detach().float().reshape(-1).contiguous().view(torch.int32) & 0x7FFFFFFF
        high = (bits >> 16).to(torch.int64)
        if self.pass_index == 0:
            self.numel += bits.numel()
            self._high += torch.bincount(high, minlength=_BINS).cpu()
            return
        low = (bits[high == self._bin] & 0xFFFF).to(torch.int64)
        counts = torch.bincount(low, minlength=_BINS).cpu()
        self._low += counts
        nonzero = counts.nonzero().reshape(-1)
        if nonzero.numel():
            self._order.append(key)
            self._per_tensor[key] = torch.stack([nonzero, counts[nonzero]])

    def next_pass(self) -> bool:
        """True after pass 1 (a second sweep is needed), False when the cut is known."""
        if self.pass_index == 0:
            k = keep_count(self.numel, self.density)
            from_top = torch.flip(torch.cumsum(torch.flip(self._high, [0]), 0), [0])
            self._bin = int((from_top >= k).nonzero().max())
            above_bin = int(from_top[self._bin + 1]) if self._bin + 1 < _BINS else 0
            self._need_in_bin = k - above_bin
            self.pass_index = 1
            return True
        return False

    def result(self) -> GlobalThreshold:
        """The exact threshold and per-tensor tie quotas (after both passes)."""
        from_top = torch.flip(torch.cumsum(torch.flip(self._low, [0]), 0), [0])
        low = int((from_top >= self._need_in_bin).nonzero().max())
        above_low = int(from_top[low + 1]) if low + 1 < _BINS else 0
        ties_left = self._need_in_bin - above_low
        bits = torch.tensor([(self._bin << 16) | low], dtype=torch.int32)
        threshold = float(bits.view(torch.float32)[0])
        quota: dict[str, int] = {}
        for key in self._order:
            values, counts = self._per_tensor[key]
            equal = int(counts[values == low].sum())
            quota[key] = min(equal, ties_left)
            ties_left -= quota[key]
        return GlobalThreshold(threshold=threshold, tie_quota=quota)
