"""fisher — Fisher-weighted averaging (Matena & Raffel 2022).

θ = Σ λ_t F̃_t ⊙ θ_t / Σ λ_t F̃_t with F̃ = F + eps; with ``fisher_norm`` each λ_t is divided
by ‖F_t‖ (L2 over all of model t's Fisher tensors, from a first pass).
"""

from __future__ import annotations

import math

from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    ModelParams,
    Need,
    StatsCollector,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.weights import fisher_average


class FisherParams(MethodParams):
    """``eps`` added to F; ``fisher_norm`` divides each λ_t by ‖F_t‖."""

    eps: float = Field(1e-6, gt=0)
    fisher_norm: bool = False


class FisherModelParams(ModelParams):
    """Per-model ``weight`` λ_t (default 1)."""

    weight: float = Field(1.0, gt=0)


class FisherNorms(StatsCollector):
    """Squared L2 norm of every model's Fisher, accumulated over tensors."""

    def __init__(self, count: int) -> None:
        self.squares = [0.0] * count

    def observe(self, inputs: TensorInputs, ctx: MergeContext) -> None:
        for i, fisher in enumerate(inputs.side["fisher"]):
            self.squares[i] += float(fisher.double().pow(2).sum())

    def result(self) -> list[float]:
        return [math.sqrt(s) for s in self.squares]


@register
class FisherMerge(StreamingMethod):
    """Per-entry Fisher-weighted average of the models."""

    name = "fisher"
    paper = "https://arxiv.org/abs/2111.09832"
    params_model = FisherParams
    model_params_model = FisherModelParams
    needs = frozenset({Need.FISHER})

    def stats_collector(self, ctx: MergeContext) -> StatsCollector | None:
        params = ctx.params
        assert isinstance(params, FisherParams)
        return FisherNorms(len(ctx.model_names)) if params.fisher_norm else None

    def _lambdas(self, ctx: MergeContext) -> list[float]:
        lambdas = [p.weight for p in ctx.model_params]  # type: ignore[attr-defined]
        if ctx.stats is None:
            return lambdas
        for name, norm in zip(ctx.model_names, ctx.stats, strict=True):
            if norm == 0:
                raise MergeError(f"fisher: the Fisher of model '{name}' is all zeros")
        return [lam / norm for lam, norm in zip(lambdas, ctx.stats, strict=True)]

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, FisherParams)
        merged = fisher_average(
            inputs.models, inputs.side["fisher"], self._lambdas(ctx), eps=params.eps
        )
        return TensorResult(merged)
