"""The non-finite guards: no merge reads NaN/Inf inputs or publishes a NaN/Inf output.

Inputs are checked as they are read (``input_flag``/``check_inputs``); every floating output
tensor is checked on its device, in the output dtype (a float32 value beyond bfloat16's range
becomes Inf in the cast), before it reaches the writer (``check_output``). The writer stages
everything in a temporary folder, so raising here leaves no output behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergeops.methods import base as mb


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite (a host bool). On the CPU the sum decides first: NaN and
    Inf survive any order of additions, so a finite sum proves every value finite (one
    vectorised pass, several times faster than ``aminmax``); only a non-finite sum (a bad
    value, or an overflow of the sum itself) is checked again exactly."""
    if not tensor.numel():
        return True
    if tensor.device.type == "cpu" and bool(torch.isfinite(tensor.sum())):
        return True
    return bool(_minmax_flag(tensor))


def input_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d bool on the tensor's device: all values finite (no host sync)."""
    if not tensor.numel():
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    if tensor.device.type == "cpu":  # no sync to avoid: the faster check
        return torch.tensor(all_finite(tensor))
    return _minmax_flag(tensor)


def _minmax_flag(tensor: torch.Tensor) -> torch.Tensor:
    # Two reductions (NaN propagates through min/max) instead of a bool tensor per element.
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def check_inputs(key: str, roles: Sequence[str], flags: Sequence[torch.Tensor]) -> None:
    """Raise naming the first input whose flag is false (one host sync for all of them)."""
    if not flags:
        return
    ok = torch.stack([f.reshape(()) for f in flags]).cpu()
    for role, good in zip(roles, ok.tolist(), strict=True):
        if not good:
            raise mb.MergeError(f"tensor '{key}' of {role} contains NaN or Inf")


def nonfinite_count(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 on the tensor's device: how many values are NaN or Inf."""
    if not tensor.is_floating_point() or not tensor.numel():
        return torch.zeros((), dtype=torch.int64, device=tensor.device)
    return (~torch.isfinite(tensor)).sum()


def suspects(ctx: mb.MergeContext) -> str:
    """Non-finite per-model or global parameters, named (empty when none)."""
    found = []
    for name, params in zip(ctx.model_names, ctx.model_params, strict=True):
        for field, value in params.model_dump(by_alias=True).items():
            if isinstance(value, float) and not math.isfinite(value):
                found.append(f"model '{name}' has {field} {value}")
    for field, value in ctx.params.model_dump(by_alias=True).items():
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"parameter '{field}' is {value}")
    return "; ".join(found)


def output_error(ctx: mb.MergeContext, key: str, count: int, numel: int) -> mb.MergeError:
    """The error for a merged tensor with ``count`` non-finite values."""
    hint = suspects(ctx)
    cause = f" ({hint})" if hint else " (all inputs were finite: the merge overflowed)"
    return mb.MergeError(
        f"merged tensor '{key}' of method '{ctx.method}' has {count} NaN or Inf values out of "
        f"{numel}{cause}; nothing was written"
    )


def check_output(ctx: mb.MergeContext, key: str, tensor: torch.Tensor) -> None:
    """Raise ``MergeError`` naming ``key`` when the (output-dtype) tensor is not all finite."""
    if not tensor.is_floating_point() or not tensor.numel():
        return
    if all_finite(tensor):  # one pass, no per-element temporary (the common case)
        return
    count = int(nonfinite_count(tensor))
    raise output_error(ctx, key, count, tensor.numel())
