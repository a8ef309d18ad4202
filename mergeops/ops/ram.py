"""RAM and RAM+ (Reinforced Agent Merging, https://arxiv.org/abs/2601.13572) as mergekit 0.1.5
computes them, per tensor.

An entry of τ_t counts as moved when |τ_t| > ε. Entries only one model moved are kept as they
are; entries several moved are averaged over the movers. RAM+ (tensor-local) scales each
model's unique entries by λ_t = 1 + r·clip(shared_t / unique_t, 0, alpha).

Everything but λ_t is elementwise across models, so any row slice merges like the whole
tensor. λ_t needs each model's shared and unique mover counts over the whole tensor: integer
sums (``mover_counts`` per slice, added up exactly), so slices give the same λ_t bit for bit.

float32 on the CPU takes one fused pass (``kernels.ram_combine`` / ``ram_counts``) with the
same bits as the torch ops below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergeops import kernels


@dataclass(frozen=True)
class Overlap:
    """Flattened task vectors (T, n) and who moved each entry."""

    task_vectors: torch.Tensor
    moved: torch.Tensor
    movers: torch.Tensor

    @property
    def shared(self) -> torch.Tensor:
        return self.movers > 1

    @property
    def unique(self) -> torch.Tensor:
        return self.movers == 1


def overlap(base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float) -> Overlap:
    """Task vectors θ_t - θ0 flattened, |τ| > ε per entry, and the mover count per entry."""
    stacked = torch.stack([model - base for model in models], dim=0)
    flat = stacked.view(len(models), -1)
    moved = flat.abs() > epsilon
    return Overlap(flat, moved, moved.sum(dim=0, keepdim=True))


def ram_merge(base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float) -> torch.Tensor:
    """θ0 + Σ_t [unique τ_t + shared τ_t / movers]."""
    fused = kernels.ram_combine(base, models, epsilon)
    if fused is not None:
        return fused
    o = overlap(base, models, epsilon)
    kept = o.task_vectors * o.moved
    merged = ((kept * o.unique) + (kept * o.shared / o.movers.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return base + merged.reshape_as(base)


def mover_counts(
    base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model (int64, shape (T,)): how many entries it moved together with another model
    (shared) and alone (unique). Integer counts: sums over slices equal the whole tensor's."""
    counted = kernels.ram_counts(base, models, epsilon)
    if counted is not None:
        return counted
    o = overlap(base, models, epsilon)
    return (o.moved & o.shared).sum(dim=1), (o.moved & o.unique).sum(dim=1)


def ramplus_scale(
    shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """λ_t = 1 + r·clip(shared_t / max(unique_t, ε), 0, alpha) per model (float32), shape (T,),
    from the whole tensor's mover counts (``mover_counts``)."""
    ratio = shared / unique.clamp(min=epsilon)
    return 1 + r * ratio.clamp(min=0, max=alpha)


def ramplus_combine(
    base: torch.Tensor, models: Sequence[torch.Tensor], scale: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """θ0 + Σ_t [λ_t·unique τ_t + shared τ_t / movers] for any rows of the tensor, given the
    whole tensor's λ_t (``scale``; float32, so 16-bit inputs give a float32 sum, as in
    mergekit)."""
    fused = kernels.ram_combine(base, models, epsilon, scale)
    if fused is not None:
        return fused
    o = overlap(base, models, epsilon)
    kept = o.task_vectors * o.moved
    merged = (
        (kept * o.unique * scale.unsqueeze(-1)) + (kept * o.shared / o.movers.clamp(min=1))
    ).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)


def ramplus_merge(
    base: torch.Tensor, models: Sequence[torch.Tensor], r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """θ0 + Σ_t [λ_t·unique τ_t + shared τ_t / movers] of a whole tensor."""
    shared, unique = mover_counts(base, models, epsilon)
    scale = ramplus_scale(shared, unique, r, alpha, epsilon)
    return ramplus_combine(base, models, scale, epsilon)
