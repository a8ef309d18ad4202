"""pcb — Parameter Competition Balancing (Du et al. 2024, arXiv 2410.02396).

Per tensor: intra-balance exp(T·minmax(|τ_t|)²) weighs a parameter within its own task,
inter-balance tanh(τ_t ⊙ Σ_j τ_j) by its agreement with the others; their product β_t keeps
its top ``pcb_ratio`` share and is min-max rescaled (the rest drop to 0);
θ = θ0 + λ·Σ β_t τ_t / Σ β_t. Our reading of the paper's formulas: softmax-free min-max
normalisation per tensor and model, no outlier clipping of τ.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeops.methods.base import MergeContext, register
from mergeops.methods.task_vector._stacked import ScaledParams, StackedTaskVectorMerge
from mergeops.ops.competition import pcb_merge


class PcbParams(ScaledParams):
    """``pcb_ratio``: share of each β_t kept (0.1); ``lambda`` scales the merged vector."""

    pcb_ratio: float = Field(0.1, gt=0, le=1)


@register
class Pcb(StackedTaskVectorMerge):
    """θ0 + λ·(β-weighted mean of the task vectors)."""

    name = "pcb"
    paper = "https://arxiv.org/abs/2410.02396"
    params_model = PcbParams

    def combine(self, taus: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, PcbParams)
        return pcb_merge(taus, params.pcb_ratio)
