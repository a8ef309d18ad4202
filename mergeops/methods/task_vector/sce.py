"""sce — Select, Calculate, Erase (Wan et al. 2024, FuseChat): variance-selected positions,
energy-based model weights and TIES sign election, per tensor (``ops.sce``).

Parameters are mergekit's: ``select_topk`` (fraction of positions kept, default 1: all) and
``int8_mask`` (accepted; no effect in ckreg, whose masks are bool). SCE takes no per-model
weights: its weights come from the task vectors themselves.
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
from mergeops.ops.sce import sce_merge


class SceParams(MethodParams):
    """``select_topk``: fraction in [0, 1] of highest-variance positions kept."""

    select_topk: float = Field(1.0, ge=0, le=1)
    int8_mask: bool = False


@register
class Sce(StreamingMethod):
    """θ = θ0 + Σ w_t m_t τ_t / Σ w_t m_t with w_t ∝ mean(τ_t²) and m_t the sign mask."""

    name = "sce"
    paper = "https://arxiv.org/abs/2408.07990"
    params_model = SceParams
    needs = frozenset({Need.BASE})

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, SceParams) and inputs.base is not None
        return TensorResult(sce_merge(inputs.base, inputs.models, params.select_topk))
