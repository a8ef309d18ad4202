"""nearswap — interpolate towards the other model only where it is close to the base, as
mergekit's ``nearswap`` (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001):
w = clamp(t / |θ0 - θ1|, 0, 1), θ = w·θ1 + (1 - w)·θ0. Elementwise, in the inputs' dtype.
"""

from __future__ import annotations

from typing import Any, ClassVar

from mergeops.methods._arity import require_model_count
from mergeops.methods.base import (
    ElementwiseMethod,
    MergeContext,
    MethodParams,
    Need,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.fusion import nearswap


class NearswapParams(MethodParams):
    """``t`` (required): the distance below which entries are taken from the other model."""

    t: float


@register
class Nearswap(ElementwiseMethod):
    """Entries within ``t`` of the base come from the other model; farther ones move t/|Δ|."""

    name = "nearswap"
    paper = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    params_model = NearswapParams
    needs = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=1)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, NearswapParams) and inputs.base is not None
        return TensorResult(nearswap(inputs.base, inputs.models[0], params.t))
