"""Pure math of AdaMerging: merging coefficients learnt by gradient descent on an objective
(the prediction entropy of the merged model on unlabeled inputs, in the paper).

θ(λ) = θ0 + Σ_t λ_t τ_t (task-wise) or θ0 + Σ_t λ_{t,l} τ_{t,l} (layer-wise, one λ per task and
floating tensor). Task vectors are held in memory (in their given dtype: bfloat16 halves it):
the method is for models that fit. The gradient in λ is taken through the merged tensors
(∂L/∂λ_t = Σ_k <∂L/∂θ_k, τ_{t,k}>), so no autograd graph spans the task vectors.
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
    base: Params,
    task_vectors: Sequence[Params],
    lambdas: torch.Tensor,
    keys: Sequence[str],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """θ0 + Σ_t λ τ_t for ``keys`` (λ per task, or per task and key); other tensors are θ0's.

    ``dtype``: compute each merged tensor in it (e.g. float32 from bfloat16-held inputs, one
    tensor at a time); by default in the inputs' dtype."""
    out = dict(base)
    for index, key in enumerate(keys):
        column = lambdas if lambdas.dim() == 1 else lambdas[:, index]
        theta0 = base[key] if dtype is None else base[key].to(dtype)
        out[key] = theta0 + sum(
            (column[t] * (tv[key] if dtype is None else tv[key].to(dtype))
             for t, tv in enumerate(task_vectors)),
            torch.zeros_like(theta0),
        )  # fmt: skip
    return out


def loss_and_grad(
    objective: Objective,
    base: Params,
    task_vectors: Sequence[Params],
    lambdas: torch.Tensor,
    keys: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective at θ(λ) and its gradient in λ: ∂L/∂λ_t = Σ_k <∂L/∂θ_k, τ_{t,k}> (per
    tensor k layer-wise). θ(λ) is built in float32 without a graph through λ, so the inputs
    may be held in bfloat16 and no per-task product is kept for the backward pass."""
    with torch.no_grad():
        merged = merged_params(base, task_vectors, lambdas, keys, torch.float32)
    leaves = [merged[k].requires_grad_() for k in keys]
    with torch.enable_grad():
        loss = objective.loss(merged)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grad = torch.zeros_like(lambdas)
    with torch.no_grad():
        for index, (key, g) in enumerate(zip(keys, grads, strict=True)):
            if g is None:
                continue
            for t, tv in enumerate(task_vectors):
                dot = (g * tv[key].to(g.dtype)).sum()
                if lambdas.dim() == 1:
                    grad[t] += dot
                else:
                    grad[t, index] = dot
    return loss.detach(), grad


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
        loss, lambdas.grad = loss_and_grad(objective, base, task_vectors, lambdas.detach(), keys)
        optimiser.step()
        if clamp is not None:
            with torch.no_grad():
                lambdas.clamp_(*clamp)
        result.losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, result.losses[-1])
    result.lambdas = lambdas.detach().clone()
    return result
