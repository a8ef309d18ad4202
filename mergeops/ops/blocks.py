"""Fixed flat blocks over a stream of row slices, so whole-tensor reductions (norms, dot
products, energies) come out the same whether a tensor arrives whole or in slices.

A reduction such as ``vector_norm`` rounds differently with the length and position of what it
sums. Methods that need one over a whole tensor (slerp's angle, model_stock's cosines, SCE's
energies) therefore reduce each block of ``BLOCK`` consecutive elements on its own and combine
the per-block partials in order. ``FlatBlocks`` cuts any sequence of consecutive row slices into
exactly those blocks, carrying the remainder of a slice into the next one: the whole-tensor
merge (one slice) and the row-chunked merge (many) see the same blocks, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

BLOCK = 1024 * 1024
"""Elements per block (4 MiB of float32 per input): large enough that per-block partials are
few, small enough that the carry between slices stays cheap."""


class FlatBlocks:
    """Cuts consecutive slices of several same-shaped tensors into aligned flat blocks.

    ``feed`` takes one slice per tensor (the same rows of each) and yields, for every block
    completed by it, a list with one ``(1, BLOCK)`` tensor per input (views where a block lies
    inside the slice, copies where it straddles two). ``flush`` yields the last, shorter block.
    """

    def __init__(self, block: int | None = None) -> None:
        block = BLOCK if block is None else block
        if block <= 0:
            raise ValueError(f"block size must be positive, got {block}")
        self.block = block
        self._carry: list[torch.Tensor] | None = None

    def feed(self, tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """The blocks completed by this slice, in order."""
        flats = [tensor.reshape(1, -1) for tensor in tensors]
        length = flats[0].shape[1]
        start = 0
        if self._carry is not None:
            need = self.block - self._carry[0].shape[1]
            take = min(need, length)
            self._carry = [
                torch.cat([c, f[:, :take]], dim=1) for c, f in zip(self._carry, flats, strict=True)
            ]
            start = take
            if self._carry[0].shape[1] < self.block:
                return
            yield self._carry
            self._carry = None
        while length - start >= self.block:
            yield [flat[:, start : start + self.block] for flat in flats]
            start += self.block
        if start < length:
            self._carry = [flat[:, start:].clone() for flat in flats]

    def flush(self) -> Iterator[list[torch.Tensor]]:
        """The last block when the tensor's size is not a multiple of the block size."""
        if self._carry is not None:
            yield self._carry
            self._carry = None


def blocks_of(
    tensors: Sequence[torch.Tensor], block: int | None = None
) -> Iterator[list[torch.Tensor]]:
    """Every block of whole tensors (the one-slice case of ``FlatBlocks``)."""
    cutter = FlatBlocks(block)
    yield from cutter.feed(tensors)
    yield from cutter.flush()


def combine_norms(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of a whole tensor from its blocks' L2 norms (each a ``(1, 1)`` tensor)."""
    return torch.linalg.vector_norm(torch.stack(list(norms)), dim=0)


def combine_sums(sums: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum over a whole tensor from its blocks' sums, added in block order."""
    return torch.stack(list(sums)).sum(dim=0)
