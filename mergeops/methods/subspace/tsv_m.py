"""tsv_m — Task Singular Vectors: Merge (Gargiulo et al. 2025, arXiv 2412.00081).

Per 2-D weight: keep each τ_t's top k = max(1, rank // T) singular triplets, orthogonalise
the concatenated left and right singular vectors (removing interference between tasks),
reassemble with the kept singular values; θ = θ0 + alpha·merged. Other tensors: θ0 + mean τ_t.
Data-free.
"""

from __future__ import annotations

import torch

from mergeops.methods.base import MergeContext, register
from mergeops.methods.subspace._common import SubspaceMerge, SubspaceParams
from mergeops.ops.subspace import task_singular_vector_merge


@register
class TsvM(SubspaceMerge):
    """Low-rank task vectors, decorrelated by orthogonalisation, summed."""

    name = "tsv_m"
    paper = "https://arxiv.org/abs/2412.00081"
    params_model = SubspaceParams

    def merge_matrix(self, taus: list[torch.Tensor], ctx: MergeContext) -> torch.Tensor:
        return task_singular_vector_merge(taus)
