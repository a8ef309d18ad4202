"""wudi — data-free merging by minimising interference in the task vectors' own row space
("Whoever Started the Interference Should End It", Cheng et al. 2025, arXiv 2503.08099).

Per 2-D weight: τ_m minimises Σ_t ‖(τ_m - τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F (the rows of τ_t stand in
for the layer's inputs), by ``steps`` Adam steps of size ``lr`` from τ_m = Σ τ_t;
θ = θ0 + alpha·τ_m. Other tensors: θ0 + mean τ_t. Deterministic; computed in float32.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeops.methods.base import MergeContext, register
from mergeops.methods.subspace._common import SubspaceMerge, SubspaceParams
from mergeops.ops.subspace import wudi_merge


class WudiParams(SubspaceParams):
    """``steps`` Adam iterations with learning rate ``lr`` per 2-D weight."""

    steps: int = Field(300, ge=0)
    lr: float = Field(1e-5, gt=0)


@register
class Wudi(SubspaceMerge):
    """Interference-minimising task vector, found by gradient descent without data."""

    name = "wudi"
    paper = "https://arxiv.org/abs/2503.08099"
    params_model = WudiParams

    def merge_matrix(self, taus: list[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, WudiParams)
        return wudi_merge(taus, steps=params.steps, lr=params.lr)
