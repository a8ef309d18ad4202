"""consensus — Consensus merging (Wang et al. 2024, arXiv 2405.07813).

Keep the entries of τ_MTL = Σ τ_t that at least ``k`` tasks' TALL masks select:
θ = θ0 + alpha·([Σ_t m_t ≥ k] ⊙ τ_MTL). Per-model ``lambda`` as in tall_masks.
"""

from __future__ import annotations

from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.methods.masks.tall import PAPER, TallModelParams, tall_masks_for
from mergeops.ops.masks import consensus_mask, consensus_merge


class ConsensusParams(MethodParams):
    """``k``: minimum number of agreeing tasks (2); ``alpha``: scale of the kept vector (1)."""

    k: int = Field(2, ge=1)
    alpha: float = 1.0


@register
class Consensus(StreamingMethod):
    """Task arithmetic restricted to entries relevant to at least k tasks."""

    name = "consensus"
    paper = PAPER
    params_model = ConsensusParams
    model_params_model = TallModelParams
    needs = frozenset({Need.BASE})

    def validate(self, ctx: MergeContext) -> None:
        params = ctx.params
        assert isinstance(params, ConsensusParams)
        if params.k > len(ctx.model_names):
            raise MergeError(
                f"consensus: k={params.k} exceeds the {len(ctx.model_names)} models "
                f"{ctx.model_names}; nothing would be kept"
            )

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, ConsensusParams) and inputs.base is not None
        mtl, masks = tall_masks_for(inputs, ctx)
        mask = consensus_mask(masks, params.k)
        return TensorResult(consensus_merge(inputs.base, mtl, mask, params.alpha))
