"""Per-model weights from metrics (MWA) and Fisher-weighted averaging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def metric_weights(
    metrics: Sequence[float],
    *,
    p: float,
    mode: Literal["lower", "higher"],
    transform: Literal["power", "softmax"] = "power",
) -> list[float]:
    """MWA weights from one metric value per model, normalized to sum to 1.

    Our reading of arXiv 2504.18580: ``power`` gives w ∝ m^(-p) for a lower-is-better metric
    (loss) and w ∝ m^p for a higher-is-better one (step); ``softmax`` gives w ∝ exp(∓p·m).
    p = 0 is the uniform average.

    Raises:
        ValueError: ``power`` with a non-positive metric value (its power is undefined).
    """
    values = torch.tensor(list(metrics), dtype=torch.float64)
    sign = -1.0 if mode == "lower" else 1.0
    if transform == "softmax":
        weights = torch.softmax(sign * p * values, dim=0)
    else:
        if p != 0 and bool((values <= 0).any()):
            bad = float(values[values <= 0][0])
            raise ValueError(f"metric value {bad} must be > 0 for transform 'power'")
        weights = values.pow(sign * p)
        weights = weights / weights.sum()
    return [float(w) for w in weights]


def fisher_average(
    models: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    lambdas: Sequence[float],
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Fisher merge: Σ λ_t F̃_t ⊙ θ_t / Σ λ_t F̃_t with F̃ = F + eps."""
    numerator = torch.zeros_like(models[0])
    denominator = torch.zeros_like(models[0])
    for model, fisher, lam in zip(models, fishers, lambdas, strict=True):
        weight = lam * (fisher + eps)
        numerator += weight * model
        denominator += weight
    return numerator / denominator
