"""regmean_plusplus — RegMean++ (arXiv 2508.03121): RegMean whose Gram matrices are taken
on the merged model itself, layer after layer, so each layer's inputs reflect the merge of
the layers before it.

Start from the average of the models; for each linear weight in forward order, every model's
input Gram is recomputed by running the current merged parameters on that model's data
(a ``GramProbe`` passed as the objective: ``input_grams(params, model_name)``), then that
weight is replaced by the RegMean solution (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹. Other tensors stay
averaged. A whole-model method: all models are held in memory (one forward per layer).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    ModelInputs,
    ModelResult,
    Need,
    WholeModelMethod,
    load_state_dict,
    register,
)
from mergeops.ops.regmean import regmean_linear
from mergeops.sources import GramProbe


class RegMeanPlusPlusParams(MethodParams):
    """``alpha``: weight of the off-diagonal Gram entries (as regmean)."""

    alpha: float = Field(0.9, ge=0, le=1)


@register
class RegMeanPlusPlus(WholeModelMethod):
    """Sequential RegMean on the merged model's own layer inputs."""

    name = "regmean_plusplus"
    paper = "https://arxiv.org/abs/2508.03121"
    params_model = RegMeanPlusPlusParams
    needs = frozenset({Need.OBJECTIVE})
    objective_kind: ClassVar[str] = "gram_probe"

    def validate(self, ctx: MergeContext) -> None:
        if not isinstance(ctx.objective, GramProbe):
            raise MergeError(
                "regmean_plusplus needs a gram probe as its objective (an object with "
                "linear_weights() and input_grams(params, model_name))"
            )

    def merge_model(self, inputs: ModelInputs, ctx: MergeContext) -> ModelResult:
        params = ctx.params
        probe = ctx.objective
        assert isinstance(params, RegMeanPlusPlusParams) and isinstance(probe, GramProbe)
        models = [load_state_dict(source, ctx.device) for source in inputs.models]
        merged = {
            key: torch.stack([m[key] for m in models]).mean(dim=0)
            if tensor.is_floating_point()
            else tensor
            for key, tensor in models[0].items()
        }
        for key in probe.linear_weights():
            if key not in merged:
                raise MergeError(f"gram probe names '{key}', which the models do not have")
            grams = [probe.input_grams(merged, name)[key] for name in ctx.model_names]
            weights = [m[key] for m in models]
            merged[key] = regmean_linear(weights, grams, params.alpha)
        return ModelResult(merged)
