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
    return scratch(name, like.shape, like.dtype, like.device)


def scratch(name: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:  # fmt: skip
    """An uninitialised tensor of ``shape``, ``dtype`` on ``device``, reused per ``name`` on
    this thread."""
    numel = 1
    for size in shape:
        numel *= size
    if numel > MAX_ENTRIES:
        return torch.empty(shape, dtype=dtype, device=device)
    pool: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _LOCAL.__dict__.setdefault(
        "pool", {}
    )
    key = (name, dtype, device)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(max(numel, 1 << 16), dtype=dtype, device=device)
        pool[key] = buffer
    return buffer[:numel].view(shape)
