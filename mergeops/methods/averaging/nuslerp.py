"""nuslerp — slerp of two models with mergekit's ``nuslerp`` options: per-model weights
(t = w2 / (w1 + w2)), one angle per tensor or per row/column, and task vectors when a base is
given (θ = θ0 + slerp(τ1, τ2)). Computed in the inputs' dtype, as mergekit does.
"""

from __future__ import annotations

from typing import Any, ClassVar

from mergeops.methods._arity import require_model_count
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    ModelParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.spherical import nuslerp, nuslerp_t


class NuslerpParams(MethodParams):
    """``nuslerp_flatten``: one angle for the whole tensor (default); otherwise one per vector
    along the last dimension, or along the first with ``nuslerp_row_wise``."""

    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True


class NuslerpWeight(ModelParams):
    """Per-model ``weight`` (required, as in mergekit)."""

    weight: float


@register
class Nuslerp(StreamingMethod):
    """slerp(θ1, θ2; t = w2/(w1+w2)); with a base θ0 + slerp(τ1, τ2)."""

    name = "nuslerp"
    paper = "https://en.wikipedia.org/wiki/Slerp"
    params_model = NuslerpParams
    model_params_model = NuslerpWeight
    optional = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=2)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, NuslerpParams)
        t = nuslerp_t([p.weight for p in ctx.model_params])  # type: ignore[attr-defined]
        first, second = inputs.models
        options = {"row_wise": params.nuslerp_row_wise, "flatten": params.nuslerp_flatten}
        if inputs.base is None:
            return TensorResult(nuslerp(t, first, second, **options))
        base = inputs.base
        return TensorResult(base + nuslerp(t, first - base, second - base, **options))
