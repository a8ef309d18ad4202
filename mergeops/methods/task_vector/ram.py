"""ram / ramplus_tl — Reinforced Agent Merging: entries of τ_t only one model moved
(|τ| > ε) are kept whole, entries several moved are averaged; RAM+ (tensor-local) boosts each
model's unique entries by 1 + r·clip(shared/unique count, 0, alpha) (``ops.ram``).

Parameters and defaults are mergekit 0.1.5's: ``epsilon`` 1e-5, ``r`` 0.1, ``alpha`` 0.2. No
per-model weights. With 16-bit inputs ramplus_tl's sum is float32 (as in mergekit) and is
cast to the output dtype once.
"""

from __future__ import annotations

from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.ram import ram_merge, ramplus_merge


class RamParams(MethodParams):
    """``epsilon``: |τ| above it counts as moved."""

    epsilon: float = Field(1e-5, ge=0)


class RamPlusParams(RamParams):
    """``r`` boost strength and ``alpha`` cap of the shared/unique ratio."""

    r: float = 0.1
    alpha: float = Field(0.2, ge=0)


class _RamBase(StreamingMethod):
    paper = "https://arxiv.org/abs/2601.13572"
    needs = frozenset({Need.BASE})


@register
class Ram(_RamBase):
    """θ = θ0 + Σ_t (unique τ_t + shared τ_t / movers)."""

    name = "ram"
    params_model = RamParams

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, RamParams) and inputs.base is not None
        return TensorResult(ram_merge(inputs.base, inputs.models, params.epsilon))


@register
class RamPlusTl(_RamBase):
    """θ = θ0 + Σ_t (λ_t·unique τ_t + shared τ_t / movers)."""

    name = "ramplus_tl"
    params_model = RamPlusParams

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, RamPlusParams) and inputs.base is not None
        merged = ramplus_merge(inputs.base, inputs.models, params.r, params.alpha, params.epsilon)
        return TensorResult(merged)
