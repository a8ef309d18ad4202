"""task_arithmetic — θ0 + λ·Σ w_t τ_t — and the task-vector family built on it.

``TaskVectorMerge`` is one algorithm with switches (sparsification, sign consensus), so ties,
dare_*, breadcrumbs* and della* are subclasses that only set them (as in mergekit). The
combination follows mergekit 0.1.5's operation order in the dtype of the inputs
(``ops.sign_consensus``), so results match mergekit bit for bit in float32.
"""

from __future__ import annotations

import math
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
    reads_no_inputs,
    register,
)
from mergeops.ops.blocked_combine import LANES, blockable, fused_task_arithmetic
from mergeops.ops.sign_consensus import combine_task_vectors

ROWS_BLOCK = 512 * 1024
"""Entries per block of rows in ``merge_rows`` (one 2 MiB float32 slice at the engine's
``CHUNK_BYTES``; larger slices are cut into such blocks). 128K-entry blocks measured no faster
for task_arithmetic/ties and ~3 % slower for della (its per-call row ranks)."""


class TaskArithmeticParams(MethodParams):
    """``lambda`` scales the merged task vector; ``normalize`` divides by Σ w_t.

    ``rescale`` (mergekit's name) rescales sparsified task vectors, so it has no effect
    without sparsification; ``int8_mask`` is accepted for mergekit configs and changes
    nothing here (mergekit uses it to store the sign mask in int8; ckreg's masks are bool).
    """

    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False
    rescale: bool = False
    int8_mask: bool = False


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
    sparsification: ClassVar[Literal["none", "magnitude", "random", "outliers", "ranked"]] = "none"
    consensus: ClassVar[bool] = False
    chunkable: ClassVar[bool] = True
    slices_in_any_dtype: ClassVar[bool] = True
    """The combine is elementwise; the whole-tensor statistics (TIES cuts under mergekit's
    rule, DARE and DELLA masks) are taken on τ in the compute dtype either way. Tested sliced
    against whole for every method in bfloat16 (``tests/mergeops/test_perf_chunking.py``)."""

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        """τ_t after this method's sparsification (identity here)."""
        return tau

    @reads_no_inputs
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
        row = math.prod(base.shape[1:])
        if base.dim() < 2 or row == 0 or row % LANES or not blockable(base, inputs.models):
            taus = [
                self.sparsify_rows(model.sub_(base), stats[i], offset, i, ctx)
                for i, model in enumerate(inputs.models)
            ]
            return self._combine(base, taus, ctx)
        out = torch.empty_like(base)
        if self._plain_sum() and self._fused_rows(base, inputs.models, ctx, out):
            return out
        # Cache-sized blocks of whole rows: τ, its sparsification and the combine of one
        # block run while it is in cache (per element the same operations, so the same bits).
        rows = max(1, ROWS_BLOCK // row)
        for start in range(0, base.shape[0], rows):
            stop = min(base.shape[0], start + rows)
            block = base[start:stop]
            taus = [
                self._sparsified(model[start:stop], block, stats[i], offset + start * row, i, ctx)
                for i, model in enumerate(inputs.models)
            ]  # fmt: skip
            self._combine(block, taus, ctx, out=out[start:stop])
        return out

    def _sparsified(
        self,
        model: torch.Tensor,
        base: torch.Tensor,
        stat: Any,
        offset: int,
        index: int,
        ctx: MergeContext,
    ) -> torch.Tensor:
        """``sparsify_rows`` of τ = ``model - base``, taken in place of ``model`` (an owned
        float32 block): by ``fused_sparsify`` where the method has one, else in two steps."""
        if self.fused_sparsify(model, base, stat, offset):
            return model
        return self.sparsify_rows(model.sub_(base), stat, offset, index, ctx)

    def fused_sparsify(
        self, model: torch.Tensor, base: torch.Tensor, stat: Any, offset: int
    ) -> bool:
        """Overwrite ``model`` with its sparsified τ in one pass, with the bits of
        ``sparsify_rows(model.sub_(base), ...)``; False (nothing written) when not done."""
        return False

    def _plain_sum(self) -> bool:
        """Whether ``merge_rows`` is θ0 + λ Σ w_t (θ_t - θ0): no sparsification, no consensus."""
        return not self.consensus and type(self).sparsify_rows is TaskVectorMerge.sparsify_rows

    def _fused_rows(
        self, base: torch.Tensor, models: list[torch.Tensor], ctx: MergeContext, out: torch.Tensor
    ) -> bool:
        """The plain sum by the fused kernel, τ_t taken per element (one pass over the models,
        the bits of the blocked path); False when it is not available."""
        params = ctx.params
        assert isinstance(params, TaskArithmeticParams)
        weights = [p.weight for p in ctx.model_params]  # type: ignore[attr-defined]
        return fused_task_arithmetic(base, models, weights, normalize=params.normalize,
                                     scale=params.lambda_, out=out)  # fmt: skip

    def _combine(
        self,
        base: torch.Tensor,
        taus: list[torch.Tensor],
        ctx: MergeContext,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, TaskArithmeticParams)
        weights = [p.weight for p in ctx.model_params]  # type: ignore[attr-defined]
        return combine_task_vectors(
            base,
            taus,
            weights,
            consensus=self.consensus,
            normalize=params.normalize,
            scale=params.lambda_,
            out=out,
        )


@register
class TaskArithmetic(TaskVectorMerge):
    """θ = θ0 + λ Σ w_t τ_t (Ilharco et al. 2023)."""

    name = "task_arithmetic"
    paper = "https://arxiv.org/abs/2212.04089"
    params_model = TaskArithmeticParams
    model_params_model = TaskWeightParams
