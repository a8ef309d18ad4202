"""Pure tensor math of merges where task vectors compete per entry: MagMax, PCB's parameter
competition balancing and EMR's elect-mask-rescale. Inputs are stacked task vectors
``taus`` of shape (T, ...) for one tensor."""

from __future__ import annotations

import torch

from mergeops.ops.basic import elect_sign


def magmax(taus: torch.Tensor) -> torch.Tensor:
    """Per entry, the task vector entry of largest magnitude (first model wins exact ties)."""
    index = taus.abs().argmax(dim=0, keepdim=True)
    return taus.gather(0, index).squeeze(0)


def _minmax(values: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of each model's row to [0, 1] (a constant row becomes 0)."""
    low = values.min(dim=1, keepdim=True).values
    high = values.max(dim=1, keepdim=True).values
    return (values - low) / (high - low).clamp_min(1e-30)


def pcb_scores(taus: torch.Tensor, ratio: float) -> torch.Tensor:
    """PCB balance scores β_i in [0, 1], zero outside each model's top ``ratio`` share.

    intra β_intra,i = exp(T·minmax(|τ_i|)²) (a parameter's weight within its own task),
    inter β_inter,i = tanh(τ_i ⊙ Σ_j τ_j) (agreement with the other tasks); β = product;
    entries below the (1 - ratio) quantile of β_i are clamped to it, then β_i is min-max
    rescaled, so they drop to 0."""
    count = taus.shape[0]
    flat = taus.reshape(count, -1)
    intra = torch.exp(count * _minmax(flat.abs()).pow(2))
    inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))
    beta = intra * inter
    keep = max(1, round(ratio * beta.shape[1]))
    drop_rank = beta.shape[1] - keep
    if drop_rank > 0:
        floor = beta.kthvalue(drop_rank, dim=1, keepdim=True).values
        beta = torch.maximum(beta, floor)
    return _minmax(beta).reshape(taus.shape)


def pcb_merge(taus: torch.Tensor, ratio: float) -> torch.Tensor:
    """Σ β_i τ_i / Σ β_i with PCB's balance scores (0 where every β_i is 0)."""
    beta = pcb_scores(taus, ratio)
    return (beta * taus).sum(dim=0) / beta.sum(dim=0).clamp_min(1e-12)


def emr_unify(taus: torch.Tensor) -> torch.Tensor:
    """EMR's unified task vector: elected sign s = sign(Σ τ_t) (0 -> +), magnitude the
    largest |τ_t| among entries agreeing with s (0 where none agrees)."""
    sign = elect_sign(taus)
    agreeing = (torch.sign(taus) == sign) & (taus != 0)
    magnitude = torch.where(agreeing, taus.abs(), torch.zeros_like(taus)).amax(dim=0)
    return sign * magnitude


def emr_mask_and_scale(tau: torch.Tensor, unified: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Task t's mask m_t = [τ_t ⊙ τ_uni > 0] and rescaler g_t = Σ|τ_t| / Σ|m_t ⊙ τ_uni|."""
    mask = (tau * unified) > 0
    kept = (unified.abs() * mask).sum()
    scale = float(tau.abs().sum() / kept) if kept > 0 else 0.0
    return mask, scale
