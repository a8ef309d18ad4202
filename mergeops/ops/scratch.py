"""Per-thread scratch tensors reused from call to call.

Slice-sized temporaries (a magnitude, a keep mask) allocated fresh for every slice cost page
faults — the allocator hands 2 MiB blocks back to the kernel and takes them again — so the
slice paths borrow them here instead. A buffer is reused by the next call with the same name
on the same thread, so a caller must be done with it before it borrows that name again.
"""

from __future__ import annotations

import threading

import torch

MAX_ENTRIES = 1 << 20
"""Larger requests get a fresh tensor (whole-tensor paths), so no thread keeps one around."""

_LOCAL = threading.local()


def scratch_like(name: str, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like ``like`` (its dtype and device), reused per
    ``name`` on this thread."""
    if like.numel() > MAX_ENTRIES:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    pool: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _LOCAL.__dict__.setdefault(
        "pool", {}
    )
    key = (name, like.dtype, like.device)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < like.numel():
        buffer = torch.empty(max(like.numel(), 1 << 16), dtype=like.dtype, device=like.device)
        pool[key] = buffer
    return buffer[: like.numel()].view(like.shape)
