"""breadcrumbs / breadcrumbs_ties — Model Breadcrumbs (Davari & Belilovsky 2023): per τ_t drop
the largest ``gamma`` fraction of magnitudes (outliers) and then the smallest, so that a
``density`` fraction survives; then task arithmetic, or TIES sign consensus (``_ties``).

Rank window as mergekit 0.1.5 computes it (``ops.selection.window_bounds``); ties at either
cut go by position (ckreg) or as mergekit's sort orders them (``tie_break: mergekit``, the
default under a mergekit config). Defaults are mergekit's: density 1 (no pruning),
gamma 0.01, normalize false.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from mergeops.methods.base import MergeContext, ModelParams, register
from mergeops.methods.task_vector.task_arithmetic import TaskArithmeticParams, TaskVectorMerge
from mergeops.ops.prune import l1_rescale
from mergeops.ops.selection import TieBreak, rank_window_mask, window_bounds


class BreadcrumbsParams(TaskArithmeticParams):
    """``tie_break`` at the two cuts; ``rescale`` restores each τ_t's L1 norm."""

    tie_break: TieBreak = "position"


class BreadcrumbsModelParams(ModelParams):
    """Per-model ``weight``, ``density`` (fraction kept) and ``gamma`` (largest fraction
    dropped)."""

    weight: float = 1.0
    density: float = Field(1.0, ge=0, le=1)
    gamma: float = Field(0.01, ge=0, le=1)


class _Breadcrumbs(TaskVectorMerge):
    paper = "https://arxiv.org/abs/2312.06795"
    params_model = BreadcrumbsParams
    model_params_model = BreadcrumbsModelParams
    sparsification = "outliers"
    chunkable = False
    mergekit_defaults: ClassVar[dict[str, Any]] = {"tie_break": "mergekit"}

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, BreadcrumbsParams)
        own = ctx.model_params[index]
        assert isinstance(own, BreadcrumbsModelParams)
        if own.density >= 1:
            return tau
        lo, hi = window_bounds(tau.numel(), own.density, own.gamma)
        masked = tau * rank_window_mask(tau.abs(), lo, hi, params.tie_break)
        return l1_rescale(tau, masked) if params.rescale else masked


@register
class Breadcrumbs(_Breadcrumbs):
    """θ0 + λ Σ w_t breadcrumbs(τ_t)."""

    name = "breadcrumbs"


@register
class BreadcrumbsTies(_Breadcrumbs):
    """θ0 + λ·disjoint_merge(w_t breadcrumbs(τ_t))."""

    name = "breadcrumbs_ties"
    consensus = True
