"""multislerp — barycentric interpolation of any number of models on the hypersphere, as
mergekit's ``multislerp`` (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

With a base the task vectors are interpolated and θ0 added back. Computed in the inputs' dtype.
"""

from __future__ import annotations

from typing import Any, ClassVar

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    ModelParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.spherical import AntipodalError, multislerp


class MultislerpParams(MethodParams):
    """``normalize_weights``: divide the weights by their sum; ``eps`` guards the norms."""

    normalize_weights: bool = True
    eps: float = 1e-8


class MultislerpWeight(ModelParams):
    """Per-model ``weight`` (required, as in mergekit)."""

    weight: float


@register
class Multislerp(StreamingMethod):
    """Weighted spherical mean of the models' (or task vectors') directions, times their
    weighted mean norm."""

    name = "multislerp"
    paper = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    params_model = MultislerpParams
    model_params_model = MultislerpWeight
    optional = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, MultislerpParams)
        weights = [p.weight for p in ctx.model_params]  # type: ignore[attr-defined]
        try:
            merged = multislerp(
                inputs.models,
                weights,
                inputs.base,
                normalize_weights=params.normalize_weights,
                eps=params.eps,
            )
        except AntipodalError:
            raise MergeError(
                f"multislerp: tensor '{inputs.name}': the weighted mean direction of models "
                f"{ctx.model_names} with weights {weights} is zero (antipodal inputs whose "
                "weights balance out); use other weights"
            ) from None
        return TensorResult(merged)
