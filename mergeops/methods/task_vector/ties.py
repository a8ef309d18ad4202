"""ties — trim, elect sign, disjoint merge (Yadav et al. 2023).

``trim_scope: tensor`` (default) keeps the top-k magnitudes of each tensor's τ_t, as mergekit
does; ``trim_scope: model`` uses one exact top-k threshold over the model's whole flattened
task vector, found by a two-pass radix select (``ops.sparsify.RadixTopK``). Ties at the
threshold are broken by position so exactly k = max(1, ⌊density·n⌋) entries survive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from mergeops.methods.base import (
    MergeContext,
    StatsCollector,
    TensorInputs,
    register,
)
from mergeops.methods.task_vector.task_arithmetic import (
    SparseModelParams,
    TaskArithmeticParams,
    TaskVectorMerge,
)
from mergeops.ops.sparsify import (
    GlobalThreshold,
    RadixTopK,
    TrimCut,
    magnitude_trim,
    tie_cut,
    topk_cut,
)


class TiesParams(TaskArithmeticParams):
    """``normalize`` divides by Σ w_t·[kept_t]; ``trim_scope`` is tensor or model."""

    normalize: bool = True
    trim_scope: Literal["tensor", "model"] = "tensor"


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
class Ties(TaskVectorMerge):
    """θ = θ0 + λ·disjoint_merge(w_t·trim(τ_t))."""

    name = "ties"
    paper = "https://arxiv.org/abs/2306.01708"
    params_model = TiesParams
    model_params_model = SparseModelParams
    sparsification = "magnitude"
    consensus = True

    def stats_collector(self, ctx: MergeContext) -> StatsCollector | None:
        params = ctx.params
        assert isinstance(params, TiesParams)
        if params.trim_scope != "model":
            return None
        return ModelTopK([p.density for p in ctx.model_params])  # type: ignore[attr-defined]

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, TiesParams)
        density = ctx.model_params[index].density  # type: ignore[attr-defined]
        if params.trim_scope == "tensor":
            return magnitude_trim(tau, density)
        cut = ctx.stats[index]
        return tau if cut is None else tau * cut.mask(key, tau.abs())

    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """Each model's trim cut of this tensor, from its whole |τ_t| (one model at a time)."""
        params = ctx.params
        assert isinstance(params, TiesParams)
        cuts: list[TrimCut | None] = []
        for index, model_params in enumerate(ctx.model_params):
            density = model_params.density  # type: ignore[attr-defined]
            cut = ctx.stats[index] if params.trim_scope == "model" else None
            if (params.trim_scope == "tensor" and density >= 1) or (
                params.trim_scope == "model" and cut is None
            ):
                cuts.append(None)
                continue
            magnitude = task_vector(index).abs_()
            if cut is None:
                cuts.append(topk_cut(magnitude, density))
            else:
                cuts.append(tie_cut(magnitude, cut.threshold, cut.tie_quota.get(key, 0)))
            del magnitude
        return cuts

    def sparsify_rows(
        self, tau: torch.Tensor, stat: Any, offset: int, index: int, ctx: MergeContext
    ) -> torch.Tensor:
        """Apply this tensor's precomputed cut to a row slice of τ_t."""
        return tau if stat is None else tau * stat.mask_rows(tau.abs(), offset)
