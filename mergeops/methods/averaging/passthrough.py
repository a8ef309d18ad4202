"""passthrough — one model's tensors unchanged, or times a per-model ``scale``, as mergekit's
``passthrough``. Frankenmerges (``slices`` that copy and renumber layers) are built by the
config layer on top of it; a base, when given, is not used.
"""

from __future__ import annotations

from typing import Any, ClassVar

from mergeops.methods._arity import require_model_count
from mergeops.methods.base import (
    ElementwiseMethod,
    MergeContext,
    MethodParams,
    ModelParams,
    TensorInputs,
    TensorResult,
    register,
)


class PassthroughParams(MethodParams):
    """No global parameters."""


class PassthroughScale(ModelParams):
    """Per-model ``scale``: multiply the tensor by it (None: copy unchanged)."""

    scale: float | None = None


@register
class Passthrough(ElementwiseMethod):
    """θ = θ1 (· scale)."""

    name = "passthrough"
    paper = "https://github.com/arcee-ai/mergekit#passthrough"
    params_model = PassthroughParams
    model_params_model = PassthroughScale
    mergekit_defaults: ClassVar[dict[str, Any]] = {}

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=1)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        scale = ctx.model_params[0].scale  # type: ignore[attr-defined]
        tensor = inputs.models[0]
        return TensorResult(tensor if scale is None else tensor * scale)
