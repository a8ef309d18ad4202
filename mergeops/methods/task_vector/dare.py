"""dare_linear / dare_ties — random drop-and-rescale of task vectors, then task arithmetic or
TIES sign consensus (Yu et al. 2024). Drops are seeded per (seed, tensor, model).

Survivors are rescaled by 1/density (``rescale_by: keep_probability``, the paper's and ckreg's
default) or so that each τ_t keeps its L1 norm (``rescale_by: l1``, what mergekit's
``rescale: true`` does); ``rescale: false`` keeps them as they are. Under a mergekit config
the defaults are mergekit's: density 1, rescale_by l1.

The L1 factor ‖τ_t‖₁ / ‖τ_t ⊙ keep‖₁ sums in float64 lanes (``ops.lanes.lane_sums``), not as
mergekit's float32 ``sum()``, whose last bits follow torch's split of the sum over threads (the
same merge gave other bytes on a machine with more cores). On the CPU a large tensor's masks
and factors then come from one sweep over its row slices (``MaskSweep``), no whole τ_t held.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, ClassVar, Protocol

import torch

from mergeops import kernels
from mergeops.methods.base import MergeContext, TensorInputs, TensorStatsPass, register
from mergeops.methods.task_vector._per_model import available_cores, per_model_stats
from mergeops.methods.task_vector.task_arithmetic import (
    SparseModelParams,
    TaskArithmeticParams,
    TaskVectorMerge,
)
from mergeops.ops.lanes import LANES, lane_sums
from mergeops.ops.packed_cut import PackedMask, pack_bool
from mergeops.ops.prune import RescaleBy, l1_factor, l1_factor_of_lanes
from mergeops.ops.scratch import scratch
from mergeops.ops.sparsify import DareRows, dare_keep, new_pass


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
        return keep, l1_factor(magnitude, keep, in_place=True)

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
        """Each model's keep mask, drawn exactly as unchunked: with the L1 factor (on devices
        other than the CPU, whose L1 case is ``stats_sweep``'s) as a whole mask held bit-packed;
        else on the CPU drawn slice by slice in the merge pass (``DareRows``), on other devices
        whole."""
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

    def stats_sweep(
        self, key: str, shape: tuple[int, ...], ctx: MergeContext
    ) -> TensorStatsPass | None:
        """With the L1 rescale on the CPU: each model's mask and factor from one sweep over the
        slices (``MaskSweep``); else None (``tensor_stats``)."""
        params = ctx.params
        assert isinstance(params, DareParams)
        densities = [p.density for p in ctx.model_params]  # type: ignore[attr-defined]
        if self._rescale_by(params) != "l1" or ctx.device.type != "cpu":
            return None
        numel = math.prod(shape)
        return MaskSweep([
            None if d >= 1 else DareL1Rows(partial(ctx.generator, key, i), d, numel)
            for i, d in enumerate(densities)
        ])  # fmt: skip

    def fused_sparsify(
        self, model: torch.Tensor, base: torch.Tensor, stat: Any, offset: int
    ) -> bool:
        """A packed mask and L1 factor applied to ``model - base`` in one pass
        (``kernels.dare_apply``)."""
        if not isinstance(stat, tuple) or not isinstance(stat[0], PackedMask) or offset % 8:
            return False
        whole, scale = stat
        factor = 1.0 if scale is None else float(scale)
        return kernels.dare_apply(model, base, whole.bits[offset // 8 :], factor)

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


class PackedRowsDraw:
    """What a mask drawn over a tensor's row slices keeps (``DareL1Rows``, DELLA's
    ``DellaRows``): the model's generator, restarted on each new pass; the packed mask; the
    lane sums of |τ| and |τ ⊙ keep|. Slices must come in ascending order, each starting at a
    multiple of 8."""

    method: ClassVar[str]
    """The method's name in errors."""

    def __init__(self, generator: Callable[[], torch.Generator], numel: int) -> None:
        self._generator = generator
        self._gen: torch.Generator | None = None
        self._next = 0
        self.bits = torch.zeros((numel + 7) // 8, dtype=torch.uint8)
        self.lanes = torch.zeros(2 * LANES, dtype=torch.float64)  # |τ|, then |τ ⊙ keep|

    def _start(self, offset: int, count: int) -> torch.Generator:
        """The generator for the slice of ``count`` entries at flat index ``offset``."""
        if new_pass(f"a {self.method} mask", offset, self._next):
            self._gen = self._generator()
            self.lanes.zero_()
        assert self._gen is not None  # the first slice has offset 0
        if offset % 8:
            raise ValueError(f"{self.method}'s slices must start at a multiple of 8, got {offset}")
        self._next = offset + count
        return self._gen


class DareL1Rows(PackedRowsDraw):
    """One model's DARE keep mask with the L1 rescale, drawn a row slice at a time in flat
    order on the CPU (the uniforms of one ``dare_keep`` call, as ``DareRows`` draws them) while
    the lane sums of |τ| and |τ ⊙ keep| add up; the mask is kept packed for the merge pass."""

    method = "DARE"

    def __init__(
        self, generator: Callable[[], torch.Generator], density: float, numel: int
    ) -> None:
        super().__init__(generator, numel)
        self.density = density

    def observe(self, model: torch.Tensor, base: torch.Tensor, offset: int) -> None:
        """Draw the slice of ``model - base`` starting at flat index ``offset``."""
        count = model.numel()
        generator = self._start(offset, count)
        uniform = scratch("dare-uniform", model.shape, torch.float32, model.device)
        torch.rand(model.shape, generator=generator, out=uniform)
        bits = self.bits[offset // 8 : (offset + count + 7) // 8]
        if kernels.dare_sweep(model, base, uniform, self.density, bits, self.lanes):
            return
        keep = uniform < self.density
        magnitude = (model - base).abs_()
        lane_sums(magnitude, self.lanes[:LANES])
        lane_sums(magnitude.mul_(keep), self.lanes[LANES:])
        bits.copy_(pack_bool(keep))

    def result(self) -> tuple[PackedMask, torch.Tensor | None]:
        """The packed mask and the L1 factor (None: not rescaled)."""
        return PackedMask(self.bits), l1_factor_of_lanes(self.lanes[:LANES], self.lanes[LANES:])


class RowsDraw(Protocol):
    """One model's mask drawn over a tensor's row slices in order (``DareL1Rows``, DELLA's
    ``DellaRows``)."""

    def observe(self, model: torch.Tensor, base: torch.Tensor, offset: int) -> None: ...

    def result(self) -> Any: ...


class MaskSweep(TensorStatsPass):
    """One sweep over a tensor's row slices: every model's ``RowsDraw`` (None: nothing drawn).
    ``result()`` is what ``tensor_stats`` gives (masks and L1 factors), without whole τ_t."""

    def __init__(self, models: Sequence[RowsDraw | None]) -> None:
        self.models = models
        drawn = sum(rows is not None for rows in models)
        workers = min(available_cores(), drawn)
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="ckreg-mask") if workers > 1 else None
        )

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        """Every model's slice; on several cores, models side by side (each draws from its own
        generator; torch's serial uniform draw is most of the sweep's time)."""
        base = inputs.base
        assert base is not None
        work = [(rows, model) for rows, model in zip(self.models, inputs.models, strict=True)
                if rows is not None]  # fmt: skip
        if self._pool is None:
            for rows, model in work:
                rows.observe(model, base, offset)
            return
        for future in [
            self._pool.submit(rows.observe, model, base, offset) for rows, model in work
        ]:
            future.result()

    def result(self) -> list[Any]:
        return [None if rows is None else rows.result() for rows in self.models]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


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
