"""sce — Select, Calculate, Erase (Wan et al. 2024, FuseChat,
https://arxiv.org/abs/2408.07990): variance-selected positions, energy-based model weights and
TIES sign election, per tensor (``ops.sce``).

Parameters are mergekit's: ``select_topk`` (fraction of positions kept, default 1: all) and
``int8_mask`` (accepted; no effect in ckreg, whose masks are bool). SCE takes no per-model
weights: its weights come from the task vectors themselves.

Large tensors merge in row slices (``SliceStatsMethod``). With ``select_topk`` in (0, 1) a
first sweep writes the variance across models into one whole buffer and selects its top
fraction once (a bool mask is kept, the buffer freed); a sweep over the (selected) task
vectors then sums each model's squares in fixed flat blocks (``ops.blocks``), so the energies,
and the merge, are bit-identical whether a tensor is sliced or whole. mergekit takes the mean
over the whole tensor in one call: the weights agree with it to float32 rounding (within
1e-6 relative), not bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    Need,
    SliceStatsMethod,
    TensorInputs,
    TensorStatsPass,
    register,
)
from mergeops.ops.blocks import FlatBlocks
from mergeops.ops.sce import (
    block_energy,
    energy_of_sums,
    sce_combine,
    task_vectors_of,
    top_variance,
    variance_across,
    weights_of_energy,
)


class SceParams(MethodParams):
    """``select_topk``: fraction in [0, 1] of highest-variance positions kept."""

    select_topk: float = Field(1.0, ge=0, le=1)
    int8_mask: bool = False


def _selected(tvs: torch.Tensor, mask: torch.Tensor | None, offset: int) -> torch.Tensor:
    """The task vectors of one slice times its rows of the selection ``mask`` (flat bool
    over the tensor, or a bool scalar; None: all kept)."""
    if mask is None:
        return tvs
    if mask.dim():
        mask = mask[offset : offset + tvs[0].numel()].view(tvs.shape[1:])
    return tvs * mask


class SceStats(TensorStatsPass):
    """Sweep 1 (0 < select_topk < 1): the variance across models into a whole buffer, then the
    selection mask. Last sweep: each model's Σ τ_t² over fixed blocks. Result: (w_t, mask)."""

    def __init__(self, select_topk: float, numel: int, device: torch.device) -> None:
        self.select_topk, self.numel = select_topk, numel
        self.variance: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        if select_topk <= 0:
            self.mask = torch.zeros((), dtype=torch.bool, device=device)
        self.selecting = 0 < select_topk < 1
        self.blocks = FlatBlocks()
        self.sums: list[torch.Tensor] = []
        self.dtype = torch.float32

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        assert inputs.base is not None
        tvs = task_vectors_of(inputs.base, inputs.models)
        self.dtype = tvs.dtype
        if self.selecting:
            variance = variance_across(tvs).reshape(-1)
            if self.variance is None:
                self.variance = variance.new_empty(self.numel)
            self.variance[offset : offset + variance.numel()] = variance
            return
        for block in self.blocks.feed(list(_selected(tvs, self.mask, offset))):
            self.sums.append(block_energy(block))

    def next_pass(self) -> bool:
        if self.selecting:
            self.selecting = False
            if self.variance is not None:
                self.mask = top_variance(self.variance, self.select_topk)
                self.variance = None
                return True
            return False
        for block in self.blocks.flush():
            self.sums.append(block_energy(block))
        return False

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.sums:  # an empty tensor
            return None, self.mask
        energy = energy_of_sums(self.sums, self.numel, self.dtype)
        return weights_of_energy(energy), self.mask


@register
class Sce(SliceStatsMethod):
    """θ = θ0 + Σ w_t m_t τ_t / Σ w_t m_t with w_t ∝ mean(τ_t²) and m_t the sign mask."""

    name = "sce"
    paper = "https://arxiv.org/abs/2408.07990"
    params_model = SceParams
    needs = frozenset({Need.BASE})

    def stats_pass(self, key: str, shape: tuple[int, ...], ctx: MergeContext) -> SceStats:
        params = ctx.params
        assert isinstance(params, SceParams)
        return SceStats(params.select_topk, math.prod(shape), ctx.device)

    def merge_rows(
        self, inputs: TensorInputs, stats: Any, offset: int, ctx: MergeContext
    ) -> torch.Tensor:
        assert inputs.base is not None
        weights, mask = stats
        tvs = task_vectors_of(inputs.base, inputs.models)
        if mask is not None:
            tvs = _selected(tvs, mask.to(tvs.device), offset)
        if weights is None:  # an empty tensor
            weights = torch.ones(tvs.shape[0], dtype=tvs.dtype) / tvs.shape[0]
        return sce_combine(inputs.base, tvs, weights.to(tvs.device))
