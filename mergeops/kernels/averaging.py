"""Wrappers of ``averaging.c``: elementwise averaging merges in one pass over float32 inputs
with the bits of their torch reference. Exported as ``mergeops.kernels.nearswap``,
``linear_combination``, ``gram_lanes`` and ``nuslerp_apply``."""

from __future__ import annotations

from collections.abc import Sequence

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


def linear_combination(
    coefficients: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``Σ c_t·x_t`` added in input order from the first product, or with ``base``
    ``Σ c_t·(x_t - base) + base``, as a new tensor; ``coefficients``: float32 on the CPU, one
    per tensor. None when the kernels are off or do not take these tensors."""
    lib = kernels.library()
    inputs = [*tensors, *([base] if base is not None else [])]
    if (
        lib is None
        or not tensors
        or coefficients.dtype != torch.float32
        or coefficients.device.type != "cpu"
        or coefficients.numel() != len(tensors)
        or not kernels.usable(inputs[1:], inputs[0])
    ):
        return None
    weights = coefficients.contiguous()
    out = torch.empty_like(tensors[0])
    lib.ck_linear_combination(
        None if base is None else base.data_ptr(),
        kernels._pointers(tensors),
        len(tensors),
        int(base is not None),
        weights.data_ptr(),
        out.data_ptr(),
        out.numel(),
    )
    return out


GRAM_MAX = 16
"""Inputs of one Gram the kernel takes (``averaging.c``)."""


def gram_lanes(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, lanes: torch.Tensor
) -> bool:
    """``lanes`` ((P, 8) float64, P = N(N+1)/2 pairs i <= j in row-major order) += the lane
    sums of the products of every pair of ``tensors`` (of ``tensors[t] - base`` with a base);
    False (nothing written) when the kernels are off or do not take these tensors."""
    lib = kernels.library()
    count = len(tensors)
    inputs = [*tensors, *([base] if base is not None else [])]
    if (
        lib is None
        or not 0 < count <= GRAM_MAX
        or not kernels.usable(inputs[1:], inputs[0])
        or lanes.dtype != torch.float64
        or lanes.device.type != "cpu"
        or not lanes.is_contiguous()
        or lanes.numel() != count * (count + 1) // 2 * 8
    ):
        return False
    lib.ck_gram_lanes(None if base is None else base.data_ptr(), kernels._pointers(tensors),
                      count, int(base is not None), lanes.data_ptr(), tensors[0].numel())  # fmt: skip
    return True


def nuslerp_apply(
    a: torch.Tensor, b: torch.Tensor, sin_a: float, sin_b: float, sin_theta: float
) -> torch.Tensor | None:
    """``(sin_a·a + sin_b·b) / sin_theta`` (float32 coefficients) as a new tensor; None when
    the kernels are off or do not take these tensors."""
    lib = kernels.library()
    if lib is None or not kernels.usable([b], a):
        return None
    out = torch.empty_like(a)
    lib.ck_nuslerp_apply(a.data_ptr(), b.data_ptr(), sin_a, sin_b, sin_theta, out.data_ptr(),
                         out.numel())  # fmt: skip
    return out
