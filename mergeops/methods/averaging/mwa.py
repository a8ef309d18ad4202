"""mwa — Metrics-Weighted Averaging (arXiv 2504.18580), our reading of its penalty factor p.

w_i ∝ m_i^(-p) for a lower-is-better metric, m_i^p for higher-is-better (``transform:
power``), or w_i ∝ exp(∓p·m_i) (``transform: softmax``); normalized to Σ w = 1, so p = 0 is
the uniform average. θ = Σ w_i θ_i. One metric value per model is required.
"""

from __future__ import annotations

from typing import Literal

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
from mergeops.ops.basic import weighted_sum
from mergeops.ops.weights import metric_weights


class MwaParams(MethodParams):
    """``p`` penalty factor; ``metric_mode`` lower|higher is better; ``transform``."""

    p: float = 1.0
    metric_mode: Literal["lower", "higher"] = "lower"
    transform: Literal["power", "softmax"] = "power"


@register
class MetricsWeightedAverage(StreamingMethod):
    """θ = Σ w_i θ_i with weights from each model's metric value."""

    name = "mwa"
    paper = "https://arxiv.org/abs/2504.18580"
    params_model = MwaParams
    needs = frozenset({Need.METRICS})

    def validate(self, ctx: MergeContext) -> None:
        params = ctx.params
        assert isinstance(params, MwaParams)
        values: list[float] = []
        for name, value in zip(ctx.model_names, ctx.metrics, strict=True):
            if value is None:
                raise MergeError(f"mwa needs a metric value for model '{name}'")
            if params.transform == "power" and params.p != 0 and value <= 0:
                raise MergeError(
                    f"mwa: metric value {value} of model '{name}' must be > 0 for transform 'power'"
                )
            values.append(value)
        ctx.scratch["weights"] = metric_weights(
            values, p=params.p, mode=params.metric_mode, transform=params.transform
        )

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        return TensorResult(weighted_sum(inputs.models, ctx.scratch["weights"]))
