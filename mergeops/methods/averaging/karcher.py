"""karcher — the Karcher (Riemannian) mean of the models' directions on the unit hypersphere,
scaled by their mean norm, as mergekit's ``karcher`` (arXiv 2603.04972).

Equal weights over the models. The method takes no base: a ``base`` given to ``merge`` is not
used, while a mergekit config's ``base_model`` is one more input (mergekit appends it to the
models when it is not listed), which the config layer passes as a model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.karcher import karcher_mean


class KarcherParams(MethodParams):
    """``max_iter`` iterations at most; stop when the tangent norm is below ``tol``."""

    max_iter: int = Field(10, ge=0)
    tol: float = 1e-5


@register
class Karcher(StreamingMethod):
    """θ = mean‖θ_i‖ · argmin_u Σ d(u, θ_i/‖θ_i‖)² on the sphere."""

    name = "karcher"
    paper = "https://arxiv.org/abs/2603.04972"
    params_model = KarcherParams
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, KarcherParams)
        tensors = inputs.models
        alphas = [1.0 / len(tensors)] * len(tensors)
        return TensorResult(karcher_mean(tensors, alphas, max_iter=params.max_iter, tol=params.tol))
