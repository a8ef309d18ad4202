"""slerp — spherical interpolation between the base (t = 0) and one other model, as mergekit's
``slerp`` (https://en.wikipedia.org/wiki/Slerp; Shoemake 1985).

One angle per tensor over the flattened weights; linear interpolation when the tensors are
nearly (anti)parallel (|cos Ω| > 0.9995). Computed in float32 (float64 for float64 inputs) and
returned in the input dtype, as mergekit does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mergeops.methods._arity import require_model_count
from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    SliceStatsMethod,
    TensorInputs,
    TensorStatsPass,
    register,
)
from mergeops.ops.blocks import FlatBlocks, combine_norms, combine_sums
from mergeops.ops.scratch import scratch, scratch_like
from mergeops.ops.spherical import safe_norm, slerp_apply, slerp_coefficients, slerp_work_dtype


class SlerpParams(MethodParams):
    """``t`` (required): 0 gives the base, 1 the other model."""

    t: float


class SlerpStats(TensorStatsPass):
    """Sweep 1: the norms of base and model; sweep 2: the dot product of their directions.
    Result: slerp's two coefficients (a, b), the merge being a·θ0 + b·θ1."""

    def __init__(self, t: float) -> None:
        self.t = t
        self.sweep = 0
        self.blocks = FlatBlocks()
        self.flat_block = self.blocks.block  # fed whole blocks where the engine can
        self.norms: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.unit: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dots: list[torch.Tensor] = []

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        assert inputs.base is not None
        for block in self.blocks.feed([inputs.base, inputs.models[0]]):
            self._block(block)

    def _block(self, block: list[torch.Tensor]) -> None:
        work = slerp_work_dtype(block[0].dtype)
        a, b = _as_work(block[0], work, "slerp-cast-a"), _as_work(block[1], work, "slerp-cast-b")
        if self.unit is None:
            self.norms[0].append(torch.linalg.vector_norm(a, dim=1, keepdim=True))
            self.norms[1].append(torch.linalg.vector_norm(b, dim=1, keepdim=True))
        else:  # (a / |a|) * (b / |b|), in reused buffers
            unit_a = torch.div(a, self.unit[0], out=scratch_like("slerp-a", a))
            unit_b = torch.div(b, self.unit[1], out=scratch_like("slerp-b", b))
            self.dots.append(unit_a.mul_(unit_b).sum(dim=1, keepdim=True))

    def next_pass(self) -> bool:
        for block in self.blocks.flush():
            self._block(block)
        if self.unit is None and self.norms[0]:
            self.unit = (
                safe_norm(combine_norms(self.norms[0])),
                safe_norm(combine_norms(self.norms[1])),
            )
            return True
        return False

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.dots:  # an empty tensor
            return torch.ones(1, 1), torch.zeros(1, 1)
        return slerp_coefficients(self.t, combine_sums(self.dots))


def _as_work(block: torch.Tensor, work: torch.dtype, name: str) -> torch.Tensor:
    """``block`` in the working dtype: itself, or cast into a reused scratch buffer (16-bit
    inputs: a fresh float32 copy per block fragmented the heap by hundreds of MiB)."""
    if block.dtype == work:
        return block
    return scratch(name, block.shape, work, block.device).copy_(block)


@register
class Slerp(SliceStatsMethod):
    """θ = [sin((1-t)Ω)·θ0 + sin(tΩ)·θ1] / sin Ω, Ω the angle between θ0 and θ1."""

    name = "slerp"
    paper = "https://dl.acm.org/doi/10.1145/325165.325242"
    params_model = SlerpParams
    needs = frozenset({Need.BASE})
    mergekit_defaults: ClassVar[dict[str, Any]] = {}
    slices_in_any_dtype: ClassVar[bool] = True  # works in float32 whatever the compute dtype

    def validate(self, ctx: MergeContext) -> None:
        require_model_count(ctx, exactly=1)

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> SlerpStats:
        params = ctx.params
        assert isinstance(params, SlerpParams)
        return SlerpStats(params.t)

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        assert inputs.base is not None
        coef_a, coef_b = stats
        return slerp_apply(
            coef_a.to(inputs.base.device),
            coef_b.to(inputs.base.device),
            inputs.base,
            inputs.models[0],
        )
