"""magmax — per entry, the task vector of largest magnitude (Marczak et al. 2024,
"MagMax: Leveraging Model Merging for Seamless Continual Learning", arXiv 2407.06322).

θ = θ0 + λ·τ_{argmax_t |τ_t|} entrywise. Elementwise, deterministic (the first model wins
an exact tie).
"""

from __future__ import annotations

import torch

from mergeops.methods.base import MergeContext, register
from mergeops.methods.task_vector._stacked import ScaledParams, StackedTaskVectorMerge
from mergeops.ops.competition import magmax


class MagMaxParams(ScaledParams):
    """``lambda`` scales the selected task vector (default 1)."""


@register
class MagMax(StackedTaskVectorMerge):
    """θ0 + λ·(the largest-magnitude τ_t per entry)."""

    name = "magmax"
    paper = "https://arxiv.org/abs/2407.06322"
    params_model = MagMaxParams

    def combine(self, taus: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        return magmax(taus)
