"""Wrappers of ``dare.c``: DARE's L1 sweep (keep mask packed and the L1 lane sums, in one pass
over a slice), lane sums of any float32 values, and the masked, rescaled task vector of a slice
in place. Exported as ``mergeops.kernels.dare_sweep``, ``lane_sums`` and ``dare_apply``."""

from __future__ import annotations

import torch

from mergeops import kernels


def _lanes_ok(lanes: torch.Tensor, count: int) -> bool:
    return (
        lanes.dtype == torch.float64
        and lanes.device.type == "cpu"
        and lanes.is_contiguous()
        and lanes.numel() == count
    )


def _bits_ok(bits: torch.Tensor, numel: int) -> bool:
    return (
        bits.dtype == torch.uint8
        and bits.device.type == "cpu"
        and bits.is_contiguous()
        and bits.numel() >= (numel + 7) // 8
    )


def dare_sweep(
    model: torch.Tensor,
    base: torch.Tensor,
    uniform: torch.Tensor,
    density: float,
    bits: torch.Tensor,
    lanes: torch.Tensor,
) -> bool:
    """``lanes[:8]`` += lane sums of ``|model - base|``, ``lanes[8:]`` += those of
    ``|model - base| · keep`` with keep = ``uniform < density``, and ``bits`` (uint8, from the
    slice's first entry) = keep packed; False (nothing written) when the kernels are off or do
    not take these tensors."""
    lib = kernels.library()
    if (
        lib is None
        or not kernels.usable([base, uniform], model)
        or not _lanes_ok(lanes, 16)
        or not _bits_ok(bits, model.numel())
    ):
        return False
    lib.ck_dare_sweep(model.data_ptr(), base.data_ptr(), uniform.data_ptr(), density,
                      bits.data_ptr(), lanes.data_ptr(), model.numel())  # fmt: skip
    return True


def lane_sums(values: torch.Tensor, lanes: torch.Tensor) -> bool:
    """``lanes`` (8 float64) += ``values``' entries, entry i into lane i mod 8, each lane in
    index order; False when the kernels are off or do not take these tensors."""
    lib = kernels.library()
    if lib is None or not kernels.usable([], values) or not _lanes_ok(lanes, 8):
        return False
    lib.ck_lane_sums(values.data_ptr(), lanes.data_ptr(), values.numel())
    return True


def dare_apply(model: torch.Tensor, base: torch.Tensor, bits: torch.Tensor, scale: float) -> bool:
    """``model`` = ``((model - base) · keep) · scale`` in place, keep the packed ``bits`` from
    the slice's first entry; False (nothing written) when not taken."""
    lib = kernels.library()
    if lib is None or not kernels.usable([base], model) or not _bits_ok(bits, model.numel()):
        return False
    lib.ck_dare_apply(model.data_ptr(), base.data_ptr(), bits.data_ptr(), scale, model.numel())
    return True
