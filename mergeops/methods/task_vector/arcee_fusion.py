"""arcee_fusion — keep the fine-tune's changes where their importance is an outlier, as
mergekit's ``arcee_fusion`` (https://arcee.ai): I = |θ1 - θ0| ⊙ KL(softmax θ1 ‖ softmax θ0)
per row; θ = θ0 + (θ1 - θ0)·[I ≥ median(I) + 1.5·IQR(I)]. Base + exactly one model.

Quartiles are exact order statistics (mergekit's, for tensors up to 1M entries; above that
mergekit estimates them from a random sample, so its results there are not reproducible).
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
from mergeops.ops.fusion import arcee_fusion


class ArceeFusionParams(MethodParams):
    """No parameters."""


@register
class ArceeFusion(StreamingMethod):
    """θ0 plus the fine-tune's task vector where its KL-weighted importance is an outlier."""

    name = "arcee_fusion"
    paper = "https://arcee.ai"
    params_model = ArceeFusionParams
    needs = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=1)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        assert inputs.base is not None
        return TensorResult(arcee_fusion(inputs.base, inputs.models[0]))
