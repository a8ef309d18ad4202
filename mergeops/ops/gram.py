"""Gram matrices of whole tensors (all pairwise dot products, norms on the diagonal) in
float64, the same bits whether a tensor is swept whole or in row slices: on the CPU by lane
sums (``LaneGram``, ``ops.lanes``: no blocks to gather, the same on any thread count); on
other devices, and per column, over fixed flat blocks (``block_gram``, ``block_column_gram``,
``ops.blocks``).

Spherical merges (nuslerp, multislerp, karcher) only need the inputs' norms and pairwise
angles: their result is a linear combination Σ b_i·x_i whose coefficients follow from the
Gram matrix alone. Products of float32 values are exact in float64, and float64 sums over
one block lose nothing a float32 result could show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergeops import kernels
from mergeops.ops.blocks import combine_sums
from mergeops.ops.lanes import LANES, lane_cumsum

PIECE = 1 << 16
"""Entries per input converted to float64 at a time (512 KiB each): bounds the scratch and
keeps it in cache; the pieces of a block are fixed, so their sums are too."""


def _stacked(block: Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Entries ``start:stop`` of the block's flattened pieces, copied into one fresh float64
    tensor of shape (N, stop - start)."""
    first = block[0]
    out = torch.empty((len(block), stop - start), dtype=torch.float64, device=first.device)
    for target, piece in zip(out, block, strict=True):
        target.copy_(piece.reshape(-1)[start:stop])
    return out


class LaneGram:
    """The Gram matrix of ``count`` tensors that arrive in consecutive row slices (each
    starting at a multiple of ``LANES`` entries): every pair's products, taken in float64
    (exact for float32 values), summed in lanes (``ops.lanes``) and combined exactly at the
    end. One fused pass per slice for float32 on the CPU (``kernels.gram_lanes``)."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.count = count
        pairs = count * (count + 1) // 2
        self.lanes = torch.zeros((pairs, LANES), dtype=torch.float64, device=device)

    def observe(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> None:
        """Add one slice of every tensor (of ``tensor - base`` with a base)."""
        if kernels.gram_lanes(tensors, base, self.lanes):
            return
        vectors = [t if base is None else t - base for t in tensors]
        flats = [v.reshape(-1).double() for v in vectors]
        pair = 0
        for i, first in enumerate(flats):
            for second in flats[i:]:
                lane_cumsum(first * second, self.lanes[pair])
                pair += 1

    def gram(self) -> torch.Tensor:
        """(count, count) float64: each entry its lanes' correctly rounded sum."""
        sums = iter(math.fsum(row) for row in self.lanes.cpu().tolist())
        out = torch.zeros((self.count, self.count), dtype=torch.float64)
        for i in range(self.count):
            for j in range(i, self.count):
                out[i, j] = out[j, i] = next(sums)
        return out.to(self.lanes.device)


def block_gram(block: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, N) float64 dot products of one block's N pieces (each flattened): the Gram over
    fixed flat blocks on devices other than the CPU, where a lane scan would run one thread
    per lane."""
    count, length = len(block), block[0].numel()
    total = torch.zeros((count, count), dtype=torch.float64, device=block[0].device)
    for start in range(0, length, PIECE):
        stacked = _stacked(block, start, min(length, start + PIECE))
        total += stacked @ stacked.T
    return total


def block_column_gram(block: Sequence[torch.Tensor], columns: int) -> torch.Tensor:
    """(N, N, columns) float64 dot products per column of one block of whole rows of
    ``columns`` entries each (the products summed over the block's rows)."""
    count, length = len(block), block[0].numel()
    step = columns * max(1, PIECE // columns)
    out = torch.zeros((count, count, columns), dtype=torch.float64, device=block[0].device)
    for start in range(0, length, step):
        pieces = _stacked(block, start, min(length, start + step)).reshape(count, -1, columns)
        for i in range(count):
            for j in range(i, count):
                out[i, j] += (pieces[i] * pieces[j]).sum(dim=0)
    for i in range(count):
        for j in range(i):
            out[i, j] = out[j, i]
    return out


def combine_grams(
    partials: Sequence[torch.Tensor], shape: tuple[int, ...], device: torch.device | None = None
) -> torch.Tensor:
    """The whole tensor's Gram from its blocks' partial Grams, added in block order (float64
    zeros of ``shape`` on ``device`` for an empty tensor)."""
    if not partials:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    return combine_sums(partials)


def norms_of(gram: torch.Tensor) -> torch.Tensor:
    """The inputs' L2 norms: square roots of the Gram's diagonal (float64)."""
    return torch.diagonal(gram, dim1=0, dim2=1).clamp_min(0).sqrt().movedim(-1, 0)


def linear_combination(
    coefficients: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ c_i·x_i, added in input order (elementwise: a row slice gives the whole tensor's bits);
    with ``base``, Σ c_i·(x_i - base) + base. One fused pass for float32 on the CPU
    (``kernels.linear_combination``, the same bits)."""
    fused = kernels.linear_combination(coefficients, tensors, base)
    if fused is not None:
        return fused
    if base is not None:
        tensors = [tensor - base for tensor in tensors]
    result = tensors[0] * coefficients[0]
    for coefficient, tensor in zip(coefficients[1:], tensors[1:], strict=True):
        result = result + tensor * coefficient
    return result if base is None else result + base
