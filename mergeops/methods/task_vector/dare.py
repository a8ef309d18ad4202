"""dare_linear / dare_ties — random drop-and-rescale of task vectors, then task arithmetic or
TIES sign consensus (Yu et al. 2024). Drops are seeded per (seed, tensor, model).

Survivors are rescaled by 1/density (``rescale_by: keep_probability``, the paper's and ckreg's
default) or so that each τ_t keeps its L1 norm (``rescale_by: l1``, what mergekit's
``rescale: true`` does); ``rescale: false`` keeps them as they are. Under a mergekit config
the defaults are mergekit's: density 1, rescale_by l1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import torch

from mergeops.methods.base import MergeContext, register
from mergeops.methods.task_vector._per_model import per_model_stats
from mergeops.methods.task_vector.task_arithmetic import (
    SparseModelParams,
    TaskArithmeticParams,
    TaskVectorMerge,
)
from mergeops.ops.packed_cut import PackedMask
from mergeops.ops.prune import RescaleBy, l1_scale_of_magnitude
from mergeops.ops.sparsify import DareRows, dare_keep


class DareParams(TaskArithmeticParams):
    """``rescale`` survivors (default true) by ``rescale_by``: keep_probability (1/density)
    or l1 (keep ‖τ_t‖₁, mergekit's)."""

    rescale: bool = True
    rescale_by: RescaleBy = "keep_probability"


def dare_rows(
    tau: torch.Tensor, keep: torch.Tensor, density: float, scale: torch.Tensor | None, by: str
) -> torch.Tensor:
    """τ ⊙ keep rescaled: by 1/density, or by the precomputed L1 factor ``scale``; in place
    (``tau`` is an owned slice; the same products and quotient as out of place)."""
    masked = tau.mul_(keep)
    if by == "keep_probability":
        return masked.div_(density)
    return masked if scale is None else masked.mul_(scale)


class _Dare(TaskVectorMerge):
    paper = "https://arxiv.org/abs/2311.03099"
    params_model = DareParams
    model_params_model = SparseModelParams
    sparsification = "random"
    mergekit_defaults: ClassVar[dict[str, Any]] = {"density": 1.0, "rescale_by": "l1"}

    def _draw(
        self, key: str, tau: torch.Tensor, index: int, ctx: MergeContext, *, owned: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Model ``index``'s keep mask for tensor ``key`` and its L1 factor (None: keep all);
        ``owned``: τ may be overwritten (its magnitude is then taken in place)."""
        params = ctx.params
        assert isinstance(params, DareParams)
        density = ctx.model_params[index].density  # type: ignore[attr-defined]
        keep = dare_keep(tau.shape, density, ctx.generator(key, index), ctx.device)
        if keep is None or self._rescale_by(params) != "l1":
            return None if keep is None else (keep, None)
        magnitude = tau.abs_() if owned else tau.abs()  # |τ ⊙ keep| = |τ| ⊙ keep, bit for bit
        return keep, l1_scale_of_magnitude(magnitude, keep, in_place=True)

    @staticmethod
    def _rescale_by(params: DareParams) -> str:
        return params.rescale_by if params.rescale else "none"

    def sparsify(self, tau: torch.Tensor, key: str, index: int, ctx: MergeContext) -> torch.Tensor:
        return self.sparsify_rows(tau, self._draw(key, tau, index, ctx), 0, index, ctx)

    def tensor_stats(
        self,
        key: str,
        shape: tuple[int, ...],
        task_vector: Callable[[int], torch.Tensor],
        ctx: MergeContext,
    ) -> list[Any]:
        """Each model's keep mask, drawn exactly as unchunked: with the L1 factor (which needs the
        whole mask and τ_t) as a whole mask, held bit-packed, two models at a time on the CPU
        for tensors up to ``PARALLEL_MAX_NUMEL``; else on the CPU drawn slice by slice in the
        merge pass (``DareRows``), on other devices whole."""
        params = ctx.params
        assert isinstance(params, DareParams)
        densities = [p.density for p in ctx.model_params]  # type: ignore[attr-defined]
        if self._rescale_by(params) == "l1":
            return per_model_stats(
                [d < 1 for d in densities],
                task_vector,
                lambda index, tau: _packed(self._draw(key, tau, index, ctx, owned=True)),
                None,
                numel=math.prod(shape),
                device=ctx.device,
            )
        stats: list[Any] = []
        for i, density in enumerate(densities):
            if density >= 1:
                stats.append(None)
            elif ctx.device.type == "cpu":
                stats.append(DareRows(partial(ctx.generator, key, i), density))
            else:
                stats.append((dare_keep(shape, density, ctx.generator(key, i), ctx.device), None))
        return stats

    def sparsify_rows(
        self, tau: torch.Tensor, stat: Any, offset: int, index: int, ctx: MergeContext
    ) -> torch.Tensor:
        """Apply a row slice of this tensor's keep mask (same random numbers as unchunked)."""
        if stat is None:
            return tau
        params = ctx.params
        assert isinstance(params, DareParams)
        density = ctx.model_params[index].density  # type: ignore[attr-defined]
        if isinstance(stat, DareRows):
            keep, scale = stat.keep_rows(tau, offset), None
        else:
            whole, scale = stat
            if isinstance(whole, PackedMask):
                keep = whole.rows(offset, tau)
            else:
                keep = whole.reshape(-1)[offset : offset + tau.numel()].reshape(tau.shape)
        return dare_rows(tau, keep, density, scale, self._rescale_by(params))


def _packed(
    drawn: tuple[torch.Tensor, torch.Tensor | None] | None,
) -> tuple[PackedMask, torch.Tensor | None] | None:
    """A whole keep mask held until the merge pass as bits (1/8 of a bool mask)."""
    return None if drawn is None else (PackedMask.of(drawn[0]), drawn[1])


@register
class DareLinear(_Dare):
    """θ0 + λ Σ w_t DARE(τ_t)."""

    name = "dare_linear"


@register
class DareTies(_Dare):
    """θ0 + λ·disjoint_merge(w_t DARE(τ_t))."""

    name = "dare_ties"
    consensus = True
