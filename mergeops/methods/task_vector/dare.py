"""dare_linear / dare_ties — random drop-and-rescale of task vectors, then task arithmetic or
TIES sign consensus (Yu et al. 2024). Drops are seeded per (seed, tensor, model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergeops.methods.base import MergeContext, register
from mergeops.methods.task_vector.task_arithmetic import (
    SparseModelParams,
    TaskArithmeticParams,
    TaskVectorMerge,
)
from mergeops.ops.sparsify import dare_drop, dare_keep


class _Dare(TaskVectorMerge):
    paper = "https://arxiv.org/abs/2311.03099"
    params_model = TaskArithmeticParams
    model_params_model = SparseModelParams
    sparsification = "random"

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        density = ctx.model_params[index].density  # type: ignore[attr-defined]
        return dare_drop(tau, density, ctx.generator(key, index))

    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """Each model's whole-tensor keep mask, drawn exactly as ``dare_drop`` draws it."""
        return [
            dare_keep(shape, p.density, ctx.generator(key, i), ctx.device)  # type: ignore[attr-defined]
            for i, p in enumerate(ctx.model_params)
        ]

    def sparsify_rows(
        self, tau: torch.Tensor, stat: Any, offset: int, index: int, ctx: MergeContext
    ) -> torch.Tensor:
        """Apply a row slice of this tensor's keep mask (same random numbers as unchunked)."""
        if stat is None:
            return tau
        density = ctx.model_params[index].density  # type: ignore[attr-defined]
        keep = stat.reshape(-1)[offset : offset + tau.numel()].reshape(tau.shape)
        return tau * keep / density


@register
class DareLinear(_Dare):
    """θ0 + λ Σ w_t DARE(τ_t)."""

    name = "dare_linear"


@register
class DareTies(_Dare):
    """θ0 + λ·disjoint_merge(w_t DARE(τ_t))."""

    name = "dare_ties"
    consensus = True
