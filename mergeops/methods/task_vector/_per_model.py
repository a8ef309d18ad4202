"""Per-model whole-tensor statistics (TIES cuts, breadcrumbs windows) computed two at a time,
``CutSweep``, the same cuts under the position tie rule found from row slices, and
``CutStat``, the statistic both apply to row slices.

A cut needs the whole τ_t and, under mergekit's tie rule, a full sort of its magnitudes: one
single-threaded sort per model, which dominates a TIES merge on CPU. The τ_t are still read
one after another (the caller's reader is not thread-safe), but each one's statistic runs in
a worker thread while the next is read, so two sorts run at once on two cores. Results do not
depend on the order: each statistic is a pure function of one τ_t.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from mergeops.methods.base import MergeContext, TensorInputs, TensorStatsPass
from mergeops.methods.task_vector.task_arithmetic import TaskVectorMerge
from mergeops.ops.scratch import scratch_like

T = TypeVar("T")


class RowCut(Protocol):
    """A selection over one whole tensor that row slices can apply (``ops.sparsify.TrimCut``,
    ``ops.streamed_topk.OrderedTieCut``, ``ops.selection.WindowCut``, ``ops.packed_cut``'s
    ``PackedWindow``): ``keep_rows`` is its mask as 1.0 / 0.0 in ``magnitude``'s dtype (a
    product with it is exact and several times faster than with a bool mask)."""

    def mask_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor: ...

    def keep_rows(self, magnitude: torch.Tensor, offset: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class CutStat:
    """One model's cut of one whole tensor (None: all kept) and its L1 rescale factor."""

    cut: RowCut | None
    scale: torch.Tensor | None

    def apply(self, tau: torch.Tensor, offset: int, *, in_place: bool = False) -> torch.Tensor:
        """The selected (and rescaled) slice of τ starting at flat index ``offset``
        (``in_place``: τ itself, overwritten; the same products either way)."""
        if self.cut is None and self.scale is None:
            return tau
        masked = tau if in_place else tau.clone()
        if self.cut is not None:
            magnitude = torch.abs(tau, out=scratch_like("magnitude", tau))
            masked.mul_(self.cut.keep_rows(magnitude, offset))
        return masked if self.scale is None else masked.mul_(self.scale)

    def trim_model(self, model: torch.Tensor, base: torch.Tensor, offset: int) -> bool:
        """``apply(model.sub_(base), offset, in_place=True)`` in one fused pass where the cut
        has one (``trim_model``) and there is no rescale; False: nothing written."""
        trim = getattr(self.cut, "trim_model", None)
        return self.scale is None and trim is not None and trim(model, base, offset)


class CutMerge(TaskVectorMerge):
    """A task-vector merge whose per-model statistic of a tensor is a ``CutStat`` (TIES,
    breadcrumbs): applied to row slices, fused with the subtraction where the cut can be."""

    def slices_in_dtype(self, ctx: MergeContext) -> bool:
        """Row slices in a 16-bit compute dtype under mergekit's tie rule and per-tensor cuts;
        the position rule's sweeps and the model-wide threshold count float32 magnitudes."""
        params = ctx.params
        return (
            getattr(params, "tie_break", "mergekit") == "mergekit"
            and getattr(params, "trim_scope", "tensor") == "tensor"
        )

    def sparsify_rows(
        self, tau: torch.Tensor, stat: Any, offset: int, index: int, ctx: MergeContext
    ) -> torch.Tensor:
        """Apply this tensor's precomputed cut to a row slice of τ_t."""
        return stat.apply(tau, offset, in_place=True)  # type: ignore[no-any-return]

    def fused_sparsify(
        self, model: torch.Tensor, base: torch.Tensor, stat: Any, offset: int
    ) -> bool:
        """τ_t's cut rows in one fused pass over the model's and the base's rows
        (``CutStat.trim_model``)."""
        return bool(stat.trim_model(model, base, offset))


class SliceCut(Protocol):
    """A cut found over a tensor's row slices (``ops.streamed_topk``'s ``SliceTopK``,
    ``SliceWindow``)."""

    def observe_difference(self, model: torch.Tensor, base: torch.Tensor) -> None: ...

    def next_pass(self) -> bool: ...

    def cut(self) -> RowCut | None: ...


class CutSweep(TensorStatsPass):
    """Each model's cut of one tensor under the position tie rule, found by sweeping the
    tensor's row slices (one or two sweeps, no whole τ_t held); None: the model is not cut.
    ``result()`` is one ``CutStat`` per model, as ``tensor_stats`` gives without rescale."""

    def __init__(self, selectors: list[SliceCut | None]) -> None:
        self.selectors = selectors

    def observe(self, inputs: TensorInputs, offset: int) -> None:
        base = inputs.base
        assert base is not None
        for selector, model in zip(self.selectors, inputs.models, strict=True):
            if selector is not None:
                selector.observe_difference(model, base)

    def next_pass(self) -> bool:
        return any([s.next_pass() for s in self.selectors if s is not None])

    def result(self) -> list[CutStat]:
        return [CutStat(None if s is None else s.cut(), None) for s in self.selectors]


PARALLEL_MAX_NUMEL = 8 * 1024 * 1024
"""Larger tensors are done one model at a time: a worker holds τ_t, its float32 sort keys and
the sort's values and indices (about 24 bytes per entry), so two at once would raise the
merge's peak memory on the largest tensors (embeddings) for little gain."""


def available_cores() -> int:
    """Cores this process may run on (not torch's intra-op setting, which the engine lowers
    while an elementwise merge runs beside its reader threads)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def per_model_stats(
    wanted: list[bool],
    task_vector: Callable[[int], torch.Tensor],
    compute: Callable[[int, torch.Tensor], T],
    skipped: T,
    *,
    numel: int,
    device: torch.device,
) -> list[T]:
    """``compute(i, task_vector(i))`` for every model ``i`` with ``wanted[i]``, else
    ``skipped``; up to one per core available to the process at once on CPU for tensors up to
    ``PARALLEL_MAX_NUMEL`` entries, in model order otherwise."""
    workers = min(available_cores(), sum(wanted))
    if device.type != "cpu" or numel > PARALLEL_MAX_NUMEL or workers < 2:
        return [compute(i, task_vector(i)) if want else skipped for i, want in enumerate(wanted)]
    results: list[T] = [skipped] * len(wanted)
    pending: deque[tuple[int, Future[T]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckreg-stats") as pool:
        for index, want in enumerate(wanted):
            if not want:
                continue
            while len(pending) >= workers:  # bound the τ_t held at once
                done, future = pending.popleft()
                results[done] = future.result()
            pending.append((index, pool.submit(compute, index, task_vector(index))))
        for done, future in pending:
            results[done] = future.result()
    return results
