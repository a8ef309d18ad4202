"""The task-vector combine step (θ0 + λ·Σ w_t τ_t, or TIES's sign-consensus sum) in
cache-sized blocks, in place: no stacked copy of the task vectors and no whole-tensor
temporaries.

Each block of every τ_t is weighted into a small buffer, summed into a float32 accumulator
and finished (normalised, scaled, added to θ0) straight into the output. The operations and
their order per element are those of the stacked reference
(``ops.sign_consensus.stacked_combine``, mergekit 0.1.5's order): products rounded to the
task vectors' dtype, sums over models accumulated in float32 from +0 in model order (as
torch's sum over a stacked dim 0 does for up to 16 terms), then rounded to that dtype. The
result is bit-identical to the reference, and since every op is elementwise it does not depend
on the thread count. Paper (TIES): https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergeops import kernels

BLOCK = 128 * 1024
"""Elements per block (512 KiB of float32 per buffer; 64K-512K measured within noise, 16K
slower: each op's per-call and thread fork cost is paid per block)."""
DEVICE_BLOCK = 8 * 1024 * 1024
"""Elements per block on other devices (GPU): kernel launches, not cache, are the cost there;
still bounded, since the block buffers are kept for the next call."""
LANES = 64
"""Blocked combines require a length that is a multiple of this: the stacked sum over models
then adds every element's terms one by one in model order (no tail with another order)."""
_MAX_TERMS = 16
"""Up to this many task vectors torch's stacked sum adds them in order; more: the reference."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def blockable(base: torch.Tensor, task_vectors: Sequence[torch.Tensor]) -> bool:
    """Whether ``blocked_combine`` reproduces the reference for these inputs (one device,
    contiguous, one floating dtype, same shape, ≤ 16 task vectors, length a multiple of 64)."""
    dtype = base.dtype
    return (
        dtype in _DTYPES
        and base.is_contiguous()
        and base.numel() % LANES == 0
        and 0 < len(task_vectors) <= _MAX_TERMS
        and all(
            t.dtype == dtype
            and t.shape == base.shape
            and t.is_contiguous()
            and t.device == base.device
            for t in task_vectors
        )
    )


@dataclass
class _Buffers:
    """Per-call scratch, one block long: weighted deltas (T, block), float32 accumulators."""

    deltas: torch.Tensor
    total: torch.Tensor
    kept: torch.Tensor
    weight: torch.Tensor
    product: torch.Tensor
    agree: torch.Tensor
    elected: torch.Tensor
    ones: torch.Tensor

    @classmethod
    def make(cls, count: int, length: int, dtype: torch.dtype, device: torch.device) -> _Buffers:
        f32 = torch.float32
        return cls(
            deltas=torch.empty((count, length), dtype=dtype, device=device),
            total=torch.empty(length, dtype=f32, device=device),
            kept=torch.empty(length, dtype=f32, device=device),
            weight=torch.empty(length, dtype=f32, device=device),
            product=torch.empty(length, dtype=dtype, device=device),
            agree=torch.empty(length, dtype=f32, device=device),
            elected=torch.empty(length, dtype=f32, device=device),
            ones=torch.ones(length, dtype=f32, device=device),
        )


_SCRATCH = threading.local()


def _scratch(count: int, length: int, dtype: torch.dtype, device: torch.device) -> _Buffers:
    """This thread's block buffers, reused across calls (merge_rows combines one block of
    rows per call: a fresh ~2.5 MiB of buffers each time cost page faults)."""
    cached: _Buffers | None = getattr(_SCRATCH, "buffers", None)
    if (
        cached is None
        or cached.deltas.dtype != dtype
        or cached.deltas.device != device
        or cached.deltas.shape[0] < count
        or cached.deltas.shape[1] < length
    ):
        cached = _Buffers.make(count, max(length, BLOCK), dtype, device)
        _SCRATCH.buffers = cached
    return cached


def blocked_combine(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ0 + λ·merged exactly as ``stacked_combine``; inputs must pass ``blockable``. Written
    into ``out`` (contiguous, like ``base``) when given."""
    dtype, numel, count = base.dtype, base.numel(), len(task_vectors)
    w, divisor = _weights(weights, dtype)
    alphas = [float(w[t, 0]) for t in range(count)]
    out = torch.empty_like(base) if out is None else out
    if dtype == torch.float32 and _fused(base, task_vectors, w, divisor, consensus=consensus,
                                         normalize=normalize, scale=scale, out=out):  # fmt: skip
        return out
    w, divisor = (t.to(base.device, non_blocking=True) for t in (w, divisor))  # CPU: no-ops
    coefficients = [w[t, 0] for t in range(count)]  # 0-dim, in the task vectors' dtype
    block = BLOCK if base.device.type == "cpu" else DEVICE_BLOCK
    flat_out, flat_base = out.view(-1), base.view(-1)
    flats = [t.view(-1) for t in task_vectors]
    buf = _scratch(count, min(block, numel), dtype, base.device)
    for start in range(0, numel, block):
        stop = min(start + block, numel)
        deltas = buf.deltas[:count, : stop - start]
        total = buf.total[: stop - start]
        total.zero_()
        for t in range(count):
            torch.mul(flats[t][start:stop], coefficients[t], out=deltas[t])
            total.add_(deltas[t])
        if consensus:
            merged = _consensus_block(buf, deltas, total, alphas, normalize)
        else:
            merged = total if dtype == torch.float32 else total.to(dtype)
            if normalize:
                merged.div_(divisor)
        if scale != 1:
            merged.mul_(scale)
        torch.add(flat_base[start:stop], merged, out=flat_out[start:stop])
    return out


