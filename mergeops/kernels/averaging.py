"""Wrappers of ``averaging.c``: elementwise averaging merges in one pass over float32 inputs
with the bits of their torch reference. Exported as ``mergeops.kernels.nearswap``."""

from __future__ import annotations

import torch

from mergeops import kernels


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor | None:
    """``ops.fusion.nearswap(base, other, t)`` as a new tensor, for t > 0; None when the
    kernels are off or do not take these tensors."""
    lib = kernels.library()
    if lib is None or not t > 0 or not kernels.usable([other], base):
        return None
    out = torch.empty_like(base)
    lib.ck_nearswap(base.data_ptr(), other.data_ptr(), t, out.data_ptr(), out.numel())
    return out
