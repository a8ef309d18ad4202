"""Per-model selections of one whole tensor kept as bit masks (1 bit per entry), for methods
that hold one selection per model while a large tensor merges in row slices.

A breadcrumbs window (``ops.selection.WindowCut``) lists its kept ties as int64 flat indices:
8 bytes per tie, which on an embedding can be tens of MB per model, all held until the merge
pass. ``compact_window`` stores them as a packed bit mask instead (numel/8 bytes) when that is
smaller; DELLA's keep masks are packed the same way (``PackedMask``). Slices unpack only their
own bytes, so the masks, and the merges, are unchanged bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeops.ops.masks import unpack_mask
from mergeops.ops.selection import WindowCut


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """``ops.masks.pack_mask``'s bytes (MSB first, zero-padded), built from eight strided
    columns: temporaries of n/8 bytes, not of n."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    cols = flat.view(torch.uint8).view(-1, 8)
    bits = cols[:, 0] << 7
    for j in range(1, 8):
        bits |= cols[:, j] << (7 - j)
    return bits


def pack_indices(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """The packed bytes of the mask that is True at the distinct flat ``indices`` (int64)."""
    bits = torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=indices.device)
    values = (128 >> (indices & 7)).to(torch.uint8)  # distinct bits of a byte add up as OR
    return bits.index_add_(0, indices >> 3, values)


def unpack_range(bits: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """Entries ``offset:offset + count`` (flat bool) of a mask packed by ``pack_mask``."""
    first, last = offset // 8, (offset + count + 7) // 8
    flat = unpack_mask(bits[first:last], ((last - first) * 8,))
    start = offset - first * 8
    return flat[start : start + count]


@dataclass(frozen=True)
class PackedMask:
    """A bool mask over a whole tensor, packed; ``rows`` gives any slice of it."""

    bits: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor) -> PackedMask:
        return cls(pack_bool(mask))

    def rows(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        """The mask's entries for the slice ``like`` starting at flat index ``offset``."""
        return unpack_range(self.bits, offset, like.numel()).view(like.shape)


@dataclass(frozen=True)
class PackedWindow:
    """A ``WindowCut`` whose kept ties are a packed bit mask over the flat tensor."""

    low: float
    high: float
    ties: PackedMask

    def mask_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """The keep mask of a slice whose first entry has flat index ``offset``."""
        mask = (magnitude > self.low) & (magnitude < self.high)
        return mask.logical_or_(self.ties.rows(offset, mask))

    def keep_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor:
        """``mask_rows`` as 1.0 / 0.0 in ``magnitude``'s dtype."""
        return self.mask_rows(magnitude, offset).to(magnitude.dtype)


def compact_window(cut: WindowCut | None, numel: int) -> WindowCut | PackedWindow | None:
    """``cut`` with its ties packed into bits when that takes less memory than the indices."""
    if cut is None or cut.ties.numel() * 64 <= numel:
        return cut
    return PackedWindow(cut.low, cut.high, PackedMask(pack_indices(cut.ties, numel)))
