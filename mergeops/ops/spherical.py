"""Spherical interpolation of tensors: slerp, nuslerp and multislerp, as mergekit 0.1.5 computes
them (same operation order, so the same numbers in float32 and in bfloat16).

slerp works in float32 (float64 for float64 inputs) and returns the input dtype; nuslerp and
multislerp compute in the dtype they are given.

Row-sliced merges (float32): ``nuslerp_cosine``/``nuslerp_coefficients``/``nuslerp_apply`` and
``multislerp_coefficients`` take the inputs' float64 Gram matrix (``ops.gram``) instead of
whole tensors. mergekit's float32 norms of whole tensors (PyTorch's 16-lane float32
accumulation) drift from the exact value by ~1e-5 relative at 1M entries, ~1e-4 at 4M and
~2e-3 at 32M; the Gram path is exact to float32 rounding, so on such tensors it is closer to
mergekit's own float64 result than mergekit's float32 result is (tolerance-equal to mergekit
only below ~256K entries).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergeops import kernels
from mergeops.ops.blocks import blocks_of, combine_norms, combine_sums
from mergeops.ops.gram import norms_of
from mergeops.ops.scratch import scratch, scratch_like


def slerp_work_dtype(dtype: torch.dtype) -> torch.dtype:
    """slerp's working dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_norm(norm: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """A whole tensor's norm for normalising: 1 where it is <= ``eps``."""
    return torch.where(norm > eps, norm, 1)


def slerp_coefficients(
    t: float, dot: torch.Tensor, *, dot_threshold: float = 0.9995
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with slerp = a·v0 + b·v1 for cos Ω = ``dot`` (a ``(1, 1)`` tensor): sin((1-t)Ω)
    / sin Ω and sin(tΩ) / sin Ω, or 1-t and t where |cos Ω| > ``dot_threshold``."""
    dot = dot.clamp(-1, 1)
    coef_t = torch.tensor([t], dtype=dot.dtype, device=dot.device).reshape(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - coef_t, torch.sin((1 - coef_t) * theta) / sin_theta)
    coef_b = torch.where(linear, coef_t, torch.sin(coef_t * theta) / sin_theta)
    return coef_a, coef_b


def slerp_apply(
    coef_a: torch.Tensor, coef_b: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor
) -> torch.Tensor:
    """a·v0 + b·v1 in slerp's working dtype, returned in ``v0``'s shape and dtype."""
    work = coef_a.dtype
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    if v0.device.type == "cpu" and v0.dtype == v1.dtype == work == torch.float32:  # fused
        coefficients = torch.cat([coef_a.reshape(1), coef_b.reshape(1)])
        fused = kernels.linear_combination(coefficients, [a, b])
        if fused is not None:
            return fused.reshape(v0.shape)
    result = torch.empty_like(a)
    for start in range(0, a.shape[1], _APPLY_CHUNK):
        stop = start + _APPLY_CHUNK
        part = result[:, start:stop]
        out = part if part.dtype == work else scratch("slerp-out", part.shape, work, part.device)
        torch.mul(a[:, start:stop].to(work), coef_a, out=out)
        term = b[:, start:stop].to(work)
        out.add_(torch.mul(term, coef_b, out=scratch_like("slerp-term", term)))
        if out is not part:
            part.copy_(out)
    return result.reshape(v0.shape)


