"""Two-model fusions of mergekit 0.1.5, in the inputs' dtype: nearswap (interpolate only where
the models are close) and arcee_fusion (keep the fine-tune's changes of outlying importance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|θ0 - θ1|, 1e-6), 0, 1); θ = w·θ1 + (1 - w)·θ0."""
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ1 - θ0| times the row's KL(softmax θ1 ‖ softmax θ0) (softmax over the last dim)."""
    diff = (model - base).abs()
    eps = 1e-8
    p = F.softmax(model, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartiles(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sorted values at flat indices ⌊q·(n-1)⌋ for q = 1/4, 1/2, 3/4 (no interpolation).

    Exact order statistics by ``kthvalue``; mergekit takes the same indices of a full sort
    (of a random sample of 1M values when there are more).
    """
    flat = values.reshape(-1)
    last = flat.numel() - 1
    picks = [last // 4, last // 2, (3 * last) // 4]
    q1, median, q3 = (torch.kthvalue(flat, index + 1).values for index in picks)
    return q1, median, q3


def fusion_mask(importance: torch.Tensor) -> torch.Tensor:
    """1.0 (float32) where importance >= median + 1.5·IQR, else 0."""
    q1, median, q3 = quartiles(importance)
    return (importance >= median + 1.5 * (q3 - q1)).float()


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """θ0 + (θ1 - θ0)·mask; the float32 mask promotes a lower-precision result to float32, as
    in mergekit (the caller casts to the output dtype)."""
    return base + (model - base) * fusion_mask(fusion_importance(model, base))
