"""SCE (Select, Calculate, Erase; Wan et al. 2024, https://arxiv.org/abs/2408.07990) as
mergekit 0.1.5 computes it, in the dtype of the task vectors.

Select: optionally keep only the ``select_topk`` fraction of positions whose task vectors vary
most across models. Calculate: w_t = mean(τ_t²) / Σ_s mean(τ_s²). Erase: TIES sign election.
θ = θ0 + Σ w_t m_t τ_t / max(Σ w_t m_t, 1e-6).

For row slices (``methods.task_vector.sce``) the steps are split: the variance across models
is elementwise (``variance_across`` per slice into one whole buffer, then ``top_variance``
once over the whole tensor: the same ``torch.topk`` call, hence the same choice among equal
variances), the energies are sums of squares per fixed flat block (``block_energy``, combined
in order by ``energy_of_sums``) and the erase/combine step is elementwise (``sce_combine``).
``sce_merge`` is the whole-tensor reference with mergekit's own reductions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeops import kernels
from mergeops.ops.scratch import scratch
from mergeops.ops.sign_consensus import sign_agreement


def task_vectors_of(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stacked τ_t = θ_t - θ0, shape (T, ...)."""
    return torch.stack([model - base for model in models], dim=0)


def variance_across(task_vectors: torch.Tensor) -> torch.Tensor:
    """The population variance of each position across models (T, ...) -> (...), the bits of
    ``torch.var(task_vectors, dim=0, unbiased=False)``.

    On the CPU, for float32, torch reduces each position's T values one after another with
    Welford's update in float64 (mean += δ/n, m2 += δ·(x - mean), then m2 / T cast to float32),
    through a generic reduction that costs far more per position than the arithmetic. The
    same updates as whole-slice float64 ops give the same bits about three times faster."""
    if task_vectors.device.type != "cpu" or task_vectors.dtype != torch.float32:
        return torch.var(task_vectors, dim=0, unbiased=False)
    shape, device = task_vectors.shape[1:], task_vectors.device
    mean = scratch("var-mean", shape, torch.float64, device).zero_()
    m2 = scratch("var-m2", shape, torch.float64, device).zero_()
    x = scratch("var-x", shape, torch.float64, device)
    delta = scratch("var-delta", shape, torch.float64, device)
    step = scratch("var-step", shape, torch.float64, device)
    for t in range(task_vectors.shape[0]):
        x.copy_(task_vectors[t])
        torch.sub(x, mean, out=delta)
        mean.add_(torch.div(delta, float(t + 1), out=step))
        m2.add_(delta.mul_(x.sub_(mean)))
    return m2.div_(float(task_vectors.shape[0])).float()


def top_variance(variance: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Bool mask of the ⌊select_topk·nnz(variance)⌋ largest variances, for 0 < topk < 1.

    The count is computed as mergekit does (a float32 product, truncated); equal variances at
    the cut are chosen by ``torch.topk`` (unsorted: the same set, without ordering it).
    ``variance`` is overwritten (its absolute value is taken in place).
    """
    k = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros(variance.shape, dtype=torch.bool, device=variance.device)
    if k == 0:
        return mask
    flat = variance.abs_().view(-1)
    if k * 64 > flat.numel():
        # torch.topk selects with std::nth_element here: the same algorithm, in place, with no
        # queue of (value, index) pairs (16 bytes per entry) and no outputs
        order = kernels.nth_element(flat, k - 1, descending=True)
        if order is not None:
            mask.view(-1)[order[:k]] = True
            return mask
    top = torch.topk(flat, k=k, largest=True, sorted=False).indices
    mask.view(-1)[top] = True
    return mask


def select_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 at the ⌊select_topk·nnz(var)⌋ positions of largest variance across models (T, ...),
    in the task vectors' dtype (mergekit's mask)."""
    like = task_vectors[0]
    if select_topk <= 0:
        return torch.zeros_like(like)
    if select_topk >= 1:
        return torch.ones_like(like)
    return top_variance(variance_across(task_vectors), select_topk).to(like.dtype)


def block_energy(block: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ τ_t² over one flat block per model (squares rounded in τ's dtype, summed in float32
    or wider, as ``mean`` does), shape (T,)."""
    acc = torch.promote_types(block[0].dtype, torch.float32)
    return torch.stack([part.square().sum(dtype=acc) for part in block])


def energy_of_sums(sums: Sequence[torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
    """mean(τ_t²) per model, in ``dtype``, from the per-block sums in block order."""
    total = torch.stack(list(sums)).sum(dim=0)
    return (total / numel).to(dtype)


def weights_of_energy(energy: torch.Tensor) -> torch.Tensor:
    """w_t = energy_t / Σ_s energy_s (uniform when the total is below 1e-6), shape (T,)."""
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """w_t from whole task vectors with mergekit's own reduction (``mean`` over all)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    return weights_of_energy(energy)


def sce_combine(
    base: torch.Tensor, task_vectors: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """θ0 + Σ w_t m_t τ_t / max(Σ w_t m_t, 1e-6), m_t the TIES sign agreement; any rows of
    a tensor given its (selected) τ_t and the whole tensor's w_t."""
    agree = sign_agreement(task_vectors)
    kept = weights.reshape((-1,) + (1,) * (task_vectors.dim() - 1)) * agree
    merged = (task_vectors * kept).sum(dim=0)
    return base + merged / torch.sum(kept, dim=0).clamp(min=1e-6)


def sce_merge(
    base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float
) -> torch.Tensor:
    """θ0 + the SCE merge of the task vectors θ_t - θ0 (in ``base``'s dtype), whole tensor."""
    task_vectors = task_vectors_of(base, models)
    if select_topk < 1:
        task_vectors = task_vectors * select_mask(task_vectors, select_topk).unsqueeze(0)
    return sce_combine(base, task_vectors, energy_weights(task_vectors))
