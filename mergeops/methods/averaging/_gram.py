"""The statistics pass shared by the spherical methods merged in row slices (nuslerp,
multislerp, karcher): one sweep that sums the inputs' float64 Gram matrix (all pairwise dot
products, ``mergeops.ops.gram``) in lanes (one matrix, on the CPU) or over fixed flat blocks
(other devices; blocks of whole rows for one matrix per column), so a tensor merged whole or in any row slices gets the same matrix bit for
bit. The method turns the matrix into coefficients once per tensor; its ``merge_rows`` is then
elementwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergeops.methods.base import TensorInputs, TensorStatsPass
from mergeops.ops import blocks
from mergeops.ops.blocks import FlatBlocks
from mergeops.ops.gram import LaneGram, block_column_gram, block_gram, combine_grams


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
        self.cutter = FlatBlocks(columns * max(1, blocks.BLOCK // columns)) if columns else None
        self.partials: list[torch.Tensor] = []
        self.lanes: LaneGram | None = None
        self.device: torch.device | None = None

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        base = inputs.base if self.task_vectors else None
        self.device = inputs.models[0].device
        if not self.columns and self.device.type == "cpu":  # one matrix: lane sums
            if self.lanes is None:
                self.lanes = LaneGram(self.count, self.device)
            self.lanes.observe(inputs.models, base)  # the task vectors taken per entry
            return
        if self.cutter is None:
            self.cutter = FlatBlocks()
        tensors = inputs.task_vectors() if base is not None else inputs.models
        for block in self.cutter.feed(tensors):
            self.partials.append(self._gram(block))

    def _gram(self, block: list[torch.Tensor]) -> torch.Tensor:
        if self.columns:
            return block_column_gram(block, self.columns)
        return block_gram(block)

    def next_pass(self) -> bool:
        if self.cutter is not None:
            for block in self.cutter.flush():
                self.partials.append(self._gram(block))
        return False

    def result(self) -> Any:
        if self.lanes is not None:
            return self.finish(self.lanes.gram())
        shape = (self.count, self.count, *((self.columns,) if self.columns else ()))
        return self.finish(combine_grams(self.partials, shape, self.device))
