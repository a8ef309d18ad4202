"""The weighted Karcher (Riemannian) mean of tensors on the unit hypersphere, as mergekit 0.1.5
computes it: norms in float32 (float64 for float64 inputs), directions in the inputs' dtype.
"""

from __future__ import annotations

import math
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


def karcher_coefficients(
    gram: torch.Tensor,
    alphas: Sequence[float],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """(N,) float64 b with ``karcher_mean(x, alphas) ≈ Σ b_i·x_i``, from the inputs' float64
    Gram matrix (``ops.gram``) alone, on the CPU.

    Every iterate of ``karcher_mean`` is a combination Σ c_i·u_i of the unit inputs u_i, so the
    iteration runs on c: dots <mean, u_i> = (G·c)_i and norms √(cᵀGc) with G the Gram of the
    units. Same rules: inputs with norm <= ``tol`` left out of the direction (their norms still
    in the scale), units closer than ``tol`` to the mean skipped, stop after ``max_iter`` steps
    or when the tangent norm < ``tol``. The scalars are float64 where mergekit rounds whole
    float32 tensors every step, so results agree within float32 rounding, not bit for bit.
    """
    gram = gram.detach().to("cpu", torch.float64)
    norms = torch.diagonal(gram).clamp_min(0).sqrt()
    coefficients = torch.zeros(len(alphas), dtype=torch.float64)
    valid = [i for i, norm in enumerate(norms.tolist()) if norm > tol]
    if not valid:
        return coefficients
    inverse = torch.where(norms > 0, 1 / norms, 0)
    units = gram * inverse[:, None] * inverse[None, :]
    index = torch.tensor(valid)
    g = units[index][:, index]
    total = sum(alphas[i] for i in valid)
    a = torch.tensor([alphas[i] / total for i in valid], dtype=torch.float64)
    c = _initial_coefficients(g, a, tol)
    for _ in range(max_iter):
        step = _tangent_coefficients(g, c, a, tol)
        tangent_norm = _length(g, step)
        if tangent_norm < tol:
            break
        c = math.cos(tangent_norm) * c + math.sin(tangent_norm) * (step / tangent_norm)
        unit_norm = _length(g, c)
        if unit_norm > tol:
            c = c / unit_norm
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms.tolist(), strict=True))
    coefficients[index] = scale * c * inverse[index]
    return coefficients


def _length(gram: torch.Tensor, c: torch.Tensor) -> float:
    """‖Σ c_i·u_i‖ for the units' Gram matrix."""
    return math.sqrt(max(float(c @ gram @ c), 0.0))


def _initial_coefficients(gram: torch.Tensor, alphas: torch.Tensor, tol: float) -> torch.Tensor:
    """The normalised weighted mean Σ a_i·u_i (the first unit when it is ~0), as coefficients."""
    norm = _length(gram, alphas)
    if norm < tol:
        first = torch.zeros_like(alphas)
        first[0] = 1.0
        return first
    return alphas / norm


def _tangent_coefficients(
    gram: torch.Tensor, c: torch.Tensor, alphas: torch.Tensor, tol: float
) -> torch.Tensor:
    """Σ a_i·θ_i/sin θ_i·(u_i - cos θ_i·mean) over units with θ_i >= ``tol``, as coefficients."""
    dots = (gram @ c).clamp(-1.0, 1.0)
    theta = torch.arccos(dots)
    weight = torch.where(theta < tol, 0.0, alphas * theta / torch.sin(theta))
    return weight - (weight * dots).sum() * c
