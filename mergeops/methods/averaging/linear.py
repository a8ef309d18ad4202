"""linear — weighted average of the models (mergekit ``linear``)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    ModelParams,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    reads_no_inputs,
    register,
)
from mergeops.ops.basic import weighted_average


class LinearParams(MethodParams):
    """``normalize``: divide by Σ w (mergekit's default true)."""

    normalize: bool = True


class WeightParams(ModelParams):
    """Per-model ``weight`` w_t (default 1)."""

    weight: float = 1.0


@register
class Linear(StreamingMethod):
    """θ = Σ w_t θ_t / Σ w_t; the base, when given, is not part of the average."""

    name = "linear"
    paper = "https://arxiv.org/abs/2203.05482"
    params_model = LinearParams
    model_params_model = WeightParams
    chunkable: ClassVar[bool] = True
    slices_in_any_dtype: ClassVar[bool] = True  # elementwise, 16-bit inputs included

    def validate(self, ctx: MergeContext) -> None:
        params = ctx.params
        assert isinstance(params, LinearParams)
        total = sum(p.weight for p in ctx.model_params)  # type: ignore[attr-defined]
        if params.normalize and abs(total) < 1e-8:
            raise MergeError(f"linear: weights of models {ctx.model_names} sum to {total}")

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, LinearParams)
        weights = [p.weight for p in ctx.model_params]  # type: ignore[attr-defined]
        if inputs.models[0].dtype in (torch.float16, torch.bfloat16):
            return TensorResult(_accumulated(inputs.models, weights, params.normalize))
        return TensorResult(weighted_average(inputs.models, weights, normalize=params.normalize))

    def merge_rows(
        self, inputs: TensorInputs, stats: list[Any], offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        """The merged rows of one slice (elementwise, so the same as ``merge_tensor``)."""
        merged = self.merge_tensor(inputs, ctx).merged
        assert merged is not None
        return merged

    @reads_no_inputs
    def tensor_stats(
        self, key: str, shape: tuple[int, ...], task_vector: Any, ctx: MergeContext
    ) -> list[Any]:
        """No whole-tensor statistics."""
        return [None] * len(ctx.model_params)


def _accumulated(models: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """16-bit inputs (a mergekit config's ``dtype``): accumulated in float32 in model order,
    divided by the float32 weight sum and rounded once, as mergekit's linear does."""
    coefficients = torch.tensor(weights, dtype=torch.float32, device=models[0].device)
    result = torch.zeros_like(models[0], dtype=torch.float32)
    for model, coefficient in zip(models, coefficients.unbind(0), strict=True):
        result.addcmul_(model, coefficient)
    if normalize:
        result.div_(coefficients.sum())
    return result.to(models[0].dtype)
