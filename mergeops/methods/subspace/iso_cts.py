"""iso_cts — Isotropic merging in common and task-specific subspaces (Marczak et al. 2025,
arXiv 2502.04959).

Per 2-D weight: the top ``common_space_fraction`` of Σ τ_t's singular directions form the
common subspace; each task adds its strongest directions outside it ((rank - common) // T
each); the stacked bases are orthogonalised and one flat spectrum (the mean of the kept
singular values) is applied; θ = θ0 + alpha·merged. Other tensors: θ0 + mean τ_t.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeops.methods.base import MergeContext, register
from mergeops.methods.subspace._common import SubspaceMerge, SubspaceParams
from mergeops.ops.subspace import isotropic_common_task_merge


class IsoCtsParams(SubspaceParams):
    """``common_space_fraction``: share of the rank given to the common subspace (0.8)."""

    common_space_fraction: float = Field(0.8, gt=0, le=1)


@register
class IsoCts(SubspaceMerge):
    """ISO-C with task-specific directions kept beside the common subspace."""

    name = "iso_cts"
    paper = "https://arxiv.org/abs/2502.04959"
    params_model = IsoCtsParams

    def merge_matrix(self, taus: list[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, IsoCtsParams)
        return isotropic_common_task_merge(taus, params.common_space_fraction)
