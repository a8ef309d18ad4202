"""della / della_linear — DELLA-Merging (Deep et al. 2024): MAGPRUNE drops each entry of τ_t
with a probability that falls with its magnitude rank in its row, keep probability
p = (density - ε) + 2ε·rank_norm, then rescales; ``della`` adds TIES sign election and
normalisation by the kept weights, ``della_linear`` sums. θ = θ0 + λ·merged.

Drops are seeded per (seed, tensor, model). Survivors are rescaled by 1/p
(``rescale_by: keep_probability``, the paper's and ckreg's default) or to τ_t's L1 norm
(``rescale_by: l1``, mergekit's ``rescale``, the default under a mergekit config).
Defaults otherwise mergekit's: density 1 (no pruning), epsilon 0.15, della normalize true.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from mergeops.methods.base import MergeContext, MergeError, ModelParams, register
from mergeops.methods.task_vector.dare import DareParams
from mergeops.methods.task_vector.task_arithmetic import TaskVectorMerge
from mergeops.ops.prune import check_della, della_prune


class DellaParams(DareParams):
    """``rescale`` survivors by ``rescale_by`` (keep_probability: 1/p; l1: keep ‖τ_t‖₁)."""


class DellaTiesParams(DellaParams):
    """As ``DellaParams``; ``normalize`` (default true) divides by the kept weights."""

    normalize: bool = True


class DellaModelParams(ModelParams):
    """Per-model ``weight``, mean keep probability ``density`` and its spread ``epsilon``."""

    weight: float = 1.0
    density: float = Field(1.0, gt=0, le=1)
    epsilon: float = Field(0.15, ge=0)


class _Della(TaskVectorMerge):
    paper = "https://arxiv.org/abs/2406.11617"
    model_params_model = DellaModelParams
    sparsification = "ranked"
    chunkable = False
    mergekit_defaults: ClassVar[dict[str, Any]] = {"rescale_by": "l1"}

    def validate(self, ctx: MergeContext) -> None:
        for name, own in zip(ctx.model_names, ctx.model_params, strict=True):
            self._check(own, f"model '{name}'")

    def _check(self, own: ModelParams, where: str) -> None:
        assert isinstance(own, DellaModelParams)
        problem = check_della(own.density, own.epsilon)
        if problem is not None:
            raise MergeError(f"{self.name}: {where}: {problem}")

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        params = ctx.params
        assert isinstance(params, DellaParams)
        own = ctx.model_params[index]
        assert isinstance(own, DellaModelParams)
        self._check(own, f"tensor '{key}', model '{ctx.model_names[index]}'")
        by = params.rescale_by if params.rescale else None
        return della_prune(tau, own.density, own.epsilon, ctx.generator(key, index), by)


@register
class Della(_Della):
    """θ0 + λ·disjoint_merge(w_t MAGPRUNE(τ_t)) / Σ kept w_t."""

    name = "della"
    params_model = DellaTiesParams
    consensus = True


@register
class DellaLinear(_Della):
    """θ0 + λ Σ w_t MAGPRUNE(τ_t)."""

    name = "della_linear"
    params_model = DellaParams
