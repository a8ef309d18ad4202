"""della / della_linear — DELLA-Merging (Deep et al. 2024): MAGPRUNE drops each entry of τ_t
with a probability that falls with its magnitude rank in its row, keep probability
p = (density - ε) + 2ε·rank_norm, then rescales; ``della`` adds TIES sign election and
normalisation by the kept weights, ``della_linear`` sums. θ = θ0 + λ·merged.

Drops are seeded per (seed, tensor, model). Survivors are rescaled by 1/p
(``rescale_by: keep_probability``, the paper's and ckreg's default) or to τ_t's L1 norm
(``rescale_by: l1``, mergekit's ``rescale``, the default under a mergekit config).
Defaults otherwise mergekit's: density 1 (no pruning), epsilon 0.15, della normalize true.

Ranks are taken within rows, so large tensors merge in row slices. On the CPU one sweep over
the slices draws each model's keep mask (``DellaRows``: each slice's rows ranked, one float32
uniform per entry in flat order, so the mask is the one a single whole-tensor draw gives) and
adds up its L1 factor's lane sums; the masks are held bit-packed (``ops.packed_cut``) and no
whole τ is held. Elsewhere ``tensor_stats`` draws from the whole τ. Each slice of the merge
recomputes its rows' keep probabilities when survivors are rescaled by 1/p.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    ModelParams,
    TensorStatsPass,
    register,
)
from mergeops.methods.task_vector.dare import DareParams, MaskSweep, PackedRowsDraw
from mergeops.methods.task_vector.task_arithmetic import TaskVectorMerge
from mergeops.ops.lanes import LANES, lane_sums
from mergeops.ops.packed_cut import PackedMask, pack_bool
from mergeops.ops.prune import (
    bernoulli_cpu,
    check_della,
    della_keep_probability,
    della_prune,
    l1_factor_of_lanes,
    l1_factor_of_tau,
)
from mergeops.ops.scratch import scratch_like


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
        for index, own in enumerate(self._drawing(key, ctx)):
            if own is None:
                stats.append(None)
                continue
            tau = task_vector(index)
            keep = _draw_keep(tau, own, ctx.generator(key, index))
            scale = None
            if params.rescale and params.rescale_by == "l1":
                scale = l1_factor_of_tau(tau, keep)
            stats.append((PackedMask.of(keep), scale))
        return stats

    def stats_sweep(
        self, key: str, shape: tuple[int, ...], ctx: MergeContext
    ) -> TensorStatsPass | None:
        """On the CPU: each model's keep mask (and L1 factor) drawn over one sweep of the row
        slices (``DellaRows``), the draws of ``tensor_stats``; elsewhere None."""
        params = ctx.params
        assert isinstance(params, DellaParams)
        if ctx.device.type != "cpu":
            return None
        l1, numel = params.rescale and params.rescale_by == "l1", math.prod(shape)
        return MaskSweep([
            None if own is None else DellaRows(partial(ctx.generator, key, i), own, numel, l1)
            for i, own in enumerate(self._drawing(key, ctx))
        ])  # fmt: skip

    def _drawing(self, key: str, ctx: MergeContext) -> list[DellaModelParams | None]:
        """Each model's params where it draws a mask for tensor ``key`` (checked), None where
        its density is 1."""
        drawing: list[DellaModelParams | None] = []
        for index, own in enumerate(ctx.model_params):
            assert isinstance(own, DellaModelParams)
            if own.density < 1:
                self._check(own, f"tensor '{key}', model '{ctx.model_names[index]}'")
            drawing.append(own if own.density < 1 else None)
        return drawing

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


class DellaRows(PackedRowsDraw):
    """One model's DELLA keep mask drawn a row slice at a time on the CPU: each slice's rows
    ranked and drawn as ``_draw_keep`` draws them (one float32 uniform per entry, in flat
    order: slice after slice, the uniforms of one whole draw), the mask kept packed and, for
    the L1 rescale, the lane sums of |τ| and |τ ⊙ keep| added up. No whole τ is held."""

    method = "DELLA"

    def __init__(
        self,
        generator: Callable[[], torch.Generator],
        own: DellaModelParams,
        numel: int,
        l1: bool,
    ) -> None:
        super().__init__(generator, numel)
        self.own, self.l1 = own, l1

    def observe(self, model: torch.Tensor, base: torch.Tensor, offset: int) -> None:
        """Draw the rows of ``model - base`` starting at flat index ``offset``."""
        count = model.numel()
        generator = self._start(offset, count)
        tau = torch.sub(model, base, out=scratch_like("della-tau", model))
        probs = della_keep_probability(tau, self.own.density, self.own.epsilon)
        keep = bernoulli_cpu(probs, generator)
        self.bits[offset // 8 : (offset + count + 7) // 8].copy_(pack_bool(keep.reshape(-1)))
        if self.l1:
            magnitude = tau.abs_()
            lane_sums(magnitude, self.lanes[:LANES])
            lane_sums(magnitude.mul_(keep.reshape(magnitude.shape)), self.lanes[LANES:])

    def result(self) -> tuple[PackedMask, torch.Tensor | None]:
        """The packed mask and the L1 factor (None: not rescaled by L1, or below ``L1_EPS``)."""
        scale = l1_factor_of_lanes(self.lanes[:LANES], self.lanes[LANES:]) if self.l1 else None
        return PackedMask(self.bits), scale


def _draw_keep(
    tau: torch.Tensor, own: DellaModelParams, generator: torch.Generator
) -> torch.Tensor:
    """τ's bool keep mask (viewed with at least two dimensions), drawn as ``della_prune`` draws
    it on a non-CPU device (on the CPU, ``DellaRows`` draws the same over row slices)."""
    probs = della_keep_probability(tau, own.density, own.epsilon)
    return torch.bernoulli(probs, generator=generator).to(torch.bool)


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
