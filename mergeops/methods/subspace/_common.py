"""What the subspace merges share: 2-D weights get the method's matrix merge, every other
floating tensor (biases, norms, 1-D buffers) the mean of its task vectors."""

from __future__ import annotations

from typing import ClassVar

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


class SubspaceParams(MethodParams):
    """``alpha`` scales the merged task vector of every 2-D weight."""

    alpha: float = Field(1.0, gt=0)


def is_matrix(tensor: torch.Tensor) -> bool:
    """A 2-D weight with both sides > 1 (what the subspace merges decompose)."""
    return tensor.dim() == 2 and min(tensor.shape) > 1


class SubspaceMerge(StreamingMethod):
    """θ = θ0 + alpha·merge_matrix(τ_1..τ_T) for matrices, θ0 + mean τ_t elsewhere."""

    needs = frozenset({Need.BASE})
    chunkable: ClassVar[bool] = False

    def merge_matrix(self, taus: list[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
        """The merged task vector of one 2-D weight (before ``alpha``)."""
        raise NotImplementedError

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        assert inputs.base is not None
        taus = inputs.task_vectors()
        if not is_matrix(inputs.base):
            return TensorResult(inputs.base + torch.stack(taus).mean(dim=0))
        params = ctx.params
        assert isinstance(params, SubspaceParams)
        merged = self.merge_matrix(taus, ctx).to(inputs.base.dtype)
        return TensorResult(inputs.base + params.alpha * merged)
