"""task_arithmetic — θ0 + λ·Σ w_t τ_t — and the task-vector family built on it.

``TaskVectorMerge`` is one algorithm with switches (sparsification, sign consensus), so ties,
dare_linear and dare_ties are subclasses that only set them (as in mergekit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    ModelParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.basic import disjoint_merge, task_arithmetic


class TaskArithmeticParams(MethodParams):
    """``lambda`` scales the merged task vector; ``normalize`` divides by Σ w_t."""

    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False


class TaskWeightParams(ModelParams):
    """Per-model ``weight`` w_t (default 1)."""

    weight: float = 1.0


class SparseModelParams(ModelParams):
    """Per-model ``weight`` w_t and ``density`` in (0, 1] (fraction of τ_t kept)."""

    weight: float = 1.0
    density: float = Field(0.2, gt=0, le=1)


class TaskVectorMerge(StreamingMethod):
    """Sparsify each τ_t, weight it, then sum (or sign-consensus merge), scale, add to θ0.

    Elementwise, so the engine may merge a large tensor in row chunks (``chunkable``):
    ``tensor_stats`` gets whatever needs the whole tensor first (one model at a time), then
    ``merge_rows`` merges each slice with the same per-element arithmetic as ``merge_tensor``.
    """

    needs = frozenset({Need.BASE})
    sparsification: ClassVar[Literal["none", "magnitude", "random"]] = "none"
    consensus: ClassVar[bool] = False
    chunkable: ClassVar[bool] = True

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        """τ_t after this method's sparsification (identity here)."""
        return tau

    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """Per-model whole-tensor statistics ``sparsify_rows`` needs (none here).

        ``task_vector(i)`` reads the whole float32 τ_i (a fresh tensor the caller may modify).
        """
        return [None] * len(ctx.model_params)

    def sparsify_rows(
        self, tau: torch.Tensor, stat: Any, offset: int, index: int, ctx: MergeContext
    ) -> torch.Tensor:
        """``sparsify`` of a row slice starting at flat index ``offset`` (identity here)."""
        return tau

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        assert inputs.base is not None
        taus = [
            self.sparsify(tau, inputs.name, i, ctx) for i, tau in enumerate(inputs.task_vectors())
        ]
        return TensorResult(self._combine(inputs.base, taus, ctx))

    def merge_rows(
        self, inputs: TensorInputs, stats: list[Any], offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        """The merged rows of one slice; ``inputs`` hold owned float32 slices (τ is taken in
        place) and ``offset`` is the slice's first flat index in the whole tensor."""
        base = inputs.base
        assert base is not None
        taus = [
            self.sparsify_rows(model.sub_(base), stats[i], offset, i, ctx)
            for i, model in enumerate(inputs.models)
        ]
        return self._combine(base, taus, ctx)

    def _combine(
        self, base: torch.Tensor, taus: list[torch.Tensor], ctx: MergeContext
    ) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, TaskArithmeticParams)
        weights = [p.weight for p in ctx.model_params]  # type: ignore[attr-defined]
        if not self.consensus:
            return task_arithmetic(
                base, taus, weights, scale=params.lambda_, normalize=params.normalize
            )
        deltas = torch.stack([w * tau for w, tau in zip(weights, taus, strict=True)])
        delta = disjoint_merge(deltas, weights, normalize=params.normalize)
        return base + params.lambda_ * delta


@register
class TaskArithmetic(TaskVectorMerge):
    """θ = θ0 + λ Σ w_t τ_t (Ilharco et al. 2023)."""

    name = "task_arithmetic"
    paper = "https://arxiv.org/abs/2212.04089"
    params_model = TaskArithmeticParams
    model_params_model = TaskWeightParams
