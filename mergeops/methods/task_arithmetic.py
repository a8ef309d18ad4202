"""task_arithmetic — θ0 + λ·Σ w_t τ_t — and the task-vector family built on it.

``TaskVectorMerge`` is one algorithm with switches (sparsification, sign consensus), so ties,
dare_linear and dare_ties are subclasses that only set them (as in mergekit).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

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
from mergeops.ops.basic import disjoint_merge, task_arithmetic


class TaskArithmeticParams(MethodParams):
    """``lambda`` scales the merged task vector; ``normalize`` divides by Σ w_t."""

    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False


class TaskWeightParams(ModelParams):
    """Per-model ``weight`` w_t (default 1)."""

    weight: float = 1.0


class SparseModelParams(ModelParams):
    """Per-model ``weight`` w_t and ``density`` in (0, 1] (fraction of τ_t kept)."""

    weight: float = 1.0
    density: float = Field(0.2, gt=0, le=1)


class TaskVectorMerge(StreamingMethod):
    """Sparsify each τ_t, weight it, then sum (or sign-consensus merge), scale, add to θ0."""

    needs = frozenset({Need.BASE})
    sparsification: ClassVar[Literal["none", "magnitude", "random"]] = "none"
    consensus: ClassVar[bool] = False

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        """τ_t after this method's sparsification (identity here)."""
        return tau

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, TaskArithmeticParams)
        assert inputs.base is not None
        weights = [p.weight for p in ctx.model_params]  # type: ignore[attr-defined]
        taus = [
            self.sparsify(tau, inputs.name, i, ctx) for i, tau in enumerate(inputs.task_vectors())
        ]
        if not self.consensus:
            merged = task_arithmetic(
                inputs.base, taus, weights, scale=params.lambda_, normalize=params.normalize
            )
            return TensorResult(merged)
        deltas = torch.stack([w * tau for w, tau in zip(weights, taus, strict=True)])
        delta = disjoint_merge(deltas, weights, normalize=params.normalize)
        return TensorResult(inputs.base + params.lambda_ * delta)


@register
class TaskArithmetic(TaskVectorMerge):
    """θ = θ0 + λ Σ w_t τ_t (Ilharco et al. 2023)."""

    name = "task_arithmetic"
    paper = "https://arxiv.org/abs/2212.04089"
    params_model = TaskArithmeticParams
    model_params_model = TaskWeightParams
