"""The weighted Karcher (Riemannian) mean of tensors on the unit hypersphere, as mergekit 0.1.5
computes it: norms in float32 (float64 for float64 inputs), directions in the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor.to(_work_dtype(tensor)))


def _unit(tensor: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype)


def _initial_mean(
    units: Sequence[torch.Tensor], alphas: Sequence[float], tol: float
) -> torch.Tensor:
    """The normalised weighted Euclidean mean of the directions (the first one if it is ~0)."""
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units, strict=True):
        mean += alpha * unit
    norm = _norm(mean)
    return units[0].clone() if norm.item() < tol else (mean / norm).to(mean.dtype)


def _tangent(
    mean: torch.Tensor, units: Sequence[torch.Tensor], alphas: Sequence[float], tol: float
) -> torch.Tensor:
    """Σ a_i·log_mean(u_i): the weighted sum of the directions' log maps at ``mean``."""
    tangent = torch.zeros_like(mean)
    for alpha, unit in zip(alphas, units, strict=True):
        dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
        theta = torch.arccos(dot)
        if theta.item() < tol:
            continue
        tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
    return tangent


def karcher_mean(
    tensors: Sequence[torch.Tensor],
    alphas: Sequence[float],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Σ a_i‖x_i‖ times the Karcher mean of the directions x_i/‖x_i‖ (weights a_i).

    Inputs with norm <= ``tol`` take no part in the mean direction (their norms still count
    in the scale); iteration stops after ``max_iter`` steps or when the tangent norm < ``tol``.
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [_norm(tensor) for tensor in tensors]
    units = [_unit(tensor, norm) for tensor, norm in zip(tensors, norms, strict=True)]
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum((tensor * 0 for tensor in tensors[1:]), tensors[0] * 0)
    alpha_sum = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    mean = _initial_mean(valid_units, valid_alphas, tol)
    for _ in range(max_iter):
        tangent = _tangent(mean, valid_units, valid_alphas, tol)
        tangent_norm = _norm(tangent)
        if tangent_norm.item() < tol:
            break
        step = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        mean = step.to(mean.dtype)
        unit_norm = _norm(mean)
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = alphas[0] * norms[0]
    for alpha, norm in zip(alphas[1:], norms[1:], strict=True):
        scale = scale + alpha * norm
    return scale * mean
