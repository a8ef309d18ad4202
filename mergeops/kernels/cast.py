"""Wrapper of ``cast.c``: an input slice cast to float32 and checked finite in one pass.
Exported as ``mergeops.kernels.cast_checked``."""

from __future__ import annotations

import torch

from mergeops import kernels


def cast_checked(src: torch.Tensor, dst: torch.Tensor) -> bool | None:
    """``dst.copy_(src)`` for a bfloat16 or float32 ``src`` and a float32 ``dst`` (contiguous,
    CPU, same size); returns whether every value is finite, or None (nothing written) when the
    kernels are off or do not take these tensors."""
    lib = kernels.library()
    if (
        lib is None
        or src.dtype not in (torch.bfloat16, torch.float32)
        or src.device.type != "cpu"
        or not src.is_contiguous()
        or src.numel() != dst.numel()
        or not kernels.usable([], dst)
    ):
        return None
    cast = lib.ck_cast_bf16 if src.dtype == torch.bfloat16 else lib.ck_copy_f32
    return cast(src.data_ptr(), dst.data_ptr(), dst.numel()) == 0
