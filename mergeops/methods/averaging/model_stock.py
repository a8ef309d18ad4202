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
from mergeops.ops.blocks import FlatBlocks
from mergeops.ops.stock import model_stock, stock_apply, stock_partials, stock_ratio_of


class ModelStockParams(MethodParams):
    """``filter_wise``: one ratio per row (vector along the last dimension)."""

    filter_wise: bool = False


class StockStats(TensorStatsPass):
    """One sweep: per flat block, the norms of the task vectors and their pairwise dot
    products; result: the tensor's ratio t (shape ``(1,)``)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.blocks = FlatBlocks()
        self.norms: list[list[torch.Tensor]] = [[] for _ in range(count)]
        self.dots: list[list[torch.Tensor]] = [[] for _ in range(count * (count - 1) // 2)]
        self.scratch: torch.Tensor | None = None

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        assert inputs.base is not None
        for block in self.blocks.feed([inputs.base, *inputs.models]):
            self._block(block)

    def _block(self, block: list[torch.Tensor]) -> None:
        base = block[0]
        if self.scratch is None:  # one (models + 1) x block buffer for the whole sweep
            shape = (self.count + 1, self.blocks.block)
            self.scratch = torch.empty(shape, dtype=base.dtype, device=base.device)
        norms, dots = stock_partials(base, block[1:], self.scratch)
        for parts, value in zip([*self.norms, *self.dots], [*norms, *dots], strict=True):
            parts.append(value)

    def next_pass(self) -> bool:
        for block in self.blocks.flush():
            self._block(block)
        self.scratch = None
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
