"""breadcrumbs / breadcrumbs_ties — Model Breadcrumbs (Davari & Belilovsky 2023): per τ_t drop
the largest ``gamma`` fraction of magnitudes (outliers) and then the smallest, so that a
``density`` fraction survives; then task arithmetic, or TIES sign consensus (``_ties``).

Rank window as mergekit 0.1.5 computes it (``ops.selection.window_bounds``); ties at either
cut go by position (ckreg) or as mergekit's sort orders them (``tie_break: mergekit``, the
default under a mergekit config). Defaults are mergekit's: density 1 (no pruning),
gamma 0.01, normalize false.

Elementwise once each τ_t's window is known, so the engine merges large tensors in row
slices. Under the position rule on the CPU without rescale, the windows come from sweeps over
those slices (``stats_sweep``: ``ops.streamed_topk.SliceWindow``, no whole τ_t held); else
``tensor_stats`` finds every model's window from its whole τ_t (one model at a time) and holds
it until the merge pass with its kept ties as a bit mask when that is smaller than their
indices (``ops.packed_cut``: on an embedding, 4 MB instead of tens of MB per model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field

from mergeops.methods.base import MergeContext, ModelParams, TensorStatsPass, register
from mergeops.methods.task_vector._per_model import (
    CutMerge,
    CutStat,
    CutSweep,
    SliceCut,
    per_model_stats,
)
from mergeops.methods.task_vector.task_arithmetic import TaskArithmeticParams
from mergeops.ops.packed_cut import compact_window
from mergeops.ops.prune import l1_scale_of_magnitude
from mergeops.ops.selection import TieBreak, WindowCut, window_bounds, window_cut
from mergeops.ops.streamed_topk import SliceWindow


class BreadcrumbsParams(TaskArithmeticParams):
    """``tie_break`` at the two cuts; ``rescale`` restores each τ_t's L1 norm."""

    tie_break: TieBreak = "position"


class BreadcrumbsModelParams(ModelParams):
    """Per-model ``weight``, ``density`` (fraction kept) and ``gamma`` (largest fraction
    dropped)."""

    weight: float = 1.0
    density: float = Field(1.0, ge=0, le=1)
    gamma: float = Field(0.01, ge=0, le=1)


class _Breadcrumbs(CutMerge):
    paper = "https://arxiv.org/abs/2312.06795"
    params_model = BreadcrumbsParams
    model_params_model = BreadcrumbsModelParams
    sparsification = "outliers"
    mergekit_defaults: ClassVar[dict[str, Any]] = {"tie_break": "mergekit"}

    def _window(
        self, tau: torch.Tensor, index: int, ctx: MergeContext, *, owned: bool = False
    ) -> CutStat:
        """Model ``index``'s window of a whole τ and, with ``rescale``, its L1 factor
        (``owned``: τ may be overwritten, its magnitude is then taken in place)."""
        params = ctx.params
        assert isinstance(params, BreadcrumbsParams)
        own = ctx.model_params[index]
        assert isinstance(own, BreadcrumbsModelParams)
        if own.density >= 1:
            return CutStat(None, None)
        lo, hi = window_bounds(tau.numel(), own.density, own.gamma)
        magnitude = tau.abs_() if owned else tau.abs()
        consume = owned and not params.rescale  # else the L1 factor needs it unsorted
        cut = window_cut(magnitude, lo, hi, params.tie_break, consume=consume)
        if not params.rescale or cut is None:
            return CutStat(cut, None)
        return CutStat(cut, l1_scale_of_magnitude(magnitude, cut.mask_rows(magnitude, 0)))

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        return self._window(tau, index, ctx).apply(tau, 0)

    def stats_sweep(
        self, key: str, shape: tuple[int, ...], ctx: MergeContext
    ) -> TensorStatsPass | None:
        """Windows with ties kept by position, on the CPU and without rescale, from sweeps over
        the row slices (``CutSweep`` of ``SliceWindow``); None: from whole τ_t."""
        params = ctx.params
        assert isinstance(params, BreadcrumbsParams)
        own = ctx.model_params
        if (
            params.tie_break != "position"
            or params.rescale
            or ctx.device.type != "cpu"
            or all(p.density >= 1 for p in own)  # type: ignore[attr-defined]
        ):
            return None
        numel = math.prod(shape)
        selectors: list[SliceCut | None] = []
        for p in own:
            assert isinstance(p, BreadcrumbsModelParams)
            window = window_bounds(numel, p.density, p.gamma) if p.density < 1 else None
            selectors.append(None if window is None else SliceWindow(numel, *window))
        return CutSweep(selectors)

    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """Each model's window of this tensor, from its whole τ_t (two models at a time), its
        ties packed (``compact_window``)."""
        numel = math.prod(shape)

        def window(index: int, tau: torch.Tensor) -> CutStat:
            stat = self._window(tau, index, ctx, owned=True)
            if not isinstance(stat.cut, WindowCut):
                return stat
            return CutStat(compact_window(stat.cut, numel), stat.scale)

        return per_model_stats(
            [own.density < 1 for own in ctx.model_params],  # type: ignore[attr-defined]
            task_vector,
            window,
            CutStat(None, None),
            numel=numel,
            device=ctx.device,
        )


@register
class Breadcrumbs(_Breadcrumbs):
    """θ0 + λ Σ w_t breadcrumbs(τ_t)."""

    name = "breadcrumbs"


@register
class BreadcrumbsTies(_Breadcrumbs):
    """θ0 + λ·disjoint_merge(w_t breadcrumbs(τ_t))."""

    name = "breadcrumbs_ties"
    consensus = True
