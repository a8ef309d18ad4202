"""Weight averaging and sign-consensus math shared by linear, task arithmetic, TIES and DARE.

Every function takes and returns float32 tensors; none knows about files or configs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeops import kernels


def _weights_like(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Weights as a column broadcastable against a stack of tensors shaped like ``like``."""
    w = torch.as_tensor(list(weights), dtype=torch.float32, device=like.device)
    return w.reshape((-1,) + (1,) * like.dim())


BLOCK = 512 * 1024
"""Elements per block of the in-place weighted sum: one 2 MiB float32 merge slice
(``chunking.CHUNK_BYTES``) is one block. Per-op call and thread-fork costs dominate smaller
blocks: a 5-input sum of one slice took 0.95 ms in 64K blocks, 0.73 in 128K, 0.40 in 512K."""
_LANES = 64
"""Blocked sums require a length that is a multiple of this (any SIMD width divides it), so
the stacked reduction they replace also accumulates every element in model order."""
_SEQUENTIAL_TERMS = 16
"""Up to this many terms torch's stacked sum over dim 0 adds them one by one in order (more
and it splits the terms over several accumulators); the blocked sum matches it up to here."""


def _blockable(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    return (
        first.dtype == torch.float32
        and first.numel() % _LANES == 0
        and len(tensors) <= _SEQUENTIAL_TERMS
        and all(t.is_contiguous() and t.shape == first.shape for t in tensors)
    )


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_t x_t.

    Args:
        tensors: same-shaped tensors.
        weights: one weight per tensor.
    Returns:
        The weighted sum, shaped like each input.
    """
    if _blockable(tensors):
        return blocked_weighted_sum(tensors, weights)
    # The reference rounding: a stacked product summed over dim 0 (0 + w_0 x_0 + w_1 x_1 ...,
    # no FMA). The engine bounds its memory by merging large tensors in row chunks.
    stacked = torch.stack(list(tensors))
    return (stacked * _weights_like(weights, tensors[0])).sum(dim=0)


def blocked_weighted_sum(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], divisor: float | None = None
) -> torch.Tensor:
    """Σ w_t x_t of contiguous float32 tensors, one cache-sized block at a time, in place.

    Every element is rounded as the stacked reference rounds it (+0, then each product w_t x_t
    rounded, then added in model order), with no float32 temporary of the whole stack; each
    op is elementwise, so the result does not depend on the number of threads. ``divisor``:
    each block is then divided by it while in cache (the same op as ``total / divisor``).
    """
    first = tensors[0]
    out = torch.empty_like(first)
    fused_weights = torch.tensor(list(weights), dtype=torch.float32)
    if kernels.weighted_sum(None, tensors, fused_weights, models=False, divisor=divisor,
                            scale=1.0, out=out):  # fmt: skip
        return out  # fused: the same operations per element in one pass (mergeops.kernels)
    flat_out = out.view(-1)
    flats = [t.view(-1) for t in tensors]
    coefficients = [torch.tensor(w, dtype=torch.float32, device=first.device) for w in weights]
    product = torch.empty(min(BLOCK, first.numel()), dtype=torch.float32, device=first.device)
    for start in range(0, first.numel(), BLOCK):
        stop = min(start + BLOCK, first.numel())
        acc, tmp = flat_out[start:stop], product[: stop - start]
        acc.zero_()
        for flat, coefficient in zip(flats, coefficients, strict=True):
            torch.mul(flat[start:stop], coefficient, out=tmp)
            acc.add_(tmp)
        if divisor is not None:
            acc.div_(divisor)
    return out


def weighted_average(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    """Linear merge: Σ w_t θ_t / Σ w_t (or the plain weighted sum when not normalizing)."""
    if not normalize:
        return weighted_sum(tensors, weights)
    divisor = float(sum(weights))
    if abs(divisor) < 1e-8:
        raise ValueError(f"weights sum to {divisor}; cannot normalize a linear merge")
    if _blockable(tensors):  # divided block by block while each is in cache
        return blocked_weighted_sum(tensors, weights, divisor)
    return weighted_sum(tensors, weights) / divisor


def task_arithmetic(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """θ0 + λ·Σ w_t τ_t (divided by Σ w_t when ``normalize``; a ~zero sum divides by 1)."""
    merged = weighted_sum(task_vectors, weights)
    if normalize:
        divisor = float(sum(weights))
        merged = merged / (divisor if abs(divisor) >= 1e-8 else 1.0)
    return base + scale * merged


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """Majority sign per entry of stacked deltas (T, ...): sign of their sum, zero -> +1."""
    return torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_merge(
    deltas: torch.Tensor, weights: Sequence[float], *, normalize: bool
) -> torch.Tensor:
    """Sum the weighted deltas (T, ...) whose sign agrees with the elected sign.

    Args:
        deltas: stacked weighted task vectors δ_t = w_t·trim(τ_t).
        weights: the w_t used to build ``deltas`` (for the normalizing divisor).
        normalize: divide by Σ w_t·[kept_t] (a zero divisor becomes 1).
    Returns:
        The merged delta, shaped like one task vector.
    """
    kept = deltas.sign() == elect_sign(deltas)
    merged = (deltas * kept).sum(dim=0)
    if not normalize:
        return merged
    divisor = (_weights_like(weights, deltas[0]) * kept).sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged / divisor
