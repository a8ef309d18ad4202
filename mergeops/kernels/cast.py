"""Wrapper of ``cast.c``: a slice cast (bfloat16/float32 inputs to float32 or bfloat16 to
bfloat16, float32 outputs to bfloat16 or float32) and checked finite in one pass. Exported as
``mergeops.kernels.cast_checked``."""

from __future__ import annotations

import torch

from mergeops import kernels


def cast_checked(src: torch.Tensor, dst: torch.Tensor) -> bool | None:
    """``dst.copy_(src)`` from bfloat16 or float32 into float32, from float32 into bfloat16
    (rounded to nearest even, as torch rounds) or bfloat16 into bfloat16, contiguous on the CPU; returns whether every
    value is finite, or None (nothing written) when the kernels are off or do not take these
    tensors. A float32 NaN becomes bfloat16's quiet NaN (torch keeps its payload's top bits)."""
    lib = kernels.library()
    pair = (src.dtype, dst.dtype)
    if (
        lib is None
        or pair not in _CASTS
        or src.device.type != "cpu"
        or dst.device.type != "cpu"
        or not src.is_contiguous()
        or not dst.is_contiguous()
        or src.numel() != dst.numel()
    ):
        return None
    cast = getattr(lib, _CASTS[pair])
    return cast(src.data_ptr(), dst.data_ptr(), dst.numel()) == 0


_CASTS = {
    (torch.bfloat16, torch.float32): "ck_cast_bf16",
    (torch.float32, torch.float32): "ck_copy_f32",
    (torch.float32, torch.bfloat16): "ck_round_bf16",
    (torch.bfloat16, torch.bfloat16): "ck_copy_bf16",
}
