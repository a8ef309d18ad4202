"""Methods of the form θ = θ0 + λ·combine(τ_1..τ_T) over the stacked task vectors of one
tensor (magmax, pcb): the subclass supplies ``combine``; ``lambda`` and the base are here."""

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
)


class ScaledParams(MethodParams):
    """``lambda`` scales the combined task vector (default 1)."""

    lambda_: float = Field(1.0, alias="lambda")


class StackedTaskVectorMerge(StreamingMethod):
    """θ0 + λ·combine(stacked τ); ``params_model`` must derive from ``ScaledParams``."""

    needs = frozenset({Need.BASE})

    def combine(self, taus: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        """The merged task vector from the stacked (T, ...) task vectors."""
        raise NotImplementedError

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        assert inputs.base is not None
        params = ctx.params
        assert isinstance(params, ScaledParams)
        merged = self.combine(torch.stack(inputs.task_vectors()), ctx)
        return TensorResult(inputs.base + params.lambda_ * merged)
