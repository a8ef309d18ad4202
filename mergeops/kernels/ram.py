"""Wrappers of ``ram.c``: RAM's and RAM+'s combine, and RAM+'s mover counts, in one pass over
float32 inputs with the bits of the torch reference (``mergeops.ops.ram``). Exported as
``mergeops.kernels.ram_combine`` and ``mergeops.kernels.ram_counts``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeops import kernels

MAX_MODELS = 16
"""Up to this many models torch's sum over the stacked terms adds them one by one in order,
as the kernel does; more take the torch path."""


def ram_combine(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    epsilon: float,
    scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """RAM's merge of ``models`` onto ``base`` (RAM+ with ``scale``, one float32 λ_t per model,
    on the CPU), a new tensor shaped like ``base``; None when the kernels are off or do not take
    these tensors."""
    lib = kernels.library()
    if lib is None or not 0 < len(models) <= MAX_MODELS or not kernels.usable(models, base):
        return None
    if scale is not None:
        scale = _per_model(scale, len(models))
    out = torch.empty_like(base)
    lib.ck_ram(base.data_ptr(), kernels._pointers(models), len(models), epsilon,
               None if scale is None else scale.data_ptr(), out.data_ptr(), out.numel())  # fmt: skip
    return out


def ram_counts(
    base: torch.Tensor, models: Sequence[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per model (int64, shape (T,)): how many entries it moved together with another model
    and alone; None when the kernels are off or do not take these tensors."""
    lib = kernels.library()
    if lib is None or not models or not kernels.usable(models, base):
        return None
    shared = torch.zeros(len(models), dtype=torch.int64)
    unique = torch.zeros(len(models), dtype=torch.int64)
    lib.ck_ram_counts(base.data_ptr(), kernels._pointers(models), len(models), epsilon,
                      shared.data_ptr(), unique.data_ptr(), base.numel())  # fmt: skip
    return shared, unique


def _per_model(scale: torch.Tensor, count: int) -> torch.Tensor:
    if scale.dtype != torch.float32 or scale.device.type != "cpu" or scale.numel() != count:
        raise ValueError(f"scale must be {count} float32 values on the CPU")
    return scale.contiguous()
