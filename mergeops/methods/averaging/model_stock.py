"""model_stock — Model Stock (Jang et al. 2024, arXiv 2403.19522) as mergekit's
``model_stock``: θ = t·mean(θ_i) + (1 - t)·θ0, t = N·c/(1 + (N-1)·c) with c the mean pairwise
cosine of the task vectors (per tensor, or per row with ``filter_wise``). Base + ≥ 2 models.
"""

from __future__ import annotations

from typing import Any, ClassVar

from mergeops.methods._arity import require_model_count
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.stock import model_stock


class ModelStockParams(MethodParams):
    """``filter_wise``: one ratio per row (vector along the last dimension)."""

    filter_wise: bool = False


@register
class ModelStock(StreamingMethod):
    """Interpolate the models' average towards the base by the angle of their task vectors."""

    name = "model_stock"
    paper = "https://arxiv.org/abs/2403.19522"
    params_model = ModelStockParams
    needs = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, least=2)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, ModelStockParams) and inputs.base is not None
        return TensorResult(model_stock(inputs.base, inputs.models, filter_wise=params.filter_wise))
