"""magmax — per entry, the task vector of largest magnitude (Marczak et al. 2024,
"MagMax: Leveraging Model Merging for Seamless Continual Learning", arXiv 2407.06322).

θ = θ0 + λ·τ_{argmax_t |τ_t|} entrywise. Elementwise, deterministic (the first model wins
an exact tie).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.competition import magmax


class MagMaxParams(MethodParams):
    """``lambda`` scales the selected task vector (default 1)."""

    lambda_: float = Field(1.0, alias="lambda")


@register
class MagMax(StreamingMethod):
    """θ0 + λ·(the largest-magnitude τ_t per entry)."""

    name = "magmax"
    paper = "https://arxiv.org/abs/2407.06322"
    params_model = MagMaxParams
    needs = frozenset({Need.BASE})

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        assert inputs.base is not None
        params = ctx.params
        assert isinstance(params, MagMaxParams)
        selected = magmax(torch.stack(inputs.task_vectors()))
        return TensorResult(inputs.base + params.lambda_ * selected)
