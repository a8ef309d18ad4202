"""Wrapper of ``select.c``: exact order statistics of float32 values by radix selection (two
passes, no sorted copy). Exported as ``mergeops.kernels.select_ranks``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeops import kernels

_BINS = 1 << 16
_WAYS = 4  # select.c's 32-bit count tables, WAYS * BINS of them


def select_ranks(values: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor | None:
    """The values at 0-based ``ranks`` (up to 4) of the ascending order of ``values`` (1-D
    float32, contiguous, CPU), as a float32 tensor (a zero is returned as +0.0); None when the
    kernels are off, the tensor is not taken, a rank is out of range or a value is NaN."""
    lib = kernels.library()
    if (
        lib is None
        or not 0 < len(ranks) <= 4
        or values.dim() != 1
        or not kernels.usable([], values)
    ):
        return None
    wanted = torch.tensor(list(ranks), dtype=torch.int64)
    scratch = torch.empty((1 + len(ranks) + _WAYS // 2) * _BINS, dtype=torch.int64)
    out = torch.empty(len(ranks), dtype=torch.float32)
    failed = lib.ck_select_ranks(values.data_ptr(), values.numel(), wanted.data_ptr(),
                                 len(ranks), scratch.data_ptr(), out.data_ptr())  # fmt: skip
    return None if failed else out
