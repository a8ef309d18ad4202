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
    completed by it, a list with one ``(1, BLOCK)`` tensor per input: views where a block lies
    inside the slice, else the block gathered into a buffer of this cutter's own. ``flush``
    yields the last, shorter block. The buffer is reused: a gathered block is valid until the
    next ``feed`` or ``flush``.
    """

    def __init__(self, block: int | None = None) -> None:
        block = BLOCK if block is None else block
        if block <= 0:
            raise ValueError(f"block size must be positive, got {block}")
        self.block = block
        self._buffers: list[torch.Tensor] = []
        self._filled = 0  # entries of the current block gathered in the buffers

    def _gather(self, flats: Sequence[torch.Tensor], start: int, stop: int) -> None:
        if not self._buffers:
            self._buffers = [flat.new_empty((1, self.block)) for flat in flats]
        end = self._filled + stop - start
        for buffer, flat in zip(self._buffers, flats, strict=True):
            buffer[:, self._filled : end].copy_(flat[:, start:stop])
        self._filled = end

    def _gathered(self) -> list[torch.Tensor]:
        blocks = [buffer[:, : self._filled] for buffer in self._buffers]
        self._filled = 0
        return blocks

    def feed(self, tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """The blocks completed by this slice, in order."""
        flats = [tensor.reshape(1, -1) for tensor in tensors]
        length = flats[0].shape[1]
        start = 0
        if self._filled:
            start = min(self.block - self._filled, length)
            self._gather(flats, 0, start)
            if self._filled < self.block:
                return
            yield self._gathered()
        while length - start >= self.block:
            yield [flat[:, start : start + self.block] for flat in flats]
            start += self.block
        if start < length:
            self._gather(flats, start, length)

    def flush(self) -> Iterator[list[torch.Tensor]]:
        """The last block when the tensor's size is not a multiple of the block size."""
        if self._filled:
            yield self._gathered()


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
