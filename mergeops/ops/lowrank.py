"""Truncated-SVD factorisation of a weight difference into LoRA factors (B·A ≈ ΔW).

ΔW = U·S·Vᵀ (float32, thin SVD). Kept rank r = min(max_rank, #{s_i > sv_epsilon·s_max});
B = U_r·√S_r and A = √S_r·V_rᵀ, so B·A is the best rank-r approximation of ΔW (Eckart-Young)
and both factors carry half of the scale. Same split as mergekit-extract-lora
(https://github.com/arcee-ai/mergekit), LoRA per https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankFactors:
    """``b @ a`` approximates the difference; ``rel_error`` = ‖ΔW - B·A‖_F / ‖ΔW‖_F."""

    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    rank: int
    rel_error: float
    singular_values: torch.Tensor  # all of them, descending (float32, CPU)


def kept_rank(singular_values: torch.Tensor, *, max_rank: int, sv_epsilon: float) -> int:
    """min(max_rank, number of singular values above sv_epsilon times the largest); 0 if ΔW = 0."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if not 0.0 <= sv_epsilon < 1.0:
        raise ValueError(f"sv_epsilon must be in [0, 1), got {sv_epsilon}")
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    above = int((singular_values > sv_epsilon * singular_values[0]).sum())
    return min(max_rank, above)


def lora_factors(delta: torch.Tensor, *, max_rank: int, sv_epsilon: float = 0.0) -> LowRankFactors:
    """LoRA factors of a 2-D ``delta`` (float32 on its device); rank 0 factors when it is zero."""
    if delta.ndim != 2:
        raise ValueError(f"lora_factors needs a 2-D difference, got shape {tuple(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = kept_rank(s, max_rank=max_rank, sv_epsilon=sv_epsilon)
    root = torch.sqrt(s[:rank])
    b = u[:, :rank] * root.unsqueeze(0)
    a = root.unsqueeze(1) * vh[:rank]
    total = float(torch.linalg.vector_norm(s))
    residual = float(torch.linalg.vector_norm(s[rank:]))
    return LowRankFactors(
        a=a,
        b=b,
        rank=rank,
        rel_error=residual / total if total > 0 else 0.0,
        singular_values=s.cpu(),
    )
