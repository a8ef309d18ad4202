"""Pruning helpers of mergekit's task-vector methods: the L1-preserving rescale of a masked
task vector, and DELLA's magnitude-ranked keep probabilities (MAGPRUNE).

Each function follows mergekit 0.1.5's operation order, so results computed in bfloat16 round
the same way; they work in the dtype they are given. The exception is the L1 factor of the
random methods (DARE, DELLA: ``l1_factor``), summed in float64 lanes so that it does not change
with the machine's thread count; TIES and breadcrumbs keep mergekit's float32 sums
(``l1_scale_of_magnitude``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mergeops import kernels
from mergeops.ops.lanes import LANES, lane_sums
from mergeops.ops.scratch import scratch_like

RescaleBy = Literal["keep_probability", "l1"]

L1_EPS = 1e-7
"""Below this L1 norm (before or after masking) the masked tensor is not rescaled."""


def l1_scale_of_magnitude(
    magnitude: torch.Tensor, kept: torch.Tensor, *, in_place: bool = False
) -> torch.Tensor | None:
    """mergekit's L1 factor ‖τ‖₁ / ‖τ ⊙ kept‖₁ by float32 ``sum()`` (TIES's and breadcrumbs'
    rescale, which keep mergekit's bits) from ``magnitude = |τ|`` alone (bit for bit:
    |τ ⊙ kept| = |τ| ⊙ kept), so a caller may take the magnitude in place (``in_place``: the
    magnitude is then multiplied by ``kept`` in place too, no whole temporary); None when
    either sum is below ``L1_EPS``."""
    before = magnitude.sum()
    after = (magnitude.mul_(kept) if in_place else magnitude * kept).sum()
    if before < L1_EPS or after < L1_EPS:
        return None
    return before / after


def l1_factor_of_lanes(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor | None:
    """DARE's L1 factor ‖τ‖₁ / ‖τ ⊙ keep‖₁ (a float32 0-dim tensor) from the lane sums of |τ|
    and |τ ⊙ keep| (``lane_sums``), each total correctly rounded from its lanes; None when
    either is below ``L1_EPS``. Unlike a float32 ``sum()`` (whose rounding follows torch's
    split of the work over threads), the same inputs give the same factor on every machine."""
    total_before = math.fsum(before.tolist())
    total_after = math.fsum(after.tolist())
    if total_before < L1_EPS or total_after < L1_EPS:
        return None
    return torch.tensor(total_before / total_after, dtype=torch.float32)


def l1_factor(
    magnitude: torch.Tensor, kept: torch.Tensor, *, in_place: bool = False
) -> torch.Tensor | None:
    """DARE's L1 factor of a whole τ from ``magnitude = |τ|`` and its keep mask, by lane sums
    (``l1_factor_of_lanes``); ``in_place``: the magnitude is multiplied by ``kept`` in place."""
    before = magnitude.new_zeros(LANES, dtype=torch.float64)
    after = magnitude.new_zeros(LANES, dtype=torch.float64)
    lane_sums(magnitude, before)
    lane_sums(magnitude.mul_(kept) if in_place else magnitude * kept, after)
    return l1_factor_of_lanes(before, after)


def l1_factor_of_tau(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
    """``l1_factor(|τ|, kept)`` (``kept``: τ's keep mask, any shape of τ's size), the same
    bits, by blocks of ``L1_BLOCK`` entries: no whole |τ| or |τ| ⊙ kept is allocated."""
    flat, keep = tau.reshape(-1), kept.reshape(-1)
    before = flat.new_zeros(LANES, dtype=torch.float64)
    after = flat.new_zeros(LANES, dtype=torch.float64)
    for start in range(0, flat.numel(), L1_BLOCK):
        block = flat[start : start + L1_BLOCK]
        magnitude = torch.abs(block, out=scratch_like("l1-magnitude", block))
        lane_sums(magnitude, before)
        lane_sums(magnitude.mul_(keep[start : start + L1_BLOCK]), after)
    return l1_factor_of_lanes(before, after)


L1_BLOCK = 1 << 20
"""Entries per block of ``l1_factor_of_tau`` (a multiple of ``LANES``: each block's lane sums
continue the previous block's lanes)."""


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype mergekit draws masks in: the tensor's own, but float32 for CPU float16/32."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def check_della(density: float, epsilon: float) -> str | None:
    """Why (density, epsilon) is invalid for DELLA, or None (density >= 1 is always valid)."""
    if density >= 1:
        return None
    if density + epsilon >= 1 or density - epsilon <= 0:
        return f"density ± epsilon must lie in (0, 1); got density {density}, epsilon {epsilon}"
    return None


def della_keep_probability(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (density - ε) + 2ε·rank_norm per entry, ranks of |τ| along dim 1 (1-D: one row).

    Returns the probabilities in ``work_dtype`` shaped like the tensor viewed with at least
    two dimensions. Equal magnitudes rank in index order (a stable sort: the same on every
    device and thread count; mergekit's unstable ``argsort`` orders them as the sort algorithm
    happens to). A single column (rank range 0) gets rank_norm 0.5 (mergekit divides 0 by 0
    there). On the CPU, float32 rows are ranked by a radix sort over the cores
    (``kernels.della_probabilities``), with the same bits.
    """
    rows = tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)
    dtype = work_dtype(tensor)
    if dtype == torch.float32 and rows.dim() == 2:
        workers = torch.get_num_threads()
        fused = kernels.della_probabilities(rows, density, epsilon, workers=workers)
        if fused is not None:
            return fused
    order = torch.argsort(rows.abs(), dim=1, descending=False, stable=True)
    positions = torch.arange(rows.shape[1], device=rows.device)
    positions = positions.reshape((1, -1) + (1,) * (rows.dim() - 2)).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(dtype) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    if rows.shape[1] > 1:
        rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    else:
        rank_norm = torch.full_like(ranks, 0.5)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_prune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale_by: RescaleBy | None,
) -> torch.Tensor:
    """DELLA's MAGPRUNE: keep each entry with its probability p, then rescale survivors by
    1/p (``keep_probability``, the paper's), to the L1 norm of τ (``l1``, mergekit's) or not."""
    if density >= 1:
        return tensor
    probs = della_keep_probability(tensor, density, epsilon)
    if probs.device.type == "cpu":
        keep = bernoulli_cpu(probs, generator).to(probs.dtype)
    else:
        keep = torch.bernoulli(probs, generator=generator)
    rows = tensor.reshape(probs.shape).to(probs.dtype)
    masked = rows * keep
    if rescale_by == "l1":
        factor = l1_factor(rows.abs(), keep)
        masked = masked if factor is None else masked * factor
    elif rescale_by == "keep_probability":
        masked = masked / probs
    return masked.to(tensor.dtype).reshape(tensor.shape)


def bernoulli_cpu(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``torch.bernoulli(probs, generator=generator) == 1`` on the CPU, the same draws: for
    float32 and bfloat16 probabilities torch draws one float32 uniform per entry in element
    order and keeps it when below p, which ``torch.rand`` and a comparison do about five
    times faster; other dtypes (float64 draws 64-bit uniforms) call ``torch.bernoulli``."""
    if probs.dtype not in (torch.float32, torch.bfloat16):
        return torch.bernoulli(probs, generator=generator).to(torch.bool)
    uniform = torch.rand(probs.shape, generator=generator)
    return torch.lt(uniform, probs.float() if probs.dtype != torch.float32 else probs)
