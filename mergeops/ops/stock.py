"""Model Stock (Jang et al. 2024, arXiv 2403.19522): interpolate between the fine-tunes' average
and the base by a ratio from the angle between their task vectors, as mergekit 0.1.5 computes
it (in the inputs' dtype).

``model_stock`` is mergekit's whole-tensor formula. For float32 tensors in row slices the ratio
comes from the task vectors' float64 Gram matrix (``stock_ratio_of_gram``, with mergekit's
cos = dot / max(|δ_i|·|δ_j|, 1e-6)), and the merge is the linear combination of
``stock_combination``'s coefficients, elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeops.ops.gram import norms_of


def _pair_cosine(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """mergekit's cosine: dot / max(|a|·|b|, 1e-6), clamped to [-1, 1]."""
    return (dot / (norm_a * norm_b).clamp(min=1e-6)).clamp(-1, 1)


def mean_pairwise_cosine(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over model pairs of cos(δ_i, δ_j) along the last dimension, with a trailing
    singleton dimension; norms' products below 1e-6 count as 1e-6."""
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1 :]:
            norms = torch.norm(first, dim=-1), torch.norm(second, dim=-1)
            cosines.append(_pair_cosine((first * second).sum(dim=-1), *norms))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def stock_ratio(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    """t = N·c / (1 + (N-1)·c); 0 (keep the base) where the denominator is below 1e-6."""
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


def stock_apply(
    ratio: torch.Tensor, base: torch.Tensor, models: Sequence[torch.Tensor]
) -> torch.Tensor:
    """t·mean(θ_i) + (1 - t)·θ0, elementwise (``ratio`` broadcasts against ``base``); in place
    on one fresh tensor, with mergekit's operations in its order."""
    merged = models[0] + models[1] if len(models) > 1 else models[0].clone()
    for model in models[2:]:
        merged.add_(model)
    return merged.div_(len(models)).mul_(ratio).add_((1 - ratio) * base)


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
    return stock_apply(ratio, base, models).reshape(shape)


def stock_ratio_of_gram(gram: torch.Tensor) -> torch.Tensor:
    """The whole tensor's t (shape ``(1,)``, float32) from its task vectors' float64 Gram
    matrix (N, N): each pair's cos = dot / max(|δ_i|·|δ_j|, 1e-6) clamped to [-1, 1] and their
    mean in float64, rounded to float32 once, then ``stock_ratio`` in float32 as mergekit."""
    gram = gram.detach().to("cpu", torch.float64)
    norms = norms_of(gram)
    count = gram.shape[0]
    cosines = [
        _pair_cosine(gram[first, second], norms[first], norms[second])
        for first in range(count)
        for second in range(first + 1, count)
    ]
    mean = torch.stack(cosines).mean().to(torch.float32)
    return stock_ratio(mean.reshape(1), count)


def stock_combination(ratio: float, count: int) -> torch.Tensor:
    """The float32 coefficients (t/N, ..., t/N, 1 - t) of the models and the base whose
    linear combination is t·mean(θ_i) + (1 - t)·θ0 (``ops.gram.linear_combination``)."""
    return torch.tensor([ratio / count] * count + [1 - ratio], dtype=torch.float32)
