"""tall_masks — TALL masks (Wang et al. 2024, arXiv 2405.07813).

τ_MTL = Σ τ_t; per model m_t = [|τ_t| > λ_t·|τ_MTL - τ_t|]. Outputs: the main output
θ0 + τ_MTL (task arithmetic with λ = 1), the stream ``task_vector`` holding τ_MTL in float32,
and the streams ``mask.<model>`` with bit-packed masks (see ``mergeops.methods.curvature.ffg``).
Task t is recovered as θ0 + m_t ⊙ τ_MTL with :func:`reconstruct_model`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    ModelParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.methods.curvature.ffg import stream_name
from mergeops.ops.masks import pack_masks_inline, reconstruct_task, tall_mask, unpack_masks

PAPER = "https://arxiv.org/abs/2405.07813"


class TallParams(MethodParams):
    """No global parameters (τ_MTL is the plain sum of task vectors)."""


class TallModelParams(ModelParams):
    """Per-model ``lambda`` λ_t of the mask test (default 0.4, inside the paper's 0.2-0.6 grid)."""

    lam: float = Field(0.4, ge=0, alias="lambda")


def tall_masks_for(inputs: TensorInputs, ctx: MergeContext) -> tuple[torch.Tensor, list]:
    """τ_MTL and every model's TALL mask for one tensor."""
    tvs = inputs.task_vectors()
    mtl = torch.stack(tvs).sum(dim=0)
    lams = [p.lam for p in ctx.model_params]  # type: ignore[attr-defined]
    return mtl, [tall_mask(tv, mtl, lam) for tv, lam in zip(tvs, lams, strict=True)]


@register
class TallMasks(StreamingMethod):
    """τ_MTL plus one bit-packed mask per model: T masks + one vector replace T checkpoints."""

    name = "tall_masks"
    paper = PAPER
    params_model = TallParams
    model_params_model = TallModelParams
    needs = frozenset({Need.BASE})

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        assert inputs.base is not None
        mtl, masks = tall_masks_for(inputs, ctx)
        extras = {"task_vector": {inputs.name: mtl}}
        for name, mask in zip(ctx.model_names, masks, strict=True):
            extras[stream_name("mask", name)] = pack_masks_inline({inputs.name: mask})
        return TensorResult(inputs.base + mtl, extras)


def reconstruct_model(
    base: Mapping[str, torch.Tensor],
    task_vector: Mapping[str, torch.Tensor],
    packed_masks: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Task t from tall_masks outputs: θ0 + m_t ⊙ τ_MTL, in the base's dtypes.

    ``packed_masks`` is model t's mask stream (or a mask file with its ``metadata``); tensors
    without a mask (e.g. integer buffers) come from the base unchanged.
    """
    masks = unpack_masks(packed_masks, metadata)
    out = {}
    for key, theta0 in base.items():
        if key in masks:
            rebuilt = reconstruct_task(theta0, task_vector[key], masks[key])
            out[key] = rebuilt.to(theta0.dtype)
        else:
            out[key] = theta0
    return out
