"""SCE (Select, Calculate, Erase; Wan et al. 2024, https://arxiv.org/abs/2408.07990) as
mergekit 0.1.5 computes it, in the dtype of the task vectors.

Select: optionally keep only the ``select_topk`` fraction of positions whose task vectors vary
most across models. Calculate: w_t = mean(τ_t²) / Σ_s mean(τ_s²). Erase: TIES sign election.
θ = θ0 + Σ w_t m_t τ_t / max(Σ w_t m_t, 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeops.ops.sign_consensus import sign_agreement


def select_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 at the ⌊select_topk·nnz(var)⌋ positions of largest variance across models (T, ...).

    The count is computed as mergekit does (a float32 product, truncated); equal variances at
    the cut are chosen by ``torch.topk``.
    """
    like = task_vectors[0]
    if select_topk <= 0:
        return torch.zeros_like(like)
    if select_topk >= 1:
        return torch.ones_like(like)
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance)
    if k == 0:
        return mask
    top = torch.topk(variance.abs().view(-1), k=k, largest=True).indices
    mask.view(-1)[top] = 1
    return mask


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """w_t = mean(τ_t²) / Σ_s mean(τ_s²) (uniform when the total is below 1e-6), shape (T,)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce_merge(
    base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float
) -> torch.Tensor:
    """θ0 + the SCE merge of the task vectors θ_t - θ0 (in ``base``'s dtype)."""
    task_vectors = torch.stack([model - base for model in models], dim=0)
    if select_topk < 1:
        task_vectors = task_vectors * select_mask(task_vectors, select_topk).unsqueeze(0)
    agree = sign_agreement(task_vectors)
    weights = energy_weights(task_vectors)
    weights = weights.reshape((-1,) + (1,) * (task_vectors.dim() - 1))
    kept = weights * agree
    merged = (task_vectors * kept).sum(dim=0)
    return base + merged / torch.sum(kept, dim=0).clamp(min=1e-6)
