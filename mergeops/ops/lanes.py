"""Lane sums: reductions in float64 whose bits depend neither on how a tensor is cut into
slices nor on the thread count. Entry i of a tensor is added to lane i mod ``LANES``, each lane
in index order from +0; a caller combines the lanes at the end (``math.fsum``: correctly
rounded). Slices must start at multiples of ``LANES`` (row-chunked slices start at multiples
of 64 entries).

The fused kernels (``dare.c``, ``averaging.c``) give the bits of the torch reference here: a
``cumsum`` down rows of ``LANES``, which the CPU runs in order.
"""

from __future__ import annotations

import torch

from mergeops import kernels

LANES = 8
"""Lanes of ``lane_sums``: entry i of a tensor is added to lane i mod 8."""


def lane_sums(values: torch.Tensor, lanes: torch.Tensor) -> None:
    """``lanes`` (``LANES`` float64) += the flat entries of ``values``, entry i into lane
    i mod 8, each lane in index order from +0. Sums of consecutive slices (each starting at a
    multiple of 8) equal the whole tensor's, bit for bit, whatever the thread count: the fused
    kernel for float32 on the CPU, else ``lane_cumsum``."""
    flat = values.reshape(-1)
    if kernels.lane_sums(flat, lanes):
        return
    if flat.device.type == "cpu" and flat.dtype in (torch.bfloat16, torch.float16):
        # 16-bit values are exact in float32: the kernel on float32 pieces (each starting at
        # a multiple of 8), the same sums, without whole float64 temporaries
        for start in range(0, flat.numel(), _PIECE):
            piece = flat[start : start + _PIECE]
            if not kernels.lane_sums(piece.float(), lanes):
                lane_cumsum(flat[start:], lanes)
                return
        return
    lane_cumsum(flat, lanes)


_PIECE = 1 << 20
"""16-bit values converted to float32 this many at a time for the kernel."""


def lane_cumsum(values: torch.Tensor, lanes: torch.Tensor) -> None:
    """``lane_sums``'s torch reference for any floating ``values`` (on ``lanes``' device): a
    cumsum down rows of ``LANES`` continuing from ``lanes``, the last short row added lane by
    lane."""
    flat = values.reshape(-1).double()
    whole = flat.numel() - flat.numel() % LANES
    if whole:
        rows = torch.cat([lanes.view(1, LANES), flat[:whole].view(-1, LANES)])
        lanes.copy_(rows.cumsum(0)[-1])
    if whole < flat.numel():
        lanes[: flat.numel() - whole] += flat[whole:]