_APPLY_CHUNK = 1024 * 1024
"""Elements per step of ``slerp_apply``: bounds its working-dtype scratch."""


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1) of the flattened tensors.

    θ = [sin((1-t)Ω)·v0 + sin(tΩ)·v1] / sin Ω with Ω the angle between them; linear
    interpolation where |cos Ω| > ``dot_threshold``. Norms and the dot product are reduced in
    fixed blocks (``ops.blocks``), as the row-sliced merge does. Returns a tensor of ``v0``'s
    shape and dtype.
    """
    if v0.numel() == 0:
        return v0.clone()
    work = slerp_work_dtype(v0.dtype)
    pairs = list(blocks_of([v0, v1]))
    norm_a = safe_norm(
        combine_norms(
            [torch.linalg.vector_norm(a.to(work), dim=1, keepdim=True) for a, _ in pairs]
        ),
        eps,
    )
    norm_b = safe_norm(
        combine_norms(
            [torch.linalg.vector_norm(b.to(work), dim=1, keepdim=True) for _, b in pairs]
        ),
        eps,
    )
    dot = combine_sums(
        [((a.to(work) / norm_a) * (b.to(work) / norm_b)).sum(dim=1, keepdim=True) for a, b in pairs]
    )
    coef_a, coef_b = slerp_coefficients(t, dot, dot_threshold=dot_threshold)
    return slerp_apply(coef_a, coef_b, v0, v1)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Slerp from ``v0`` (t = 0) to ``v1`` (t = 1) in ``v0``'s dtype.

    ``flatten``: one angle for the whole tensor; else one per vector along the last dimension,
    or along the first with ``row_wise``. Collinear vectors (1 - cos² ≤ eps²) interpolate
    linearly.
    """
    shape = v0.shape
    transposed = row_wise and not flatten
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif transposed:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos_theta = torch.sum(_unit_rows(v0) * _unit_rows(v1), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if transposed:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_cosine(gram: torch.Tensor) -> torch.Tensor:
    """cos θ in float32 from a float64 Gram of two inputs: (2, 2) for one angle (shape (1,)),
    or (2, 2, C) per column (shape (C,)); each norm clamped at 1e-7 as mergekit does."""
    norms = norms_of(gram).clamp_min(1e-7)
    cos = (gram[0, 1] / (norms[0] * norms[1])).to(torch.float32)
    return cos.reshape(-1).clamp(-1, 1)


def nuslerp_coefficients(
    t: float, cos: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sin((1-t)θ), sin(tθ), sin θ, collinear) for ``cos`` = cos θ, as ``nuslerp`` computes
    them; collinear (1 - cos² ≤ eps²) angles interpolate linearly."""
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    return torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta), collinear


def nuslerp_apply(
    t: float,
    coefficients: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    branch: str = "mixed",
) -> torch.Tensor:
    """``nuslerp``'s elementwise step on rows of ``v0``/``v1``: the coefficients (shape (1,) or
    one per column) broadcast over the rows. ``branch``: "spherical" or "linear" when every
    angle takes that branch (skips the other), "mixed" to choose per angle."""
    shape = v0.shape
    columns = math.prod(shape[1:])
    a, b = v0.reshape(-1, columns), v1.reshape(-1, columns)
    sin_a, sin_b, sin_theta, collinear = coefficients
    if branch == "linear":
        return ((1 - t) * a + t * b).reshape(shape)
    if branch == "spherical" and sin_a.numel() == 1 and sin_a.dtype == torch.float32:
        fused = kernels.nuslerp_apply(a, b, float(sin_a), float(sin_b), float(sin_theta))
        if fused is not None:  # one pass, the same bits
            return fused.reshape(shape)
    spherical = (sin_a * a + sin_b * b) / sin_theta
    if branch == "mixed":
        spherical = torch.where(collinear, (1 - t) * a + t * b, spherical)
    return spherical.reshape(shape)


def nuslerp_t(weights: Sequence[float]) -> float:
    """nuslerp's interpolation factor: w2 / (w1 + w2), 0.5 when the weights sum to ~0."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


class AntipodalError(ValueError):
    """multislerp's weighted mean direction is zero (antipodal inputs with balanced weights)."""


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (in the inputs' dtype).

    The inputs (their task vectors when ``base`` is given) are projected to the unit sphere,
    interpolated in the tangent space at their weighted mean direction, mapped back and scaled
    by the weighted mean norm; ``base`` is added back. Raises ``AntipodalError`` when the mean
    direction vanishes for more than two inputs (two fall back to linear interpolation).
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise AntipodalError("the weighted mean direction of the inputs is zero")
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
    else:
        result = _tangent_mean(units, w, mean / mean_norm, eps)
        result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


def multislerp_coefficients(
    gram: torch.Tensor,
    weights: Sequence[float],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    weight_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N,) float64 b with ``multislerp`` = Σ b_i·x_i (x_i the inputs or task vectors), from
    their float64 Gram matrix, on the CPU; raises ``AntipodalError`` as ``multislerp`` does.
    The weights are normalised in ``weight_dtype`` (the inputs' dtype), as mergekit does.

    multislerp's tangent vector Σ w_i·(u_i - <u_i, m̂>·m̂) at the mean direction m̂ = m/‖m‖,
    m = Σ w_i·u_i, is m - <m, m̂>·m̂ = 0 for any inputs: mergekit's float32 tangent is rounding
    noise, its norm is ``eps``, and the result is cos(eps)·m̂ times the weighted mean norm.
    """
    gram = gram.detach().to("cpu", torch.float64)
    w = torch.tensor(list(weights), dtype=weight_dtype)
    if normalize_weights:
        w = w / w.sum()
    w64 = w.double()
    mean_norm = _mean_norm(gram, w64, eps)
    if mean_norm < eps:
        if len(weights) == 2:
            return w64  # an antipodal pair: linear interpolation
        raise AntipodalError("the weighted mean direction of the inputs is zero")
    norms = norms_of(gram)
    scale = float((norms * w64).sum()) * math.cos(eps) / mean_norm
    return w64 / (norms + eps) * scale


def _mean_norm(gram: torch.Tensor, w: torch.Tensor, eps: float) -> float:
    """‖Σ w_i·x_i/(‖x_i‖ + eps)‖ from the Gram matrix."""
    c = w / (norms_of(gram) + eps)
    return math.sqrt(max(float(c @ gram @ c), 0.0))


def _tangent_mean(
    units: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, eps: float
) -> torch.Tensor:
    """exp_mean(Σ w_i·log_mean(u_i)) with the tangent space's first-order log map."""
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    norm = torch.norm(tangent) + eps
    return mean * torch.cos(norm) + tangent * (torch.sin(norm) / norm)
