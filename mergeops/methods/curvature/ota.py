"""ota and ota_ffg — curvature-aware merging with Adam second moments (arXiv 2509.11167).

ota: ``P_t = v_t^power`` (optionally divided by its mean over ALL of model t's entries —
``normalise: global`` — computed exactly in a first pass), ``W_t = P_t + ε``;
with a base θ = θ0 + Σ W τ / Σ W (θ0 where Σ W ≤ 1.1·T·ε), without θ = Σ W θ / Σ W.
ota_ffg: the same with ``W_t = (P_t + ε)·M_t``, ``M_t`` the FFG mask of model t (per-model
``density`` or ``threshold``, see ``mergeops.methods.curvature.ffg``); needs a base.
``second_moment: rank1`` replaces each 2-D v by r cᵀ / Σv before anything else.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    Need,
    StatsCollector,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.methods.curvature.ffg import (
    PAPER,
    FfgModelParams,
    FfgThresholds,
    SecondMomentInput,
    SecondMomentLayout,
    ffg_masks,
    second_moments,
)
from mergeops.ops.curvature import ota_merge_with_base, ota_merge_without_base, preconditioner


class OtaParams(MethodParams):
    """``power`` of v, ``normalise`` (``none`` | ``global``), ``eps``, ``second_moment`` layout."""

    power: float = Field(0.5, gt=0)
    normalise: Literal["none", "global"] = "none"
    eps: float = Field(1e-8, gt=0)
    second_moment: SecondMomentLayout = "full"


class PreconditionerMeans(StatsCollector):
    """Mean of ``v_t^power`` over all of each model's entries (one pass)."""

    def __init__(self, ctx: MergeContext, params: OtaParams) -> None:
        self.params = params
        self.sums = [0.0] * len(ctx.model_names)
        self.counts = [0] * len(ctx.model_names)

    def observe(self, inputs: TensorInputs, ctx: MergeContext) -> None:
        moments = second_moments(inputs, self.params.second_moment)
        for i, v in enumerate(moments):
            self.sums[i] += float(preconditioner(v, power=self.params.power).double().sum())
            self.counts[i] += v.numel()

    def result(self) -> list[float]:
        return [s / max(c, 1) for s, c in zip(self.sums, self.counts, strict=True)]


class CombinedStats(StatsCollector):
    """Drives several collectors over the same sweeps; each stops when it is done."""

    def __init__(self, collectors: dict[str, StatsCollector]) -> None:
        self.collectors = collectors
        self.active = set(collectors)

    def observe(self, inputs: TensorInputs, ctx: MergeContext) -> None:
        for name in self.active:
            self.collectors[name].observe(inputs, ctx)

    def next_pass(self) -> bool:
        self.active = {name for name in self.active if self.collectors[name].next_pass()}
        return bool(self.active)

    def result(self) -> dict[str, Any]:
        return {name: collector.result() for name, collector in self.collectors.items()}


@register
class Ota(SecondMomentInput, StreamingMethod):
    """Per-entry second-moment-weighted average of task vectors (or of models, without base)."""

    name = "ota"
    paper = PAPER
    params_model = OtaParams
    needs = frozenset({Need.SECOND_MOMENTS})
    optional = frozenset({Need.BASE})

    def collectors(self, ctx: MergeContext) -> dict[str, StatsCollector]:
        """The first-pass statistics this method needs."""
        params = ctx.params
        assert isinstance(params, OtaParams)
        return {"means": PreconditionerMeans(ctx, params)} if params.normalise == "global" else {}

    def stats_collector(self, ctx: MergeContext) -> StatsCollector | None:
        collectors = self.collectors(ctx)
        return CombinedStats(collectors) if collectors else None

    def finish_stats(self, ctx: MergeContext) -> list[float | None]:
        """The per-model divisors of P (None without ``normalise: global``)."""
        means = (ctx.stats or {}).get("means")
        if means is None:
            return [None] * len(ctx.model_names)
        for name, mean in zip(ctx.model_names, means, strict=True):
            if mean <= 0:
                raise MergeError(
                    f"ota: second moment of model '{name}' is all zeros; cannot normalise"
                )
        return means

    def masks(self, inputs: TensorInputs, ctx: MergeContext) -> list[torch.Tensor] | None:
        """FFG masks (none for plain ota)."""
        return None

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, OtaParams)
        moments = second_moments(inputs, params.second_moment)
        pre = [
            preconditioner(v, power=params.power, mean=mean)
            for v, mean in zip(moments, self.finish_stats(ctx), strict=True)
        ]
        if inputs.base is None:
            return TensorResult(ota_merge_without_base(inputs.models, pre, eps=params.eps))
        merged = ota_merge_with_base(
            inputs.base, inputs.task_vectors(), pre, eps=params.eps, masks=self.masks(inputs, ctx)
        )
        return TensorResult(merged)


@register
class OtaFfg(Ota):
    """ota whose weights are masked by each model's FFG mask."""

    name = "ota_ffg"
    model_params_model = FfgModelParams
    needs = frozenset({Need.SECOND_MOMENTS, Need.BASE})
    optional = frozenset()

    def collectors(self, ctx: MergeContext) -> dict[str, StatsCollector]:
        params = ctx.params
        assert isinstance(params, OtaParams)
        return {**super().collectors(ctx), "thresholds": FfgThresholds(ctx, params.second_moment)}

    def masks(self, inputs: TensorInputs, ctx: MergeContext) -> list[torch.Tensor] | None:
        params = ctx.params
        assert isinstance(params, OtaParams)
        return ffg_masks(inputs, ctx.stats["thresholds"], params.second_moment)
