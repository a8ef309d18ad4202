"""Combining (sparsified) task vectors: weighted sum or TIES sign-consensus merge, optional
normalisation, scaling by λ — in mergekit 0.1.5's operation order.

Works in the dtype of the task vectors (weights are cast to it first, as mergekit does), so a
bfloat16 merge rounds exactly like mergekit's; float32 is bit-identical to it. On CPU the
combine runs in cache-sized blocks (``ops.blocked_combine``, bit-identical to the stacked
reference ``stacked_combine`` kept here); other inputs (CUDA, > 16 task vectors, odd lengths)
use the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeops.ops.blocked_combine import blockable, blocked_combine


def weighted_deltas(
    task_vectors: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked δ_t = w_t·τ_t (T, ...) and the weights as a (T, 1, ...) tensor of their dtype."""
    deltas = torch.stack(list(task_vectors))
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    w = w.reshape((-1,) + (1,) * (deltas.dim() - 1))
    return deltas.mul_(w), w


def sign_agreement(deltas: torch.Tensor) -> torch.Tensor:
    """Bool (T, ...): δ_t's sign equals the elected sign, sign(Σ_t δ_t) with zero -> +.

    A zero δ_t never agrees (its sign is 0).
    """
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


def combine_task_vectors(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ0 + λ·merged, merged = Σ w_t τ_t (or Σ of the sign-agreeing δ_t when ``consensus``).

    Args:
        base: θ0.
        task_vectors: the (sparsified) τ_t, shaped like ``base``.
        weights: w_t per task vector.
        consensus: TIES's disjoint merge (keep δ_t agreeing with the elected sign).
        normalize: divide by Σ w_t (consensus: by Σ w_t over agreeing entries); a zero
            divisor (non-consensus: |Σ w_t| < 1e-8) becomes 1.
        scale: λ.
        out: where to write the result (shaped like ``base``, its dtype); a new tensor if None.
    Returns:
        The merged tensor in ``base``'s dtype (``out`` when given).
    """
    if blockable(base, task_vectors) and (out is None or out.is_contiguous()):
        return blocked_combine(base, task_vectors, weights, consensus=consensus,
                               normalize=normalize, scale=scale, out=out)  # fmt: skip
    merged = stacked_combine(base, task_vectors, weights, consensus=consensus,
                             normalize=normalize, scale=scale)  # fmt: skip
    return merged if out is None else out.copy_(merged)


def stacked_combine(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """``combine_task_vectors`` on the stacked task vectors: the reference rounding (whole-
    tensor temporaries; the blocked combine reproduces it bit for bit)."""
    deltas, w = weighted_deltas(task_vectors, weights)
    if consensus:
        agree = sign_agreement(deltas)
        merged = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        merged /= divisor
    if scale != 1:
        merged *= scale
    return (base + merged).to(base.dtype)
