"""Sparsification: exact magnitude top-k (per tensor or model-wide) and DARE random drops.

Thresholds are found with ``kthvalue`` (per tensor) or an exact two-pass radix select over
float32 bit patterns (model-wide, streaming), never with a full sort. Ties at the threshold
are broken by position (lower flat index first, tensors in stream order) so that exactly k
entries survive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_BINS = 1 << 16


def keep_count(numel: int, density: float) -> int:
    """k = max(1, ⌊density·n⌋) entries survive (all of them when density >= 1)."""
    if density >= 1:
        return numel
    return max(1, math.floor(density * numel))


def threshold_mask(magnitude: torch.Tensor, threshold: float, ties: int) -> torch.Tensor:
    """Entries above ``threshold`` plus the first ``ties`` entries equal to it (flat order)."""
    above = magnitude > threshold
    equal = magnitude == threshold
    if ties <= 0:
        return above
    rank = torch.cumsum(equal.reshape(-1).to(torch.int64), dim=0).reshape(magnitude.shape)
    return above | (equal & (rank <= ties))


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
    flat = magnitude.reshape(-1)
    threshold = flat.kthvalue(n - k + 1).values
    n_above = int((flat > threshold).sum())
    return threshold_mask(magnitude, float(threshold), k - n_above)


def magnitude_trim(values: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the top-k magnitudes of ``values`` (TIES trim)."""
    if density >= 1:
        return values
    return values * topk_mask(values, density)


def dare_drop(values: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability 1 - density and rescale survivors by 1/density."""
    if density >= 1:
        return values
    keep = torch.rand(values.shape, generator=generator, device=values.device) < density
    return values * keep / density


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
