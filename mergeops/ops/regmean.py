"""Pure math of RegMean (Jin et al. 2023): the linear layer that best reproduces every
model's outputs on its own inputs, in closed form from the inputs' Gram matrices."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = alpha·G + (1 - alpha)·diag(G): RegMean's regularisation toward plain averaging."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_linear(
    weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float
) -> torch.Tensor:
    """W = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹ for weights (out, in) and Grams (in, in), in float64.

    Solved as a linear system (never an explicit inverse); a singular Σ G̃ falls back to the
    least-squares solution."""
    shrunk = [shrink_off_diagonal(g.double(), alpha) for g in grams]
    total = torch.stack(shrunk).sum(dim=0)
    rhs = sum((g @ w.double().T for g, w in zip(shrunk, weights, strict=True)),
              torch.zeros_like(weights[0].double().T))  # fmt: skip
    solution, info = torch.linalg.solve_ex(total, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(total, rhs).solution
    return solution.T.to(weights[0].dtype)
