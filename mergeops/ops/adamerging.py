"""Pure math of AdaMerging: merging coefficients learnt by gradient descent on an objective
(the prediction entropy of the merged model on unlabeled inputs, in the paper).

θ(λ) = θ0 + Σ_t λ_t τ_t (task-wise) or θ0 + Σ_t λ_{t,l} τ_{t,l} (layer-wise, one λ per task and
floating tensor). Task vectors are held in memory: the method is for models that fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergeops.sources import Objective

Params = Mapping[str, torch.Tensor]


@dataclass
class LearntCoefficients:
    """λ of shape (T,) or (T, L) over ``keys``, and the objective after each step."""

    lambdas: torch.Tensor
    keys: list[str]
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


def merged_params(
    base: Params, task_vectors: Sequence[Params], lambdas: torch.Tensor, keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """θ0 + Σ_t λ τ_t for ``keys`` (λ per task, or per task and key); other tensors are θ0's."""
    out = dict(base)
    for index, key in enumerate(keys):
        column = lambdas if lambdas.dim() == 1 else lambdas[:, index]
        out[key] = base[key] + sum(
            (column[t] * tv[key] for t, tv in enumerate(task_vectors)), torch.zeros_like(base[key])
        )
    return out


def learn_coefficients(
    objective: Objective,
    base: Params,
    task_vectors: Sequence[Params],
    *,
    granularity: Literal["task", "layer"],
    init: float,
    steps: int,
    lr: float,
    max_seconds: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    on_step: Callable[[int, float], None] | None = None,
) -> LearntCoefficients:
    """Adam on λ minimising ``objective.loss(θ(λ))``; stops after ``steps`` or ``max_seconds``.

    λ starts at ``init`` and is clamped to ``clamp`` after each step (the paper's [0, 1])."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    shape = (len(task_vectors),) if granularity == "task" else (len(task_vectors), len(keys))
    device = next(iter(base.values())).device
    lambdas = torch.full(shape, float(init), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([lambdas], lr=lr)
    result = LearntCoefficients(lambdas.detach(), keys)
    started = time.monotonic()
    for step in range(steps):
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            result.stopped_early = True
            break
        optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = objective.loss(merged_params(base, task_vectors, lambdas, keys))
            loss.backward()
        optimiser.step()
        if clamp is not None:
            with torch.no_grad():
                lambdas.clamp_(*clamp)
        result.losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, result.losses[-1])
    result.lambdas = lambdas.detach().clone()
    return result
