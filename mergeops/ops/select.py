"""Exact order statistics of magnitudes by histograms over their bit patterns: no sort, no
``kthvalue`` copy of the whole tensor.

For non-negative IEEE floats the bit pattern, read as a signed integer, orders like the value.
float32: one blocked pass histograms the high 16 bits (32768 bins), a second pass histograms
the low 16 bits of the entries in the one bin holding the wanted rank; bfloat16/float16
magnitudes have at most 32768 non-negative patterns, so one pass gives the answer. Besides the
value, the histograms give how many entries lie below it and how many equal it — the counts a
top-k cut or a rank window needs for its tie rule, without further passes over the tensor.
Used by TIES / breadcrumbs thresholds (``ops.selection``); exact, equal to ``kthvalue``.
Paper (TIES): https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 1 << 18
"""Entries per histogram block (1 MiB of int32 temporaries: cache-sized, bounded memory)."""

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


def rank_stats(flat: torch.Tensor, ranks: Sequence[int]) -> list[RankStat]:
    """``RankStat`` of each ascending rank in ``ranks`` (1 ≤ rank ≤ n) of the non-negative
    1-D ``flat`` (magnitudes: no negative values, no -0.0, no NaN).

    Other dtypes and devices use ``kthvalue`` and two counts (same results).
    """
    n = flat.numel()
    for rank in ranks:
        if not 1 <= rank <= n:
            raise ValueError(f"rank {rank} is outside 1..{n}")
    if not histogrammable(flat):
        return [_by_kthvalue(flat, rank) for rank in ranks]
    bits = flat.view(_BITS[flat.dtype])
    if bits.dtype == torch.int16:
        cum = _cumulative(_histogram(bits, shift=0))
        return [_stat_in(cum, rank, 0, 0, bits.dtype, flat.dtype) for rank in ranks]
    high = _cumulative(_histogram(bits, shift=16))
    picks = [(rank, _bin_of(high, rank)) for rank in ranks]
    lows = {b: _cumulative(_low_histogram(bits, b)) for b in {b for _, b in picks}}
    return [
        _stat_in(lows[b], rank, _count_below(high, b), b, bits.dtype, flat.dtype)
        for rank, b in picks
    ]


def _by_kthvalue(flat: torch.Tensor, rank: int) -> RankStat:
    value = flat.kthvalue(rank).values
    below = int(torch.count_nonzero(flat < value))
    return RankStat(float(value), below, int(torch.count_nonzero(flat == value)))


def _histogram(bits: torch.Tensor, *, shift: int) -> torch.Tensor:
    """Counts of ``bits >> shift`` (non-negative patterns), blocked."""
    total = torch.zeros(_HALF_BINS, dtype=torch.int64)
    for start in range(0, bits.numel(), BLOCK):
        block = bits[start : start + BLOCK]
        try:
            total += torch.bincount(block >> shift if shift else block, minlength=_HALF_BINS)
        except RuntimeError as error:  # bincount refuses negative keys
            raise ValueError("rank_stats needs non-negative values (magnitudes)") from error
    return total


def _low_histogram(bits: torch.Tensor, high: int) -> torch.Tensor:
    """Counts of the low 16 bits of the entries whose high 16 bits are ``high``."""
    total = torch.zeros(1 << 16, dtype=torch.int64)
    lo, hi = high << 16, (high + 1) << 16
    for start in range(0, bits.numel(), BLOCK):
        block = bits[start : start + BLOCK]
        inside = block[(block >= lo) & (block < hi)]
        if inside.numel():
            total += torch.bincount(inside - lo, minlength=1 << 16)
    return total


def _cumulative(hist: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(hist, 0)


def _bin_of(cum: torch.Tensor, rank: int) -> int:
    """The first bin whose cumulative count reaches ``rank``."""
    return int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype))[0])


def _count_below(cum: torch.Tensor, b: int) -> int:
    return int(cum[b - 1]) if b > 0 else 0


def _stat_in(
    cum: torch.Tensor, rank: int, before: int, high: int, bits: torch.dtype, dtype: torch.dtype
) -> RankStat:
    """The ``RankStat`` of ``rank`` from the cumulative histogram ``cum`` of the patterns
    ``high << 16 | low`` (``high`` 0: the whole 16-bit patterns), ``before`` entries lying
    below every one of them."""
    low = _bin_of(cum, rank - before)
    below_in = _count_below(cum, low)
    pattern = torch.tensor([(high << 16) | low if high else low], dtype=bits)
    value = float(pattern.view(dtype)[0])
    return RankStat(value, before + below_in, int(cum[low]) - below_in)
