"""della / della_linear — DELLA-Merging (Deep et al. 2024): MAGPRUNE drops each entry of τ_t
with a probability that falls with its magnitude rank in its row, keep probability
p = (density - ε) + 2ε·rank_norm, then rescales; ``della`` adds TIES sign election and
normalisation by the kept weights, ``della_linear`` sums. θ = θ0 + λ·merged.

Drops are seeded per (seed, tensor, model). Survivors are rescaled by 1/p
(``rescale_by: keep_probability``, the paper's and ckreg's default) or to τ_t's L1 norm
(``rescale_by: l1``, mergekit's ``rescale``, the default under a mergekit config).
Defaults otherwise mergekit's: density 1 (no pruning), epsilon 0.15, della normalize true.

Ranks are taken within rows, so large tensors merge in row slices: ``tensor_stats`` draws each
model's whole keep mask (the same random numbers as unchunked) and L1 factor, and each slice
recomputes its rows' keep probabilities when survivors are rescaled by 1/p. On CPU the keep
probabilities and draws go ``KEEP_ROWS_ELEMENTS`` at a time (``torch.bernoulli`` draws in
element order there, so the mask is the one a single call gives), and the masks are held
bit-packed (``ops.packed_cut``): the whole-tensor rank temporaries (int64 orders and ranks)
are what set this method's peak memory otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field

from mergeops.methods.base import MergeContext, MergeError, ModelParams, register
from mergeops.methods.task_vector._per_model import all_cores
from mergeops.methods.task_vector.dare import DareParams
from mergeops.methods.task_vector.task_arithmetic import TaskVectorMerge
from mergeops.ops.packed_cut import PackedMask
from mergeops.ops.prune import (
    bernoulli_cpu,
    check_della,
    della_keep_probability,
    della_prune,
    l1_factor_of_tau,
)

KEEP_ROWS_ELEMENTS = 1024 * 1024
"""Entries per block of rows whose keep probabilities are computed and drawn at once (CPU)."""


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

    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """Each model's whole keep mask (bool) and, with ``rescale_by: l1``, its L1 factor."""
        params = ctx.params
        assert isinstance(params, DellaParams)
        stats: list[Any] = []
        for index, own in enumerate(ctx.model_params):
            assert isinstance(own, DellaModelParams)
            if own.density >= 1:
                stats.append(None)
                continue
            self._check(own, f"tensor '{key}', model '{ctx.model_names[index]}'")
            tau = task_vector(index)
            keep = _draw_keep(tau, own, ctx.generator(key, index))
            scale = None
            if params.rescale and params.rescale_by == "l1":
                scale = l1_factor_of_tau(tau, keep)
            stats.append((PackedMask.of(keep), scale))
        return stats

    def sparsify_rows(
        self, tau: torch.Tensor, stat: Any, offset: int, index: int, ctx: MergeContext
    ) -> torch.Tensor:
        """``della_prune`` of a row slice, with the slice of the whole keep mask."""
        if stat is None:
            return tau
        params = ctx.params
        assert isinstance(params, DellaParams)
        packed, scale = stat
        masked = tau * packed.rows(offset, tau)
        if not params.rescale:
            return masked
        if params.rescale_by == "l1":
            return masked if scale is None else masked * scale
        own = ctx.model_params[index]
        assert isinstance(own, DellaModelParams)
        return masked / della_keep_probability(tau, own.density, own.epsilon)


def _draw_keep(
    tau: torch.Tensor, own: DellaModelParams, generator: torch.Generator
) -> torch.Tensor:
    """τ's bool keep mask (viewed with at least two dimensions), drawn as ``della_prune`` draws
    it; on CPU a block of rows at a time (the same draws, in the same order)."""
    rows = tau if tau.dim() >= 2 else tau.unsqueeze(0)
    if tau.device.type != "cpu":
        probs = della_keep_probability(tau, own.density, own.epsilon)
        return torch.bernoulli(probs, generator=generator).to(torch.bool)
    keep = torch.empty(rows.shape, dtype=torch.bool)
    step = max(1, KEEP_ROWS_ELEMENTS // max(1, rows[0].numel()))
    with all_cores():  # the row ranks split over the cores
        for start in range(0, rows.shape[0], step):
            block = rows[start : start + step]
            probs = della_keep_probability(block, own.density, own.epsilon)
            keep[start : start + step] = bernoulli_cpu(probs, generator)
    return keep


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
