"""slerp — spherical interpolation between the base (t = 0) and one other model, as mergekit's
``slerp`` (https://en.wikipedia.org/wiki/Slerp; Shoemake 1985).

One angle per tensor over the flattened weights; linear interpolation when the tensors are
nearly (anti)parallel (|cos Ω| > 0.9995). Computed in float32 (float64 for float64 inputs) and
returned in the input dtype, as mergekit does.
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
from mergeops.ops.spherical import slerp


class SlerpParams(MethodParams):
    """``t`` (required): 0 gives the base, 1 the other model."""

    t: float


@register
class Slerp(StreamingMethod):
    """θ = [sin((1-t)Ω)·θ0 + sin(tΩ)·θ1] / sin Ω, Ω the angle between θ0 and θ1."""

    name = "slerp"
    paper = "https://dl.acm.org/doi/10.1145/325165.325242"
    params_model = SlerpParams
    needs = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=1)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, SlerpParams) and inputs.base is not None
        return TensorResult(slerp(params.t, inputs.base, inputs.models[0]))
