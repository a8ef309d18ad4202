"""Model Stock (Jang et al. 2024, arXiv 2403.19522): interpolate between the fine-tunes' average
and the base by a ratio from the angle between their task vectors, as mergekit 0.1.5 computes
it (in the inputs' dtype).

``model_stock`` is mergekit's whole-tensor formula. For row slices, the whole-tensor ratio comes
from reductions: ``stock_partials`` gives one flat block's task-vector norms and pairwise dot
products, ``stock_ratio_of`` combines the blocks' partials in order (``ops.blocks``) and applies
mergekit's cos = dot / max(|δ_i|·|δ_j|, 1e-6); ``stock_apply`` is then elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeops.ops.blocks import combine_norms, combine_sums


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


def stock_partials(
    offsets: Sequence[torch.Tensor], product: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One ``(1, n)`` block's partials: the norm of every task vector δ_i in ``offsets`` and
    the dot product of every pair i < j (in ``itertools.combinations`` order), each a
    ``(1, 1)`` tensor. ``product`` (``(1, n)``) takes the pairs' products instead of fresh
    tensors."""
    norms = [torch.linalg.vector_norm(offset, dim=1, keepdim=True) for offset in offsets]
    if product is None:
        product = torch.empty_like(offsets[0])
    dots = [
        torch.mul(first, second, out=product).sum(dim=1, keepdim=True)
        for index, first in enumerate(offsets)
        for second in offsets[index + 1 :]
    ]
    return norms, dots


def stock_ratio_of(
    norms: Sequence[Sequence[torch.Tensor]], dots: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """The whole tensor's t (shape ``(1,)``) from its blocks' partials: ``norms[i]`` the blocks'
    norms of δ_i, ``dots[p]`` the blocks' dot products of pair p, both in block order."""
    whole_norms = [combine_norms(parts).reshape(()) for parts in norms]
    whole_dots = iter([combine_sums(parts).reshape(()) for parts in dots])
    count = len(whole_norms)
    cosines = [
        _pair_cosine(next(whole_dots), whole_norms[first], whole_norms[second])
        for first in range(count)
        for second in range(first + 1, count)
    ]
    return stock_ratio(torch.stack(cosines).mean(dim=0).unsqueeze(-1), count)
