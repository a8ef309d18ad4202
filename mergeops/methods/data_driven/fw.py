"""fw — hard FW-Merging (Chen et al. 2025, arXiv 2503.12649) over a pool of candidates.

Needs a base and an ``Objective`` (a differentiable loss of a parameter dict). Starts from
task arithmetic over the pool (``lambda`` 0.3), then ``max_iters`` times: g = ∇f(θ); pick the
candidate with the lowest Σ_layers cos(g_l, τ_{k,l}) (per layer with ``granularity: layer``);
θ ← θ + gamma_t·(θ_k - θ), gamma_t = step_size·2/(t+2). Candidates are loaded one at a time from their
sources, so memory is constant in the pool size. Reading choices: ``mergeops.ops.frank_wolfe``.
The oracle's picks and the loss per iteration are left in ``ctx.scratch`` (``fw_picks``,
``fw_losses``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    ModelInputs,
    ModelResult,
    Need,
    WholeModelMethod,
    load_state_dict,
    register,
)
from mergeops.ops.frank_wolfe import Candidate, frank_wolfe_merge
from mergeops.sources import TensorSource


class FwParams(MethodParams):
    """Iterations, step size, task-arithmetic start ``lambda``, oracle granularity/alignment."""

    max_iters: int = Field(10, ge=0)
    step_size: float = Field(0.1, gt=0, le=1)
    init_lambda: float = Field(0.3, alias="lambda")
    granularity: Literal["task", "layer"] = "task"
    align_with: Literal["task_vector", "parameters"] = "task_vector"


def _finite_state_dict(source: TensorSource, device: torch.device) -> dict[str, torch.Tensor]:
    params = load_state_dict(source, device)
    for key, tensor in params.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MergeError(f"tensor '{key}' of model '{source.name}' contains NaN or Inf")
    return params


def _loader(source: TensorSource, device: torch.device):
    return lambda: _finite_state_dict(source, device)


@register
class FwMerge(WholeModelMethod):
    """Frank-Wolfe steps toward the candidate best aligned against the objective's gradient."""

    name = "fw"
    paper = "https://arxiv.org/abs/2503.12649"
    params_model = FwParams
    needs = frozenset({Need.BASE, Need.OBJECTIVE})

    def merge_model(self, inputs: ModelInputs, ctx: MergeContext) -> ModelResult:
        params = ctx.params
        assert isinstance(params, FwParams) and inputs.base is not None
        assert ctx.objective is not None
        candidates = [Candidate(src.name, _loader(src, ctx.device)) for src in inputs.models]
        result = frank_wolfe_merge(
            base=_finite_state_dict(inputs.base, ctx.device),
            candidates=candidates,
            objective=ctx.objective,
            max_iters=params.max_iters,
            step_size=params.step_size,
            init_lambda=params.init_lambda,
            granularity=params.granularity,
            align_with=params.align_with,
        )
        ctx.scratch["fw_picks"] = result.picks
        ctx.scratch["fw_losses"] = result.losses
        return ModelResult(result.params)
