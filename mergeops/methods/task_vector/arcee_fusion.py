"""arcee_fusion — keep the fine-tune's changes where their importance is an outlier, as
mergekit's ``arcee_fusion`` (https://arcee.ai): I = |θ1 - θ0| ⊙ KL(softmax θ1 ‖ softmax θ0)
per row; θ = θ0 + (θ1 - θ0)·[I ≥ median(I) + 1.5·IQR(I)]. Base + exactly one model.

Quartiles are exact order statistics (mergekit's, for tensors up to 1M entries; above that
mergekit estimates them from a random sample, so its results there are not reproducible).

Large tensors merge in row slices (``SliceStatsMethod``): one sweep computes every row's KL
(rows are whole in a slice) and gathers the importances into one float32 buffer, the tensor's
only whole-sized allocation, whose quartiles are selected in place; the merge then multiplies
the stored row KLs by |θ1 - θ0| slice by slice, so it is bit-identical to the whole-tensor merge.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from mergeops.methods._arity import require_model_count
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    SliceStatsMethod,
    TensorInputs,
    TensorStatsPass,
    register,
)
from mergeops.ops.fusion import (
    fusion_apply,
    fusion_importance,
    fusion_threshold,
    quartiles_in_place,
    row_kl,
)


class ArceeFusionParams(MethodParams):
    """No parameters."""


class FusionStats(TensorStatsPass):
    """One sweep: every row's KL and every entry's importance (into one flat buffer, float32
    or float64 for float64 inputs: exact for every narrower dtype). Result: (row KLs flat,
    threshold)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.numel = math.prod(shape)
        self.row = max(shape[-1], 1) if shape else 1
        self.kl: torch.Tensor | None = None
        self.importance: torch.Tensor | None = None

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        assert inputs.base is not None
        if not self.numel:
            return
        model, base = inputs.models[0], inputs.base
        kl = row_kl(model, base)
        if self.kl is None or self.importance is None:
            work = torch.float64 if kl.dtype == torch.float64 else torch.float32
            self.kl = torch.empty(self.numel // self.row, dtype=kl.dtype, device=kl.device)
            self.importance = torch.empty(self.numel, dtype=work, device=kl.device)
        rows = offset // self.row
        self.kl[rows : rows + kl.numel()] = kl.reshape(-1)
        into = self.importance[offset : offset + model.numel()].view(model.shape)
        if into.dtype == kl.dtype:  # float32: straight into the buffer
            fusion_importance(model, base, kl, out=into)
        else:
            into.copy_(fusion_importance(model, base, kl))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kl is None or self.importance is None or not self.numel:  # an empty tensor
            return torch.zeros(0), torch.zeros(())
        kl, importance = self.kl, self.importance
        self.kl = self.importance = None
        threshold = fusion_threshold(quartiles_in_place(importance), kl.dtype)
        return kl, threshold


@register
class ArceeFusion(SliceStatsMethod):
    """θ0 plus the fine-tune's task vector where its KL-weighted importance is an outlier."""

    name = "arcee_fusion"
    paper = "https://arcee.ai"
    params_model = ArceeFusionParams
    needs = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=1)

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> FusionStats:
        return FusionStats(shape)

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        assert inputs.base is not None
        model, base = inputs.models[0], inputs.base
        kl_rows, threshold = stats
        if not model.numel():  # mergekit's float32 mask would promote the (empty) result
            return torch.empty_like(model, dtype=torch.promote_types(model.dtype, torch.float32))
        row = model.shape[-1] if model.dim() else 1
        kl = kl_rows[offset // row : (offset + model.numel()) // row]
        kl = kl.reshape(*model.shape[:-1], 1) if model.dim() else kl.reshape(())
        return fusion_apply(base, model, kl, threshold)
