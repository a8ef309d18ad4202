"""model_stock — Model Stock (Jang et al. 2024, arXiv 2403.19522) as mergekit's
``model_stock``: θ = t·mean(θ_i) + (1 - t)·θ0, t = N·c/(1 + (N-1)·c) with c the mean pairwise
cosine of the task vectors (per tensor, or per row with ``filter_wise``). Base + ≥ 2 models.

Large tensors merge in row slices (``SliceStatsMethod``). With one t per tensor, one sweep over
the slices reduces the task vectors' norms and pairwise dot products in fixed flat blocks
(``ops.blocks``), so the sliced and the whole-tensor merge agree bit for bit, and up to one
block (1M entries) with mergekit too. Above that they differ by mergekit's own drift: its
float32 norm of the whole tensor accumulates the squares in a few lanes and loses accuracy
with size (the results differ by ~7e-6 of the largest magnitude at 4M entries, ~2e-4 at
32M), while the blocks stay within ~1e-6 of the exact result. ``filter_wise`` needs no
statistics: its rows are whole in every slice. Inputs in another dtype than float32 (a mergekit
config's ``dtype: bfloat16``) are never sliced and keep mergekit's formula in that dtype.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mergeops.methods._arity import require_model_count
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    SliceStatsMethod,
    TensorInputs,
    TensorResult,
    TensorStatsPass,
    register,
)
from mergeops.ops import blocks
from mergeops.ops.stock import model_stock, stock_apply, stock_partials, stock_ratio_of


class ModelStockParams(MethodParams):
    """``filter_wise``: one ratio per row (vector along the last dimension)."""

    filter_wise: bool = False


class StockStats(TensorStatsPass):
    """One sweep: per flat block of ``ops.blocks.BLOCK`` entries, the norms of the task
    vectors and their pairwise dot products; result: the tensor's ratio t (shape ``(1,)``).

    The task vectors of each block are written straight into one staging buffer (a block
    that straddles two slices is filled from both), so the sweep allocates nothing per block.
    """

    def __init__(self, count: int) -> None:
        self.count, self.block, self.fill = count, blocks.BLOCK, 0
        self.stage: torch.Tensor | None = None  # (count + 1, block): δ_i rows, then products
        self.norms: list[list[torch.Tensor]] = [[] for _ in range(count)]
        self.dots: list[list[torch.Tensor]] = [[] for _ in range(count * (count - 1) // 2)]

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        assert inputs.base is not None
        base = inputs.base.reshape(1, -1)
        models = [model.reshape(1, -1) for model in inputs.models]
        start, length = 0, base.shape[1]
        while start < length:
            if self.stage is None:
                shape = (self.count + 1, self.block)
                self.stage = torch.empty(shape, dtype=base.dtype, device=base.device)
            take = min(self.block - self.fill, length - start)
            piece, into = slice(start, start + take), slice(self.fill, self.fill + take)
            for index, model in enumerate(models):
                torch.sub(model[:, piece], base[:, piece], out=self.stage[index : index + 1, into])
            start, self.fill = start + take, self.fill + take
            if self.fill == self.block:
                self._reduce()

    def _reduce(self) -> None:
        assert self.stage is not None
        rows = [self.stage[index : index + 1, : self.fill] for index in range(self.count + 1)]
        norms, dots = stock_partials(rows[:-1], rows[-1])
        for parts, value in zip([*self.norms, *self.dots], [*norms, *dots], strict=True):
            parts.append(value)
        self.fill = 0

    def next_pass(self) -> bool:
        if self.fill:
            self._reduce()
        self.stage = None
        return False

    def result(self) -> torch.Tensor:
        if not self.norms[0]:  # an empty tensor: nothing to interpolate
            return torch.zeros(1)
        return stock_ratio_of(self.norms, self.dots)


@register
class ModelStock(SliceStatsMethod):
    """Interpolate the models' average towards the base by the angle of their task vectors."""

    name = "model_stock"
    paper = "https://arxiv.org/abs/2403.19522"
    params_model = ModelStockParams
    needs = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, least=2)

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> StockStats | None:
        params = ctx.params
        assert isinstance(params, ModelStockParams)
        return None if params.filter_wise else StockStats(len(ctx.model_params))

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        assert inputs.base is not None
        if stats is None:  # filter_wise: every row has its own ratio
            return model_stock(inputs.base, inputs.models, filter_wise=True)
        return stock_apply(stats.to(inputs.base.device), inputs.base, inputs.models)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        """float32: the sliced path's blocks on one slice; other dtypes: mergekit's formula."""
        params = ctx.params
        assert isinstance(params, ModelStockParams) and inputs.base is not None
        if inputs.base.dtype == torch.float32:
            return super().merge_tensor(inputs, ctx)
        merged = model_stock(inputs.base, inputs.models, filter_wise=params.filter_wise)
        return TensorResult(merged)
