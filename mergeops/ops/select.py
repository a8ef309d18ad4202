"""Exact order statistics of magnitudes by histograms over their bit patterns: no sort, no
``kthvalue`` copy of the whole tensor, and the values may arrive in slices.

For non-negative IEEE floats the bit pattern, read as a signed integer, orders like the value.
float32: one sweep histograms a 16-bit key per entry, ``2·high + [low ≠ 0]`` of the pattern's
high and low 16 bits — even keys count the entries whose value is exactly ``high << 16``, odd
keys the rest of that high bin, and the keys order like the values. A rank that lands on an
even key is resolved by that one sweep; only one on an odd key needs a second sweep, over the
low 16 bits of the entries in its bin. Task vectors of bf16 checkpoints (differences of values
with 8-bit significands) mostly have zero low bits, so one sweep is the rule.
bfloat16/float16 magnitudes have at most 32768 non-negative patterns: one sweep gives the
answer. Besides the value, the histograms give how many entries lie below it and how many equal
it — the counts a top-k cut or a rank window needs for its tie rule, without further passes.
Used by TIES / breadcrumbs thresholds (``ops.selection``); exact, equal to ``kthvalue``.
Paper (TIES): https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergeops import kernels
from mergeops.ops.scratch import scratch_like

BLOCK = 1 << 18
"""Entries per histogram block (1 MiB of int32 temporaries: cache-sized, bounded memory)."""

_LOW = 1 << 16
_HALF_BINS = 1 << 15
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass(frozen=True)
class RankStat:
    """The value at one ascending rank (1-based) of a tensor, with how many entries are
    strictly below it and how many equal it."""

    value: float
    below: int
    equal: int


def histogrammable(flat: torch.Tensor) -> bool:
    """Whether ``rank_stats`` takes the histogram path (CPU, contiguous, float32/bf16/f16)."""
    return flat.device.type == "cpu" and flat.dtype in _BITS and flat.is_contiguous()


def check_ranks(ranks: Sequence[int], n: int) -> None:
    """Raise ValueError unless every rank is in 1..n."""
    for rank in ranks:
        if not 1 <= rank <= n:
            raise ValueError(f"rank {rank} is outside 1..{n}")


def rank_stats(flat: torch.Tensor, ranks: Sequence[int]) -> list[RankStat]:
    """``RankStat`` of each ascending rank in ``ranks`` (1 ≤ rank ≤ n) of the non-negative
    1-D ``flat`` (magnitudes: no negative values, no -0.0, no NaN).

    Other dtypes and devices use ``kthvalue`` and two counts (same results).
    """
    check_ranks(ranks, flat.numel())
    if not histogrammable(flat):
        return [_by_kthvalue(flat, rank) for rank in ranks]
    counter = RankCounter(flat.numel(), ranks, flat.dtype)
    while True:
        counter.observe(flat)
        if not counter.next_pass():
            return counter.result()


def _by_kthvalue(flat: torch.Tensor, rank: int) -> RankStat:
    value = flat.kthvalue(rank).values
    below = int(torch.count_nonzero(flat < value))
    return RankStat(float(value), below, int(torch.count_nonzero(flat == value)))


class RankCounter:
    """``rank_stats`` of values that arrive in pieces (row slices of one tensor, any order):
    ``observe`` every piece, then ``next_pass()``; while it returns True, observe every piece
    again (once at most, for float32). ``result()`` then holds one ``RankStat`` per rank.

    The pieces must together be the ``numel`` non-negative values of dtype ``dtype`` (float32,
    bfloat16 or float16, on the CPU); ``check_ranks`` first. Memory: one 64K-bin histogram,
    plus one per high bin a second sweep resolves.
    """

    def __init__(self, numel: int, ranks: Sequence[int], dtype: torch.dtype) -> None:
        check_ranks(ranks, numel)
        self.ranks, self.numel, self.bits = list(ranks), numel, _BITS[dtype]
        self.dtype = dtype
        wide = self.bits == torch.int32
        self._keys = torch.zeros(_LOW if wide else _HALF_BINS, dtype=torch.int64)
        self._lows: dict[int, torch.Tensor] = {}  # high bin -> its low-bit counts (low > 0)
        self._sweep = 0
        self._seen = 0
        self._stats: list[RankStat | None] = [None] * len(self.ranks)

    def observe(self, values: torch.Tensor) -> None:
        """Count one piece (contiguous, non-negative, of the counter's dtype)."""
        if values.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} values, got {values.dtype}")
        bits = values.reshape(-1).view(self.bits)
        self._seen += bits.numel()
        for start in range(0, bits.numel(), BLOCK):
            block = bits[start : start + BLOCK]
            try:
                self._count(block)
            except (RuntimeError, ValueError) as error:  # negative keys refused
                raise ValueError("rank_stats needs non-negative values (magnitudes)") from error

    def observe_difference(self, model: torch.Tensor, base: torch.Tensor) -> None:
        """``observe(|model - base|)`` of two float32 pieces of one shape: on the first sweep
        the magnitudes are taken per element as they are counted (``kernels.tau_key_counts``),
        else written to scratch first."""
        if (
            self._sweep == 0
            and self.dtype == torch.float32
            and kernels.tau_key_counts(model.reshape(-1), base.reshape(-1), self._keys)
        ):
            self._seen += model.numel()
            return
        self.observe(torch.sub(model, base, out=scratch_like("rank-difference", model)).abs_())

    def _count(self, block: torch.Tensor) -> None:
        if self.bits == torch.int16:
            self._keys += torch.bincount(block, minlength=_HALF_BINS)
            return
        if self._sweep == 0 and kernels.key_counts(block, self._keys):  # ValueError if < 0
            return  # the same counts in one pass (mergeops.kernels)
        ceil, key = scratch_like("rank-ceil", block), scratch_like("rank-key", block)
        if self._sweep == 0:  # key = high + ceil(pattern / 2^16) = 2·high + [low != 0]
            torch.add(block, _LOW - 1, out=ceil).bitwise_right_shift_(16)
            torch.bitwise_right_shift(block, 16, out=key).add_(ceil)
            self._keys += torch.bincount(key, minlength=_LOW)
            return
        for high, counts in self._lows.items():  # low bits of the bin's entries, 0 elsewhere
            torch.sub(block, high << 16, out=key).clamp_(0, _LOW)
            counts += torch.bincount(key, minlength=_LOW + 1)[:_LOW]

    def next_pass(self) -> bool:
        """Finish a sweep; True when another sweep over every piece is needed."""
        if self._seen != self.numel:
            raise ValueError(f"observed {self._seen} values, expected {self.numel}")
        self._seen = 0
        self._sweep += 1
        if self._sweep == 1:
            self._resolve_keys()
        else:
            self._resolve_lows()
        return any(stat is None for stat in self._stats)

    def _resolve_keys(self) -> None:
        cum = torch.cumsum(self._keys, 0)
        for i, rank in enumerate(self.ranks):
            key = _bin_of(cum, rank)
            if self.bits == torch.int16:
                self._stats[i] = self._stat(key, _count_below(cum, key), int(self._keys[key]))
            elif key % 2 == 0:  # exactly high << 16
                self._stats[i] = self._stat((key // 2) << 16, _count_below(cum, key),
                                            int(self._keys[key]))  # fmt: skip
            else:
                self._lows.setdefault(key // 2, torch.zeros(_LOW, dtype=torch.int64))
        self._cum = cum

    def _resolve_lows(self) -> None:
        for counts in self._lows.values():
            counts[0] = 0  # everything at or below the bin's exact value: counted in ``before``
        lows = {high: torch.cumsum(counts, 0) for high, counts in self._lows.items()}
        for i, rank in enumerate(self.ranks):
            if self._stats[i] is not None:
                continue
            key = _bin_of(self._cum, rank)
            high, before = key // 2, _count_below(self._cum, key)
            low_cum = lows[high]
            low = _bin_of(low_cum, rank - before)
            below_in = _count_below(low_cum, low)
            self._stats[i] = self._stat((high << 16) | low, before + below_in,
                                        int(low_cum[low]) - below_in)  # fmt: skip

    def _stat(self, pattern: int, below: int, equal: int) -> RankStat:
        value = torch.tensor([pattern], dtype=self.bits).view(self.dtype)
        return RankStat(float(value[0]), below, equal)

    def result(self) -> list[RankStat]:
        """One ``RankStat`` per rank, once ``next_pass()`` has returned False."""
        if any(stat is None for stat in self._stats):
            raise RuntimeError("RankCounter.result() before its last sweep")
        return [stat for stat in self._stats if stat is not None]


def _bin_of(cum: torch.Tensor, rank: int) -> int:
    """The first bin whose cumulative count reaches ``rank``."""
    return int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype))[0])


def _count_below(cum: torch.Tensor, b: int) -> int:
    return int(cum[b - 1]) if b > 0 else 0
