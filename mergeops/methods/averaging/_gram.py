"""The statistics pass shared by the spherical methods merged in row slices (nuslerp,
multislerp, karcher): one sweep that sums the inputs' float64 Gram matrix (all pairwise dot
products, ``mergeops.ops.gram``) over fixed flat blocks, so a tensor merged whole or in any
row slices gets the same matrix bit for bit. The method turns the matrix into coefficients
once per tensor; its ``merge_rows`` is then elementwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergeops.methods.base import TensorInputs, TensorStatsPass
from mergeops.ops import blocks
from mergeops.ops.blocks import FlatBlocks
from mergeops.ops.gram import block_column_gram, block_gram, combine_grams


class GramStats(TensorStatsPass):
    """One sweep: the Gram matrix of ``count`` inputs (the task vectors when the slices carry
    a base and ``task_vectors`` is set), (N, N) over whole flattened tensors, or (N, N, C) per
    column with ``columns`` = C entries per row. ``result()`` is ``finish(gram)``."""

    def __init__(
        self,
        count: int,
        finish: Callable[[torch.Tensor], Any],
        *,
        task_vectors: bool = True,
        columns: int = 0,
    ) -> None:
        self.count, self.finish = count, finish
        self.task_vectors, self.columns = task_vectors, columns
        # per column: blocks of whole rows, so every block holds whole columns' pieces
        self.cutter = FlatBlocks(columns * max(1, blocks.BLOCK // columns) if columns else None)
        self.partials: list[torch.Tensor] = []
        self.device: torch.device | None = None

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        tensors = inputs.models
        if self.task_vectors and inputs.base is not None:
            tensors = inputs.task_vectors()
        self.device = tensors[0].device
        for block in self.cutter.feed(tensors):
            self.partials.append(self._gram(block))

    def _gram(self, block: list[torch.Tensor]) -> torch.Tensor:
        if self.columns:
            return block_column_gram(block, self.columns)
        return block_gram(block)

    def next_pass(self) -> bool:
        for block in self.cutter.flush():
            self.partials.append(self._gram(block))
        return False

    def result(self) -> Any:
        shape = (self.count, self.count, *((self.columns,) if self.columns else ()))
        return self.finish(combine_grams(self.partials, shape, self.device))
