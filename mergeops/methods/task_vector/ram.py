"""ram / ramplus_tl — Reinforced Agent Merging: entries of τ_t only one model moved
(|τ| > ε) are kept whole, entries several moved are averaged; RAM+ (tensor-local) boosts each
model's unique entries by 1 + r·clip(shared/unique count, 0, alpha) (``ops.ram``).
Paper: https://arxiv.org/abs/2601.13572.

Parameters and defaults are mergekit 0.1.5's: ``epsilon`` 1e-5, ``r`` 0.1, ``alpha`` 0.2. No
per-model weights. With 16-bit inputs ramplus_tl's sum is float32 (as in mergekit) and is
cast to the output dtype once.

Large tensors merge in row slices. ram is elementwise across models (``ElementwiseMethod``).
ramplus_tl first counts each model's shared and unique movers over the slices (one sweep of
exact integer sums, ``RamCounts``), then merges slice by slice with the whole tensor's λ_t:
bit-identical to the whole-tensor merge and to mergekit.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from mergeops.methods.base import (
    ElementwiseMethod,
    MergeContext,
    MethodParams,
    Need,
    SliceStatsMethod,
    TensorInputs,
    TensorResult,
    TensorStatsPass,
    register,
)
from mergeops.ops.ram import mover_counts, ram_merge, ramplus_combine, ramplus_scale


class RamParams(MethodParams):
    """``epsilon``: |τ| above it counts as moved."""

    epsilon: float = Field(1e-5, ge=0)


class RamPlusParams(RamParams):
    """``r`` boost strength and ``alpha`` cap of the shared/unique ratio."""

    r: float = 0.1
    alpha: float = Field(0.2, ge=0)


@register
class Ram(ElementwiseMethod):
    """θ = θ0 + Σ_t (unique τ_t + shared τ_t / movers)."""

    name = "ram"
    paper = "https://arxiv.org/abs/2601.13572"
    params_model = RamParams
    needs = frozenset({Need.BASE})

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, RamParams) and inputs.base is not None
        return TensorResult(ram_merge(inputs.base, inputs.models, params.epsilon))


class RamCounts(TensorStatsPass):
    """One sweep: each model's shared and unique mover counts (int64) over the tensor.
    Result: λ_t (float32, shape (T,))."""

    def __init__(self, params: RamPlusParams, count: int) -> None:
        self.params, self.count = params, count
        self.shared: torch.Tensor | None = None
        self.unique: torch.Tensor | None = None

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        assert inputs.base is not None
        shared, unique = mover_counts(inputs.base, inputs.models, self.params.epsilon)
        if self.shared is None or self.unique is None:
            self.shared, self.unique = shared, unique
        else:
            self.shared += shared
            self.unique += unique

    def result(self) -> torch.Tensor:
        if self.shared is None or self.unique is None:  # an empty tensor
            return torch.ones(self.count)
        p = self.params
        return ramplus_scale(self.shared, self.unique, p.r, p.alpha, p.epsilon)


@register
class RamPlusTl(SliceStatsMethod):
    """θ = θ0 + Σ_t (λ_t·unique τ_t + shared τ_t / movers)."""

    name = "ramplus_tl"
    paper = "https://arxiv.org/abs/2601.13572"
    params_model = RamPlusParams
    needs = frozenset({Need.BASE})

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> RamCounts:
        params = ctx.params
        assert isinstance(params, RamPlusParams)
        return RamCounts(params, len(ctx.model_params))

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, RamPlusParams) and inputs.base is not None
        scale = stats.to(inputs.base.device)
        return ramplus_combine(inputs.base, inputs.models, scale, params.epsilon)
