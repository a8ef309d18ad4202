"""A chunkable method's whole-tensor statistics (TIES cuts, DARE masks) for the device
pipeline (``mergeops.pipeline``), computed on the merge device. Each input is uploaded a
slice of rows at a time into its device tensor, so the host holds one slice of it, never the
whole tensor (the pipeline's host memory stays a few slices)."""

from __future__ import annotations

from typing import Any

import torch

from mergeops import finite
from mergeops.chunking import _Rows, row_ranges
from mergeops.plan import MergePlan
from mergeops.sources import TensorSource


def upload_whole(
    rows: _Rows, shape: tuple[int, ...], step: int, device: torch.device
) -> torch.Tensor:
    """One input's whole raw tensor (its stored dtype) on ``device``, copied ``step`` rows at
    a time."""
    whole: torch.Tensor | None = None
    for start, stop in row_ranges(shape[0], step):
        raw = rows.get(start, stop)
        if whole is None:
            whole = torch.empty(shape, dtype=raw.dtype, device=device)
        whole[start:stop].copy_(raw)
    assert whole is not None, f"tensor '{rows.key}' has no rows"
    return whole


def tensor_stats(
    plan: MergePlan,
    sources: list[TensorSource],
    roles: list[str],
    key: str,
    step: int,
) -> tuple[list[Any], int]:
    """``plan.method``'s statistics of tensor ``key`` (``sources``: the models, then the base;
    ``roles`` name them in errors) and the input bytes read for them."""
    shape = tuple(plan.metas[key].shape)
    rows = [_Rows(s, key) for s in sources]
    base: list[torch.Tensor] = []
    read = [0]

    def upload(index: int) -> torch.Tensor:
        whole = upload_whole(rows[index], shape, step, plan.ctx.device)
        read[0] += whole.numel() * whole.element_size()
        return whole

    def task_vector(index: int) -> torch.Tensor:
        assert plan.base is not None
        tau = upload(index).to(torch.float32, copy=True)  # owned: the method may modify it
        finite.check_inputs(key, [roles[index]], [finite.input_flag(tau)])
        if not base:
            base.append(upload(len(rows) - 1))  # raw dtype: the cast in sub_ is exact
        return tau.sub_(base[0])

    stats = plan.method.tensor_stats(key, shape, task_vector, plan.ctx)  # type: ignore[attr-defined]
    return stats, read[0]
