"""nearswap — interpolate towards the other model only where it is close to the base, as
mergekit's ``nearswap`` (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001):
w = clamp(t / |θ0 - θ1|, 0, 1), θ = w·θ1 + (1 - w)·θ0. Elementwise, in the inputs' dtype.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mergeops.methods._arity import require_model_count
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.fusion import nearswap


class NearswapParams(MethodParams):
    """``t`` (required): the distance below which entries are taken from the other model."""

    t: float


@register
class Nearswap(StreamingMethod):
    """Entries within ``t`` of the base come from the other model; farther ones move t/|Δ|."""

    name = "nearswap"
    paper = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    params_model = NearswapParams
    needs = frozenset({Need.BASE})
    chunkable: ClassVar[bool] = True
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=1)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, NearswapParams) and inputs.base is not None
        return TensorResult(nearswap(inputs.base, inputs.models[0], params.t))

    def tensor_stats(
        self, key: str, shape: tuple[int, ...], task_vector: Any, ctx: MergeContext
    ) -> list[Any]:
        """No whole-tensor statistics (elementwise)."""
        return [None] * len(ctx.model_params)

    def merge_rows(
        self, inputs: TensorInputs, stats: list[Any], offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        """The merged rows of one slice (elementwise, so the same as ``merge_tensor``)."""
        merged = self.merge_tensor(inputs, ctx).merged
        assert merged is not None
        return merged