def _weights(weights: Sequence[float], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights as a (T, 1) column in ``dtype`` and the non-consensus divisor, their sum
    as the reference computes it (a sum under 1e-8 in magnitude becomes 1). Cached: a merge
    asks for the same weights once per slice (read only; callers never write them)."""
    return _weights_of(tuple(float(x) for x in weights), dtype)


@functools.lru_cache(maxsize=64)
def _weights_of(
    weights: tuple[float, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.tensor(list(weights), dtype=dtype).reshape(-1, 1)
    divisor = w.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return w, divisor


def _fused(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    w: torch.Tensor,
    divisor: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    scale: float,
    out: torch.Tensor,
    models: bool = False,
) -> bool:
    """The same combine by the fused C kernels (``mergeops.kernels``; float32 on the CPU),
    ``inputs`` task vectors or, with ``models``, the models (τ_t = θ_t - θ0 taken per element);
    False when they are off or do not take the tensors."""
    weights = w.reshape(-1).contiguous()
    if consensus:
        return kernels.consensus_sum(
            base, inputs, weights, normalize=normalize, scale=scale, out=out
        )
    return kernels.weighted_sum(
        base,
        inputs,
        weights,
        models=models,
        divisor=float(divisor) if normalize else None,
        scale=scale,
        out=out,
    )


def fused_task_arithmetic(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool,
    scale: float,
    out: torch.Tensor,
) -> bool:
    """``blocked_combine`` of τ_t = θ_t - θ0 without taking the τ_t first (one pass over the
    models); float32 on the CPU and ``blockable`` inputs only, else False (nothing written)."""
    if base.dtype != torch.float32 or not blockable(base, models):
        return False
    w, divisor = _weights(weights, base.dtype)
    return _fused(base, models, w, divisor, consensus=False, normalize=normalize, scale=scale,
                  out=out, models=True)  # fmt: skip


def _consensus_block(
    buf: _Buffers, deltas: torch.Tensor, total: torch.Tensor, alphas: list[float], normalize: bool
) -> torch.Tensor:
    """One block's Σ of the δ_t agreeing with sign(Σ δ_t) (zero -> +), divided by Σ of their
    w_t when ``normalize`` (a zero divisor becomes 1); in the deltas' dtype."""
    length, dtype = total.numel(), deltas.dtype
    kept, weight = buf.kept[:length], buf.weight[:length]
    product, agree = buf.product[:length], buf.agree[:length]
    # sign(δ_t) == elected ⇔ δ_t·elected > 0, elected = ±1 (exact; a zero δ_t never agrees).
    # elected = +1 where total >= 0: copysign(1, total) is that, as total is never -0 (a sum
    # from +0 only reaches -0 from -0); one op on reused buffers, not where()'s five.
    elected = torch.copysign(buf.ones[:length], total, out=buf.elected[:length])
    elected = elected if dtype == torch.float32 else elected.to(dtype)
    kept.zero_()
    weight.zero_()
    for t in range(deltas.shape[0]):
        torch.mul(deltas[t], elected, out=product)
        torch.gt(product, 0, out=agree)  # 1.0 / 0.0 (float: products with a bool are slow)
        kept.addcmul_(deltas[t], agree)  # + δ_t or ±0, exactly the reference's + δ·agree
        if normalize:
            weight.add_(agree, alpha=alphas[t])  # w_t or 0, exact
    merged = kept if dtype == torch.float32 else kept.to(dtype)
    if normalize:
        divisor = weight if dtype == torch.float32 else weight.to(dtype)
        zero = agree if dtype == torch.float32 else torch.empty_like(divisor)
        divisor.add_(torch.eq(divisor, 0, out=zero))  # a zero divisor becomes 1, others stay
        merged.div_(divisor)
    return merged
