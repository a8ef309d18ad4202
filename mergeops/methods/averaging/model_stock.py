"""model_stock — Model Stock (Jang et al. 2024, arXiv 2403.19522) as mergekit's
``model_stock``: θ = t·mean(θ_i) + (1 - t)·θ0, t = N·c/(1 + (N-1)·c) with c the mean pairwise
cosine of the task vectors (per tensor, or per row with ``filter_wise``). Base + ≥ 2 models.

float32 tensors merge in row slices (``SliceStatsMethod``), whole ones as one slice: one sweep
sums the task vectors' float64 Gram matrix (``GramStats``, as nuslerp and multislerp do: float64
lane sums on the CPU, exact for float32 products), the cosines and their mean come from it in
float64, and t is rounded to float32 once; the merge is then one linear combination
Σ (t/N)·θ_i + (1 - t)·θ0 (``ops.gram.linear_combination``: one fused pass on the CPU). Sliced
and whole agree bit for bit. mergekit takes the norms of whole tensors in float32, whose error
grows with size (~7e-6 of the largest magnitude at 4M entries, ~2e-4 at 32M) and computes
t·mean + (1 - t)·θ0 in that order: the results agree within float32 rounding on small tensors
and are closer to the exact result on large ones. ``filter_wise`` needs no statistics: its rows
are whole in every slice. Inputs in another dtype than float32 (a mergekit config's ``dtype:
bfloat16``) are never sliced and keep mergekit's formula in that dtype, bit for bit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mergeops.methods._arity import require_model_count
from mergeops.methods.averaging._gram import GramStats
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    SliceStatsMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.gram import linear_combination
from mergeops.ops.stock import model_stock, stock_combination, stock_ratio_of_gram


class ModelStockParams(MethodParams):
    """``filter_wise``: one ratio per row (vector along the last dimension)."""

    filter_wise: bool = False


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

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> GramStats | None:
        params = ctx.params
        assert isinstance(params, ModelStockParams)
        return None if params.filter_wise else GramStats(len(ctx.model_params), stock_ratio_of_gram)

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        assert inputs.base is not None
        if stats is None:  # filter_wise: every row has its own ratio
            return model_stock(inputs.base, inputs.models, filter_wise=True)
        coefficients = stock_combination(float(stats), len(inputs.models))
        merged = linear_combination(
            coefficients.to(inputs.base.device), [*inputs.models, inputs.base]
        )
        return merged.reshape(inputs.base.shape)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        """float32: the Gram sweep and the linear combination on one slice; other dtypes:
        mergekit's formula."""
        params = ctx.params
        assert isinstance(params, ModelStockParams) and inputs.base is not None
        if inputs.base.dtype == torch.float32:
            return super().merge_tensor(inputs, ctx)
        merged = model_stock(inputs.base, inputs.models, filter_wise=params.filter_wise)
        return TensorResult(merged)
