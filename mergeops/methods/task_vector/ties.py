"""ties — trim, elect sign, disjoint merge (Yadav et al. 2023).

``trim_scope: tensor`` (default) keeps the top-k magnitudes of each tensor's τ_t, as mergekit
does; ``trim_scope: model`` uses one exact top-k threshold over the model's whole flattened
task vector, found by a two-pass radix select (``ops.sparsify.RadixTopK``). Exactly
k = max(1, ⌊density·n⌋) entries survive: ties at the threshold go to lower flat indices
(``tie_break: position``) or, in tensor scope, to the entries mergekit's sort keeps
(``tie_break: mergekit``, see ``ops.selection``). ``rescale`` scales each trimmed τ_t back to
its L1 norm (mergekit's). Under a mergekit config the defaults are mergekit's: density 1,
tie_break mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

from mergeops.methods.base import (
    MergeContext,
    StatsCollector,
    TensorInputs,
    TensorStatsPass,
    register,
)
from mergeops.methods.task_vector._per_model import CutMerge, CutStat, CutSweep, per_model_stats
from mergeops.methods.task_vector.task_arithmetic import (
    SparseModelParams,
    TaskArithmeticParams,
)
from mergeops.ops.prune import l1_scale_of_magnitude
from mergeops.ops.selection import TieBreak, topk_cut_by
from mergeops.ops.sparsify import GlobalThreshold, RadixTopK, tie_cut
from mergeops.ops.streamed_topk import OrderedTieCut, SliceTopK


class TiesParams(TaskArithmeticParams):
    """``normalize`` divides by Σ w_t·[kept_t]; ``trim_scope`` is tensor or model."""

    normalize: bool = True
    trim_scope: Literal["tensor", "model"] = "tensor"
    tie_break: TieBreak = "position"


class ModelTopK(StatsCollector):
    """One exact top-|τ_t| threshold per model over all its tensors."""

    def __init__(self, densities: list[float]) -> None:
        self.selectors = [RadixTopK(d) for d in densities]

    def observe(self, inputs: TensorInputs, ctx: MergeContext) -> None:
        for selector, tau in zip(self.selectors, inputs.task_vectors(), strict=True):
            if selector.density < 1:
                selector.observe(inputs.name, tau.abs())

    def next_pass(self) -> bool:
        return any([s.next_pass() for s in self.selectors if s.density < 1])

    def result(self) -> list[GlobalThreshold | None]:
        return [s.result() if s.density < 1 else None for s in self.selectors]


@register
class Ties(CutMerge):
    """θ = θ0 + λ·disjoint_merge(w_t·trim(τ_t))."""

    name = "ties"
    paper = "https://arxiv.org/abs/2306.01708"
    params_model = TiesParams
    model_params_model = SparseModelParams
    sparsification = "magnitude"
    consensus = True
    mergekit_defaults: ClassVar[dict[str, Any]] = {"density": 1.0, "tie_break": "mergekit"}

    def stats_collector(self, ctx: MergeContext) -> StatsCollector | None:
        params = ctx.params
        assert isinstance(params, TiesParams)
        if params.trim_scope != "model":
            return None
        return ModelTopK([p.density for p in ctx.model_params])  # type: ignore[attr-defined]

    def stats_sweep(
        self, key: str, shape: tuple[int, ...], ctx: MergeContext
    ) -> TensorStatsPass | None:
        """Per-tensor cuts with ties kept by position, on the CPU and without rescale, come
        from sweeps over the slices (``CutSweep`` of ``SliceTopK``); the rest from whole τ_t."""
        params = ctx.params
        assert isinstance(params, TiesParams)
        densities = [p.density for p in ctx.model_params]  # type: ignore[attr-defined]
        if (
            params.trim_scope != "tensor"
            or params.tie_break != "position"
            or params.rescale
            or ctx.device.type != "cpu"
            or all(d >= 1 for d in densities)
        ):
            return None
        numel = math.prod(shape)
        return CutSweep([SliceTopK(numel, d) if d < 1 else None for d in densities])

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        return self._trim(key, tau, index, ctx).apply(tau, 0)

    def _trim(
        self, key: str, tau: torch.Tensor, index: int, ctx: MergeContext, *, owned: bool = False
    ) -> CutStat:
        """The cut and rescale factor of model ``index``'s whole τ for tensor ``key``
        (``owned``: τ may be overwritten, its magnitude is then taken in place)."""
        params = ctx.params
        assert isinstance(params, TiesParams)
        density = ctx.model_params[index].density  # type: ignore[attr-defined]
        model_cut = None if params.trim_scope == "tensor" else ctx.stats[index]
        if (params.trim_scope == "tensor" and density >= 1) or (
            params.trim_scope == "model" and model_cut is None
        ):
            return CutStat(None, None)
        magnitude = tau.abs_() if owned else tau.abs()
        if model_cut is None:
            # Without rescale nothing reads the magnitudes after the cut: sort them in place.
            consume = owned and not params.rescale
            cut = topk_cut_by(magnitude, density, params.tie_break, consume=consume)
        else:
            cut = tie_cut(magnitude, model_cut.threshold, model_cut.tie_quota.get(key, 0))
        if not params.rescale or cut is None:
            return CutStat(cut, None)
        return CutStat(cut, l1_scale_of_magnitude(magnitude, cut.mask_rows(magnitude, 0)))

    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """Each model's trim of this tensor, from its whole τ_t (one model at a time); a
        model-wide cut without rescale needs no τ_t: its threshold and this tensor's tie quota
        are known, and the merge pass counts the ties in flat order (``OrderedTieCut``)."""
        params = ctx.params
        assert isinstance(params, TiesParams)
        if params.trim_scope == "model" and not params.rescale:
            return [
                CutStat(None if cut is None else OrderedTieCut(cut.threshold,
                                                               cut.tie_quota.get(key, 0)), None)
                for cut in ctx.stats
            ]  # fmt: skip

        def trimmed(index: int) -> bool:
            density = ctx.model_params[index].density  # type: ignore[attr-defined]
            if params.trim_scope == "tensor":
                return density < 1
            return ctx.stats[index] is not None

        return per_model_stats(
            [trimmed(i) for i in range(len(ctx.model_params))],
            task_vector,
            lambda index, tau: self._trim(key, tau, index, ctx, owned=True),
            CutStat(None, None),
            numel=math.prod(shape),
            device=ctx.device,
        )
