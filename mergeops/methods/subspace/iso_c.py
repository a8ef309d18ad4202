"""iso_c — Isotropic merging in the common subspace (Marczak et al. 2025, arXiv 2502.04959).

Per 2-D weight: Σ τ_t = U S Vᵀ; θ = θ0 + alpha·U·mean(S)·Vᵀ (the spectrum flattened, so no
task's strongest directions drown the others). Other tensors: θ0 + mean τ_t.
"""

from __future__ import annotations

import torch

from mergeops.methods.base import MergeContext, register
from mergeops.methods.subspace._common import SubspaceMerge, SubspaceParams
from mergeops.ops.subspace import isotropic_merge


@register
class IsoC(SubspaceMerge):
    """θ0 + alpha·U·mean(S)·Vᵀ of the summed task vectors."""

    name = "iso_c"
    paper = "https://arxiv.org/abs/2502.04959"
    params_model = SubspaceParams

    def merge_matrix(self, taus: list[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
        return isotropic_merge(taus)
