"""Wrappers of ``sortsim.c``: torch's CPU sort and selection algorithms (libstdc++'s
introsort and introselect) run only as far as the positions a caller needs, for mergekit's tie
rules (TIES and breadcrumbs cuts, SCE's top-k). Exported as ``mergeops.kernels.sort_windows``
and ``mergeops.kernels.nth_element``."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from mergeops import kernels


def sort_windows(
    keys: torch.Tensor,
    windows: Sequence[tuple[int, int]],
    *,
    descending: bool,
    depth: int = -1,
) -> torch.Tensor | None:
    """The int64 indices ``torch.sort(keys, descending=descending)`` puts at the positions of
    each window ``[first, last)``, read as ``result[first:last]`` (elsewhere: no particular
    order), found by running torch's CPU sort algorithm only on the ranges that reach a window
    (``sortsim.c``). ``keys`` (1-D float32, contiguous, CPU) is permuted in place. None when
    the kernels are off or do not take these keys (e.g. one is NaN; ``keys`` untouched then),
    or when the algorithm would switch to heapsort inside a window (``keys`` restored to its
    order; ``depth`` >= 0 lowers the algorithm's depth limit, for tests of that case)."""
    lib = kernels.library()
    if lib is None or not windows or len(windows) > 4 or not _sortable(keys):
        return None
    order = torch.empty(keys.numel(), dtype=torch.int64)  # filled by the kernel
    first = (ctypes.c_int64 * len(windows))(*[w[0] for w in windows])
    last = (ctypes.c_int64 * len(windows))(*[w[1] for w in windows])
    failed = lib.ck_sort_windows(keys.data_ptr(), order.data_ptr(), keys.numel(),
                                 int(descending), first, last, len(windows), depth)  # fmt: skip
    return _unless_failed(failed, keys, order)


def nth_element(
    keys: torch.Tensor, nth: int, *, descending: bool, depth: int = -1
) -> torch.Tensor | None:
    """The int64 indices whose first ``nth + 1`` are the entries ``torch.topk(keys, nth + 1,
    largest=descending, sorted=False)`` returns when it selects with ``std::nth_element``
    (k·64 > n on the CPU), in no particular order, found by the same algorithm
    (``sortsim.c``). ``keys`` (1-D float32, contiguous, CPU) is permuted in place; None as for
    ``sort_windows``."""
    lib = kernels.library()
    if lib is None or not 0 <= nth < keys.numel() or not _sortable(keys):
        return None
    order = torch.empty(keys.numel(), dtype=torch.int64)  # filled by the kernel
    failed = lib.ck_nth_element(keys.data_ptr(), order.data_ptr(), keys.numel(), nth,
                                int(descending), depth)  # fmt: skip
    return _unless_failed(failed, keys, order)


def _sortable(keys: torch.Tensor) -> bool:
    return (
        keys.dtype == torch.float32
        and keys.device.type == "cpu"
        and keys.dim() == 1
        and keys.is_contiguous()
    )


def _unless_failed(failed: int, keys: torch.Tensor, order: torch.Tensor) -> torch.Tensor | None:
    """``order``; None after putting ``keys`` back in their original order (1: out of depth),
    or None as they are (2: a NaN, or too many windows; nothing moved)."""
    if failed == 2:
        return None
    if failed:
        keys.copy_(torch.empty_like(keys).index_put_((order,), keys))
        return None
    return order
