"""Model Stock (Jang et al. 2024, arXiv 2403.19522): interpolate between the fine-tunes' average
and the base by a ratio from the angle between their task vectors, as mergekit 0.1.5 computes
it (in the inputs' dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mean_pairwise_cosine(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over model pairs of cos(δ_i, δ_j) along the last dimension, with a trailing
    singleton dimension; norms' products below 1e-6 count as 1e-6."""
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1 :]:
            norms = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def stock_ratio(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    """t = N·c / (1 + (N-1)·c); 0 (keep the base) where the denominator is below 1e-6."""
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def model_stock(
    base: torch.Tensor, models: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    """θ = t·mean(θ_i) + (1 - t)·θ0 with t from the mean pairwise cosine of δ_i = θ_i - θ0.

    One t for the whole tensor, or one per row (vector along the last dimension) with
    ``filter_wise``. Needs at least two models.
    """
    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
    else:
        base, models = base.reshape(-1), [m.reshape(-1) for m in models]
    ratio = stock_ratio(mean_pairwise_cosine([m - base for m in models]), len(models))
    average = sum(models[1:], models[0]) / len(models)
    return (ratio * average + (1 - ratio) * base).reshape(shape)
