"""Hard Frank-Wolfe merging (FW-Merging, arXiv 2503.12649) over a streamed candidate pool.

Candidates are loaded one at a time through a callable and dropped before the next is loaded,
so memory holds θ, ∇f(θ), the base and ONE candidate whatever the pool size.

Reading of METHODS.md taken here (documented choices):
- the oracle aligns the gradient with each candidate's *task vector* τ_k = θ_k - θ0 by default
  (``align_with="task_vector"``): with a shared base, ⟨g, θ_k⟩ and ⟨g, τ_k⟩ rank candidates the
  same, but per-layer cosines of θ_k are dominated by θ0 and barely tell candidates apart;
  ``align_with="parameters"`` uses θ_k literally;
- the step is task arithmetic with the current θ as base and the chosen candidate's parameters
  as the fine-tuned model: θ ← θ + gamma_t·(θ_k - θ), gamma_t = step_size·2/(t+2), t = 0, 1, ….
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from mergeops.sources import Objective

Params = Mapping[str, torch.Tensor]


class Candidate(NamedTuple):
    """A pool member: its name (for errors) and a loader called each time it is needed."""

    name: str
    load: Callable[[], Params]


@dataclass
class FrankWolfeResult:
    """The merged parameters (float32), the oracle's picks per iteration and f before each step."""

    params: dict[str, torch.Tensor]
    picks: list[dict[str, str]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _checked(candidate: Candidate, base: Params) -> Params:
    params = candidate.load()
    missing = sorted(set(base) - set(params))
    if missing:
        raise KeyError(f"candidate '{candidate.name}' lacks tensor(s) {missing[:5]}")
    for key, theta0 in base.items():
        if params[key].shape != theta0.shape:
            raise ValueError(
                f"shape mismatch for '{key}': base {tuple(theta0.shape)}, "
                f"candidate '{candidate.name}' {tuple(params[key].shape)}"
            )
    return params


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return 0.0 if denom == 0.0 else float((a * b).sum()) / denom


def task_arithmetic_start(
    base: Params, candidates: Sequence[Candidate], lam: float = 0.3
) -> dict[str, torch.Tensor]:
    """``θ0 + λ Σ_k τ_k``, streaming the candidates."""
    theta = {key: t.float().clone() for key, t in base.items()}
    for candidate in candidates:
        _add_scaled_task_vector(theta, base, _checked(candidate, base), lam)
    return theta


def _add_scaled_task_vector(theta: dict, base: Params, params: Params, lam: float) -> None:
    for key in theta:
        theta[key] += lam * (params[key].float() - base[key].float())


def objective_gradient(
    objective: Objective, theta: Params, fixed: Params | None = None
) -> tuple[float, dict[str, torch.Tensor]]:
    """``f(θ)`` and ``∇f(θ)`` for the float tensors ``theta`` (zeros where the loss does not
    use one); ``fixed`` (integer buffers) is passed to the objective unchanged."""
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in theta.items()}
    loss = objective.loss({**(fixed or {}), **leaves})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    by_key = {}
    for (key, leaf), grad in zip(leaves.items(), grads, strict=True):
        by_key[key] = torch.zeros_like(leaf) if grad is None else grad.detach()
    return float(loss.detach()), by_key


def layer_scores(
    grad: Params, params: Params, base: Params, align_with: str = "task_vector"
) -> dict[str, float]:
    """Per tensor ``cos(g_l, x_l)`` with x = τ_k (``task_vector``) or θ_k (``parameters``)."""
    scores = {}
    for key, g in grad.items():
        x = params[key].float()
        if align_with == "task_vector":
            x = x - base[key].float()
        scores[key] = _cosine(g.float(), x)
    return scores


def linear_oracle(
    grad: Params,
    base: Params,
    candidates: Sequence[Candidate],
    *,
    granularity: Literal["task", "layer"] = "task",
    align_with: str = "task_vector",
) -> dict[str, int]:
    """Index of the best-aligned candidate per tensor (one index for all under ``task``)."""
    table = [layer_scores(grad, _checked(c, base), base, align_with) for c in candidates]
    if granularity == "task":
        best = min(range(len(table)), key=lambda k: sum(table[k].values()))
        return dict.fromkeys(grad, best)
    return {key: min(range(len(table)), key=lambda k: table[k][key]) for key in grad}


def frank_wolfe_step(
    theta: dict[str, torch.Tensor],
    base: Params,
    candidates: Sequence[Candidate],
    picks: Mapping[str, int],
    gamma: float,
) -> None:
    """In place ``θ_l ← θ_l + gamma·(θ_{k,l} - θ_l)`` for the pick k of every tensor l."""
    for index in sorted(set(picks.values())):
        params = _checked(candidates[index], base)
        for key, chosen in picks.items():
            if chosen == index:
                theta[key] += gamma * (params[key].float() - theta[key])
        del params  # drop this candidate before the next one loads


def frank_wolfe_merge(
    *,
    base: Params,
    candidates: Sequence[Candidate],
    objective: Objective,
    max_iters: int = 10,
    step_size: float = 0.1,
    init_lambda: float = 0.3,
    granularity: Literal["task", "layer"] = "task",
    align_with: Literal["task_vector", "parameters"] = "task_vector",
) -> FrankWolfeResult:
    """Hard FW-Merging: task-arithmetic start, then ``max_iters`` oracle picks and steps.

    Only floating-point tensors are merged; integer buffers come from the base unchanged.
    """
    if not candidates:
        raise ValueError("FW-Merging needs at least one candidate")
    fixed = {k: t for k, t in base.items() if not t.is_floating_point()}
    float_base = {k: t for k, t in base.items() if t.is_floating_point()}
    theta = task_arithmetic_start(float_base, candidates, init_lambda)
    result = FrankWolfeResult(theta)
    with torch.enable_grad():
        for step in range(max_iters):
            loss, grad = objective_gradient(objective, theta, fixed)
            picks = linear_oracle(
                grad, float_base, candidates, granularity=granularity, align_with=align_with
            )
            frank_wolfe_step(theta, float_base, candidates, picks, step_size * 2.0 / (step + 2))
            result.losses.append(loss)
            result.picks.append({key: candidates[k].name for key, k in picks.items()})
    result.params = {**fixed, **theta}
    return result
