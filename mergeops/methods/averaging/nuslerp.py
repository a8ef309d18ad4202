"""nuslerp — slerp of two models with mergekit's ``nuslerp`` options: per-model weights
(t = w2 / (w1 + w2)), one angle per tensor or per row/column, and task vectors when a base is
given (θ = θ0 + slerp(τ1, τ2)) (https://en.wikipedia.org/wiki/Slerp).

In float32 large tensors merge in row slices: one angle per tensor (``nuslerp_flatten``) or per
column (``nuslerp_row_wise``) comes from one sweep that sums the two inputs' norms and dot
product in float64 over fixed blocks (``GramStats``), then the merge is elementwise; one
angle per row (neither option) needs no statistics. Other compute dtypes (a mergekit config's
``dtype: bfloat16``) merge whole tensors with mergekit's exact arithmetic in that dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mergeops.methods._arity import require_model_count
from mergeops.methods.averaging._gram import GramStats
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    ModelParams,
    Need,
    SliceStatsMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.spherical import (
    nuslerp,
    nuslerp_apply,
    nuslerp_coefficients,
    nuslerp_cosine,
    nuslerp_t,
)


class NuslerpParams(MethodParams):
    """``nuslerp_flatten``: one angle for the whole tensor (default); otherwise one per vector
    along the last dimension, or along the first with ``nuslerp_row_wise``."""

    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True


class NuslerpWeight(ModelParams):
    """Per-model ``weight`` (required, as in mergekit)."""

    weight: float


@dataclass(frozen=True)
class NuslerpAngles:
    """The finished statistics: the coefficients of ``nuslerp_apply`` and which branch runs."""

    coefficients: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    branch: str


def _angles(t: float, gram: torch.Tensor) -> NuslerpAngles:
    coefficients = nuslerp_coefficients(t, nuslerp_cosine(gram))
    collinear = coefficients[3]
    if bool(collinear.all()):
        return NuslerpAngles(coefficients, "linear")
    return NuslerpAngles(coefficients, "mixed" if bool(collinear.any()) else "spherical")


@register
class Nuslerp(SliceStatsMethod):
    """slerp(θ1, θ2; t = w2/(w1+w2)); with a base θ0 + slerp(τ1, τ2)."""

    name = "nuslerp"
    paper = "https://en.wikipedia.org/wiki/Slerp"
    params_model = NuslerpParams
    model_params_model = NuslerpWeight
    optional = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=2)

    @staticmethod
    def _t(ctx: MergeContext) -> float:
        return nuslerp_t([p.weight for p in ctx.model_params])  # type: ignore[attr-defined]

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> GramStats | None:
        params = ctx.params
        assert isinstance(params, NuslerpParams)
        if not params.nuslerp_flatten and not params.nuslerp_row_wise:
            return None  # one angle per row: rows are independent
        t = self._t(ctx)
        columns = 0 if params.nuslerp_flatten else max(1, math.prod(shape[1:]))
        return GramStats(2, lambda gram: _angles(t, gram), columns=columns)

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        t = self._t(ctx)
        first, second = inputs.models
        if inputs.base is not None:
            first, second = first - inputs.base, second - inputs.base
        if stats is None:
            merged = nuslerp(t, first, second, flatten=False)
        else:
            assert isinstance(stats, NuslerpAngles)
            merged = nuslerp_apply(t, stats.coefficients, first, second, branch=stats.branch)
        return merged if inputs.base is None else inputs.base + merged

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        """float32: the statistics sweep and ``merge_rows`` on the whole tensor; other dtypes:
        mergekit's whole-tensor arithmetic in that dtype."""
        if inputs.models[0].dtype == torch.float32:
            return super().merge_tensor(inputs, ctx)
        params = ctx.params
        assert isinstance(params, NuslerpParams)
        t = self._t(ctx)
        first, second = inputs.models
        options = {"row_wise": params.nuslerp_row_wise, "flatten": params.nuslerp_flatten}
        if inputs.base is None:
            return TensorResult(nuslerp(t, first, second, **options))
        base = inputs.base
        return TensorResult(base + nuslerp(t, first - base, second - base, **options))
