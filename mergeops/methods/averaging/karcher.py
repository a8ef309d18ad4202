"""karcher — the Karcher (Riemannian) mean of the models' directions on the unit hypersphere,
scaled by their mean norm, as mergekit's ``karcher`` (arXiv 2603.04972).

Equal weights over the models. The method takes no base: a ``base`` given to ``merge`` is not
used, while a mergekit config's ``base_model`` is one more input (mergekit appends it to the
models when it is not listed), which the config layer passes as a model.

Every Karcher iterate is a combination of the unit inputs, so in float32 the iteration runs on
N coefficients from the inputs' float64 Gram matrix (``karcher_coefficients``), summed over
fixed blocks in one sweep (``GramStats``), and the merge is Σ b_i·x_i, elementwise, in row
slices for large tensors: one read of the inputs instead of mergekit's 2 + 2·max_iter passes
over whole tensors. Other compute dtypes (a mergekit config's ``dtype: bfloat16``) merge whole
tensors with mergekit's exact arithmetic in that dtype.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from mergeops.methods.averaging._gram import GramStats
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    SliceStatsMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.gram import linear_combination
from mergeops.ops.karcher import karcher_coefficients, karcher_mean


class KarcherParams(MethodParams):
    """``max_iter`` iterations at most; stop when the tangent norm is below ``tol``."""

    max_iter: int = Field(10, ge=0)
    tol: float = 1e-5


@register
class Karcher(SliceStatsMethod):
    """θ = mean‖θ_i‖ · argmin_u Σ d(u, θ_i/‖θ_i‖)² on the sphere."""

    name = "karcher"
    paper = "https://arxiv.org/abs/2603.04972"
    params_model = KarcherParams
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> GramStats | None:
        count = len(ctx.model_params)
        if count == 1:
            return None  # one model: passed through
        params = ctx.params
        assert isinstance(params, KarcherParams)

        def finish(gram: torch.Tensor) -> torch.Tensor:
            alphas = [1.0 / count] * count
            b = karcher_coefficients(gram, alphas, max_iter=params.max_iter, tol=params.tol)
            return b.to(device=gram.device, dtype=torch.float32)

        return GramStats(count, finish, task_vectors=False)

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        if stats is None:
            return inputs.models[0]
        return linear_combination(stats, inputs.models)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        """float32: the Gram sweep and ``merge_rows`` on the whole tensor; other dtypes:
        mergekit's whole-tensor iteration in that dtype."""
        if inputs.models[0].dtype == torch.float32:
            return super().merge_tensor(inputs, ctx)
        params = ctx.params
        assert isinstance(params, KarcherParams)
        tensors = inputs.models
        alphas = [1.0 / len(tensors)] * len(tensors)
        return TensorResult(karcher_mean(tensors, alphas, max_iter=params.max_iter, tol=params.tol))
