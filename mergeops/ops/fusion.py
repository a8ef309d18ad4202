"""Two-model fusions of mergekit 0.1.5, in the inputs' dtype: nearswap (interpolate only where
the models are close) and arcee_fusion (keep the fine-tune's changes of outlying importance).

arcee_fusion's importance I = |θ1 - θ0| ⊙ KL(softmax θ1 ‖ softmax θ0) is per row (softmax over
the last dimension), its threshold median(I) + 1.5·IQR(I) an order statistic of the whole
tensor. For row slices: ``row_kl`` per slice, the importances gathered into one buffer whose
quartiles ``quartiles_in_place`` selects without sorting a copy, then ``fusion_apply`` per slice
with the stored row KLs (the same products, bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergeops import kernels


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|θ0 - θ1|, 1e-6), 0, 1); θ = w·θ1 + (1 - w)·θ0 (one fused pass for
    float32 on the CPU, ``kernels.nearswap``, the same bits)."""
    fused = kernels.nearswap(base, other, t)
    if fused is not None:
        return fused
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax θ1 ‖ softmax θ0) of every row (softmax over the last dim, 1e-8 added to both
    distributions), with a trailing singleton dimension (mergekit's operations, some in
    place)."""
    eps = 1e-8
    p = F.softmax(model, dim=-1).add_(eps)
    q = F.softmax(base, dim=-1).add_(eps)
    return torch.sum(p * torch.div(p, q, out=q).log_(), dim=-1, keepdim=True)


def fusion_importance(
    model: torch.Tensor,
    base: torch.Tensor,
    kl: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """|θ1 - θ0| times the row's KL (``row_kl``, computed when not given), into ``out`` (of the
    same dtype) when given."""
    kl = row_kl(model, base) if kl is None else kl
    return torch.mul(torch.sub(model, base).abs_(), kl, out=out)


def quartile_indices(count: int) -> tuple[int, int, int]:
    """Flat indices ⌊q·(n-1)⌋ of the sorted values for q = 1/4, 1/2, 3/4 (no interpolation):
    mergekit's, which computes them in float32, exactly so for n up to its 1M sample."""
    last = count - 1
    return last // 4, last // 2, (3 * last) // 4


RADIX_MIN = 1 << 18
"""From this many values the quartiles come from radix selection (its 64K-bin counts cost
more than an introselect on fewer)."""


def quartiles_in_place(values: torch.Tensor) -> torch.Tensor:
    """The three quartiles (``quartile_indices``) of a flat tensor as a ``(3,)`` tensor.

    Exact order statistics. Large float32 tensors on the CPU: radix selection
    (``kernels.select_ranks``, two counting passes, ``values`` untouched; 10x faster than the
    introselect at 32M entries). Otherwise on the CPU ``values`` is partially sorted in place
    (numpy's introselect: no sorted copy, no int64 indices), so the caller must own it;
    elsewhere ``kthvalue`` selects (on a scratch copy, leaving ``values`` as it is). The
    values are the same either way (a zero may come back as +0.0 where numpy gives -0.0;
    they compare equal). mergekit takes the same indices of a full sort (of a random sample of
    1M values when there are more).
    """
    picks = quartile_indices(values.numel())
    if values.numel() >= RADIX_MIN:
        selected = kernels.select_ranks(values, picks)
        if selected is not None:
            return selected
    if values.device.type == "cpu":
        array = values.numpy()
        array.partition(picks)
        return values[list(picks)].clone()
    return torch.stack([torch.kthvalue(values, index + 1).values for index in picks])


def fusion_threshold(quartiles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """median + 1.5·(q3 - q1), in the importance's ``dtype`` as mergekit computes it."""
    q1, median, q3 = quartiles.to(dtype)
    return median + 1.5 * (q3 - q1)


def fusion_apply(
    base: torch.Tensor, model: torch.Tensor, kl: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """θ0 + (θ1 - θ0)·[I ≥ threshold] with I from the rows' ``kl``; the float32 mask promotes a
    lower-precision result to float32, as in mergekit (the caller casts to the output dtype)."""
    diff = model - base
    mask = (diff.abs() * kl >= threshold).float()
    return torch.mul(diff, mask).add_(base)


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """The whole tensor's fusion: importance, its quartiles' threshold, ``fusion_apply``."""
    kl = row_kl(model, base)
    importance = fusion_importance(model, base, kl)
    work = torch.float64 if importance.dtype == torch.float64 else torch.float32
    threshold = fusion_threshold(quartiles_in_place(importance.reshape(-1).to(work)), kl.dtype)
    return fusion_apply(base, model, kl, threshold)
