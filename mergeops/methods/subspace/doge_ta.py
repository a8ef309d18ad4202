"""doge_ta — merging as adaptive projective gradient descent, on task arithmetic (Wei et al.
2025, "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent",
arXiv 2501.01230).

Per 2-D weight: adaptive coefficients λ_i = ``lambda``·mean‖τ‖/‖τ_i‖; each τ_i keeps its top
``density`` magnitudes; one shared correction δ is learnt by Adam (``steps``, ``lr``) on the
data-free loss Σ_j ‖rowsum(τ_j ⊙ (τ_j - Σ_i λ_i(τ_i + δ)))‖², its gradient projected off the
subspace the task vectors share (``subspace_rank`` of the rank); θ = θ0 + alpha·Σ_i λ_i(τ_i + δ).
Other tensors: θ0 + mean τ_t. Our reading of the paper: the norm-equalising form of λ_i and
the top-k masks follow METHODS.md; the paper tunes its constants per benchmark.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeops.methods.base import MergeContext, register
from mergeops.methods.subspace._common import SubspaceMerge, SubspaceParams
from mergeops.ops.subspace import doge_merge


class DogeParams(SubspaceParams):
    """``lambda`` (0.3) per-task scale after norm equalisation; ``density`` (0.3) of each τ
    kept; ``subspace_rank`` (0.05) share of the rank treated as shared; ``steps``/``lr``."""

    lambda_: float = Field(0.3, gt=0, alias="lambda")
    density: float = Field(0.3, gt=0, le=1)
    subspace_rank: float = Field(0.05, gt=0, le=1)
    steps: int = Field(100, ge=0)
    lr: float = Field(1e-4, gt=0)


@register
class DogeTa(SubspaceMerge):
    """Task arithmetic with a learnt shared correction projected off the shared subspace."""

    name = "doge_ta"
    paper = "https://arxiv.org/abs/2501.01230"
    params_model = DogeParams

    def merge_matrix(self, taus: list[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, DogeParams)
        return doge_merge(
            taus,
            scale=params.lambda_,
            density=params.density,
            subspace_rank=params.subspace_rank,
            steps=params.steps,
            lr=params.lr,
        )
