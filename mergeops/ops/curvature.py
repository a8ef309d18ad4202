"""Curvature-aware merging math (OTA, arXiv 2509.11167): Adam second moments as preconditioners.

Pure tensor functions: every input is a float tensor, every output float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rank1_factors(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums ``r`` and column sums ``c`` of a 2-D second moment (the only things stored)."""
    if second_moment.ndim != 2:
        raise ValueError(
            f"rank-1 factors need a 2-D tensor, got shape {tuple(second_moment.shape)}"
        )
    v = second_moment.float()
    return v.sum(dim=1), v.sum(dim=0)


def rank1_expand(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Rebuild ``v ≈ r cᵀ / Σv`` from its factors (``Σv = Σr``); zero where ``Σv = 0``."""
    total = rows.float().sum()
    if total == 0:
        return rows.new_zeros(rows.numel(), cols.numel(), dtype=torch.float32)
    return torch.outer(rows.float(), cols.float()) / total


def rank1_approx(second_moment: torch.Tensor) -> torch.Tensor:
    """The rank-1 compression of a 2-D ``v``; other ranks are returned unchanged (float32)."""
    if second_moment.ndim != 2:
        return second_moment.float()
    return rank1_expand(*rank1_factors(second_moment))


def preconditioner(
    second_moment: torch.Tensor, *, power: float = 0.5, mean: float | None = None
) -> torch.Tensor:
    """``P = v^power``, divided by ``mean`` (the model-wide mean of ``v^power``) when given.

    Negative entries (never produced by Adam, but possible after lossy conversion) are clamped
    to zero so that fractional powers stay real.
    """
    p = second_moment.float().clamp_min(0.0).pow(power)
    if mean is not None:
        if mean <= 0:
            raise ValueError(f"cannot normalise a preconditioner by a non-positive mean {mean}")
        p = p / mean
    return p


def ota_weights(
    preconditioners: Sequence[torch.Tensor],
    *,
    eps: float,
    masks: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per-model weights ``W_t = (P_t + ε)·M_t`` (``M_t`` all ones without masks)."""
    weights = [p.float() + eps for p in preconditioners]
    if masks is not None:
        if len(masks) != len(weights):
            raise ValueError(f"got {len(masks)} masks for {len(weights)} models")
        weights = [w * m.to(torch.float32) for w, m in zip(weights, masks, strict=True)]
    return weights


def ota_merge_with_base(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    preconditioners: Sequence[torch.Tensor],
    *,
    eps: float = 1e-8,
    masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``θ0 + Σ W_t ⊙ τ_t / Σ W_t``; ``θ0`` wherever ``Σ W_t ≤ 1.1·T·ε`` (every model masked out).

    Returns a float32 tensor with the base's shape.
    """
    if len(task_vectors) != len(preconditioners) or not task_vectors:
        raise ValueError(
            f"need one preconditioner per task vector, got {len(preconditioners)} "
            f"for {len(task_vectors)}"
        )
    weights = ota_weights(preconditioners, eps=eps, masks=masks)
    total = torch.stack(weights).sum(dim=0)
    weighted = torch.stack([w * tv.float() for w, tv in zip(weights, task_vectors, strict=True)])
    keep = total > 1.1 * len(weights) * eps
    update = torch.where(keep, weighted.sum(dim=0) / torch.where(keep, total, 1.0), 0.0)
    return base.float() + update


def ota_merge_without_base(
    models: Sequence[torch.Tensor],
    preconditioners: Sequence[torch.Tensor],
    *,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``Σ (P_t+ε) θ_t / Σ (P_t+ε)``: the base-free OTA average, float32.

    ε keeps the division defined where every ``P_t`` is zero (the plain mean there); with
    ``ε ≪ P`` this is METHODS.md's ``Σ P_t θ_t / Σ P_t``.
    """
    if len(models) != len(preconditioners) or not models:
        raise ValueError(
            f"need one preconditioner per model, got {len(preconditioners)} for {len(models)}"
        )
    weights = ota_weights(preconditioners, eps=eps)
    weighted = sum((w * m.float() for w, m in zip(weights, models, strict=True)), torch.zeros(()))
    return weighted / torch.stack(weights).sum(dim=0)
