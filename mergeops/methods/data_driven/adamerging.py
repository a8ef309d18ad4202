"""adamerging — task-wise and layer-wise AdaMerging (Yang et al. 2024, arXiv 2310.02575).

θ = θ0 + Σ_t λ_t τ_t (``granularity: task``) or one λ per task and tensor (``layer``); λ is
learnt by Adam (``lr``, ``steps``, optional ``max_seconds`` budget) from ``init`` (0.3),
clamped to [0, 1], minimising the objective — the prediction entropy of the merged model on
unlabeled test inputs in the paper: an evaluator's ``unlabeled_objective()`` (flows pick it
because ``objective_kind`` is ``"unlabeled"``), or any ``Objective`` passed directly.
Outputs: the merged model and the stream ``coefficients`` (``lambda`` (T,) or (T, L) float32
with ``lambda.keys`` listing the tensors' order as a uint8 UTF-8 blob, and ``loss``: the
objective per step, float32); the loss per step is also left in ``ctx.scratch['adamerging_losses']``.
"""

from __future__ import annotations

import json
from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm import tqdm

from mergeops.methods.base import (
    MergeContext,
    MethodParams,
    ModelInputs,
    ModelResult,
    Need,
    WholeModelMethod,
    load_state_dict,
    register,
)
from mergeops.ops.adamerging import learn_coefficients, merged_params


class AdaMergingParams(MethodParams):
    """Learning setup of the merging coefficients."""

    granularity: Literal["task", "layer"] = "layer"
    init: float = Field(0.3, ge=0, le=1)
    steps: int = Field(100, ge=0)
    lr: float = Field(1e-3, gt=0)
    max_seconds: float | None = Field(None, gt=0)
    #: dtype the base and task vectors are held in while λ is learnt: bfloat16 halves their
    #: memory (about 14 instead of 30 bytes per parameter with 4 fine-tunes); the output is
    #: always rebuilt from them in float32.
    hold_dtype: Literal["float32", "bfloat16"] = "float32"


def _tick(bar: tqdm, loss: float) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4g}")


@register
class AdaMerging(WholeModelMethod):
    """Task arithmetic with coefficients learnt by entropy minimisation."""

    name = "adamerging"
    paper = "https://arxiv.org/abs/2310.02575"
    params_model = AdaMergingParams
    needs = frozenset({Need.BASE, Need.OBJECTIVE})
    objective_kind: ClassVar[str] = "unlabeled"

    def merge_model(self, inputs: ModelInputs, ctx: MergeContext) -> ModelResult:
        params = ctx.params
        assert isinstance(params, AdaMergingParams) and inputs.base is not None
        assert ctx.objective is not None
        hold = getattr(torch, params.hold_dtype)
        base = load_state_dict(inputs.base, ctx.device)
        task_vectors = []
        for source in inputs.models:
            model = load_state_dict(source, ctx.device)
            task_vectors.append(
                {k: (model[k] - v).to(hold) for k, v in base.items() if v.is_floating_point()}
            )
            del model
        base = {k: v.to(hold) if v.is_floating_point() else v for k, v in base.items()}
        with tqdm(total=params.steps, desc="adamerging: learning coefficients", unit="step",
                  leave=False, disable=None) as bar:  # fmt: skip
            learnt = learn_coefficients(
                ctx.objective, base, task_vectors, granularity=params.granularity,
                init=params.init, steps=params.steps, lr=params.lr,
                max_seconds=params.max_seconds,
                on_step=lambda _, loss: _tick(bar, loss),
            )  # fmt: skip
        ctx.scratch["adamerging_losses"] = learnt.losses
        ctx.scratch["adamerging_lambdas"] = learnt.lambdas.cpu().tolist()
        with torch.no_grad():
            merged = merged_params(base, task_vectors, learnt.lambdas, learnt.keys, torch.float32)
        order = torch.frombuffer(bytearray(json.dumps(learnt.keys).encode()), dtype=torch.uint8)
        coefficients = {"lambda": learnt.lambdas.float().cpu(), "lambda.keys": order.clone(),
                        "loss": torch.tensor(learnt.losses, dtype=torch.float32)}  # fmt: skip
        return ModelResult(merged, {"coefficients": coefficients})
