"""emr — EMR-Merging: Elect, Mask & Rescale (Huang et al. 2024, arXiv 2405.17461).

Per tensor: a unified task vector τ_uni (elected sign s = sign Σ τ_t, magnitude the largest
|τ_t| agreeing with s); per task a mask m_t = [τ_t ⊙ τ_uni > 0] and a rescaler
g_t = Σ|τ_t| / Σ|m_t ⊙ τ_uni| (per tensor). Outputs: θ0 + τ_uni (main), the stream
``task_vector`` (τ_uni, float32), ``mask.<model>`` (bit-packed, as tall_masks) and
``rescale.<model>`` (g_t per tensor, a one-element float32 tensor). Task t is served as
θ0 + g_t·m_t ⊙ τ_uni with :func:`reconstruct_model`, like a TALL member.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.methods.curvature.ffg import stream_name
from mergeops.ops.competition import emr_mask_and_scale, emr_unify
from mergeops.ops.masks import pack_masks_inline, unpack_masks


class EmrParams(MethodParams):
    """No parameters: EMR is tuning-free."""


@register
class Emr(StreamingMethod):
    """Unified task vector plus per-task masks and rescalers."""

    name = "emr"
    paper = "https://arxiv.org/abs/2405.17461"
    params_model = EmrParams
    needs = frozenset({Need.BASE})

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        assert inputs.base is not None
        taus = inputs.task_vectors()
        unified = emr_unify(torch.stack(taus))
        extras = {"task_vector": {inputs.name: unified.float()}}
        for name, tau in zip(ctx.model_names, taus, strict=True):
            mask, scale = emr_mask_and_scale(tau, unified)
            extras[stream_name("mask", name)] = pack_masks_inline({inputs.name: mask})
            extras[stream_name("rescale", name)] = {
                inputs.name: torch.tensor([scale], dtype=torch.float32)
            }
        return TensorResult(inputs.base + unified, extras)


def reconstruct_model(
    base: Mapping[str, torch.Tensor],
    task_vector: Mapping[str, torch.Tensor],
    packed_masks: Mapping[str, torch.Tensor],
    rescale: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Task t from emr outputs: θ0 + g_t·m_t ⊙ τ_uni in the base's dtypes (tensors without a
    mask, e.g. integer buffers, come from the base unchanged)."""
    masks = unpack_masks(packed_masks)
    out = {}
    for key, theta0 in base.items():
        if key not in masks:
            out[key] = theta0
            continue
        gamma = float(rescale[key].reshape(-1)[0])
        delta = gamma * masks[key].to(theta0.device) * task_vector[key].to(theta0.device)
        out[key] = (theta0.float() + delta).to(theta0.dtype)
    return out
