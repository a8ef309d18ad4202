"""dare_linear / dare_ties — random drop-and-rescale of task vectors, then task arithmetic or
TIES sign consensus (Yu et al. 2024). Drops are seeded per (seed, tensor, model)."""

from __future__ import annotations

import torch

from mergeops.methods.base import MergeContext, register
from mergeops.methods.task_arithmetic import (
    SparseModelParams,
    TaskArithmeticParams,
    TaskVectorMerge,
)
from mergeops.ops.sparsify import dare_drop


class _Dare(TaskVectorMerge):
    paper = "https://arxiv.org/abs/2311.03099"
    params_model = TaskArithmeticParams
    model_params_model = SparseModelParams
    sparsification = "random"

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        density = ctx.model_params[index].density  # type: ignore[attr-defined]
        return dare_drop(tau, density, ctx.generator(key, index))


@register
class DareLinear(_Dare):
    """θ0 + λ Σ w_t DARE(τ_t)."""

    name = "dare_linear"


@register
class DareTies(_Dare):
    """θ0 + λ·disjoint_merge(w_t DARE(τ_t))."""

    name = "dare_ties"
    consensus = True
