"""multislerp — barycentric interpolation of any number of models on the hypersphere, as
mergekit's ``multislerp`` (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

With a base the task vectors are interpolated and θ0 added back. In float32 large tensors
merge in row slices: mergekit's result is a linear combination Σ b_i·x_i of the inputs whose
coefficients need only their norms and pairwise dot products (``multislerp_coefficients``),
summed in float64 over fixed blocks in one sweep (``GramStats``); the merge is then
elementwise. Other compute dtypes (a mergekit config's ``dtype: bfloat16``) merge whole
tensors with mergekit's exact arithmetic in that dtype.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mergeops.methods.averaging._gram import GramStats
from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    ModelParams,
    Need,
    SliceStatsMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.gram import linear_combination
from mergeops.ops.spherical import AntipodalError, multislerp, multislerp_coefficients


class MultislerpParams(MethodParams):
    """``normalize_weights``: divide the weights by their sum; ``eps`` guards the norms."""

    normalize_weights: bool = True
    eps: float = 1e-8


class MultislerpWeight(ModelParams):
    """Per-model ``weight`` (required, as in mergekit)."""

    weight: float


@register
class Multislerp(SliceStatsMethod):
    """Weighted spherical mean of the models' (or task vectors') directions, times their
    weighted mean norm."""

    name = "multislerp"
    paper = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    params_model = MultislerpParams
    model_params_model = MultislerpWeight
    optional = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> GramStats | None:
        if len(ctx.model_params) == 1:
            return None  # one model: passed through
        return GramStats(len(ctx.model_params), lambda gram: self._coefficients(key, gram, ctx))

    def _coefficients(self, key: str, gram: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, MultislerpParams)
        weights = _weights(ctx)
        try:
            coefficients = multislerp_coefficients(
                gram, weights, normalize_weights=params.normalize_weights, eps=params.eps
            )
        except AntipodalError:
            raise _antipodal(key, weights, ctx) from None
        return coefficients.to(device=gram.device, dtype=torch.float32)

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        if stats is None:
            return inputs.models[0]
        return linear_combination(stats, inputs.models, inputs.base)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        """float32: the Gram sweep and ``merge_rows`` on the whole tensor; other dtypes:
        mergekit's whole-tensor arithmetic in that dtype."""
        if inputs.models[0].dtype == torch.float32:
            return super().merge_tensor(inputs, ctx)
        params = ctx.params
        assert isinstance(params, MultislerpParams)
        weights = _weights(ctx)
        try:
            merged = multislerp(
                inputs.models,
                weights,
                inputs.base,
                normalize_weights=params.normalize_weights,
                eps=params.eps,
            )
        except AntipodalError:
            raise _antipodal(inputs.name, weights, ctx) from None
        return TensorResult(merged)


def _weights(ctx: MergeContext) -> list[float]:
    return [p.weight for p in ctx.model_params]  # type: ignore[attr-defined]


def _antipodal(key: str, weights: list[float], ctx: MergeContext) -> MergeError:
    return MergeError(
        f"multislerp: tensor '{key}': the weighted mean direction of models "
        f"{ctx.model_names} with weights {weights} is zero (antipodal inputs whose "
        "weights balance out); use other weights"
    )
