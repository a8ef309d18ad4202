"""Wrapper of ``rank.c``: DELLA's keep probabilities from per-row magnitude ranks by a stable
radix sort. Exported as ``mergeops.kernels.della_probabilities``."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import torch

from mergeops import kernels

PARALLEL_MIN = 1 << 18
"""Entries from which the rows are split over threads."""


def della_probabilities(
    rows: torch.Tensor, density: float, epsilon: float, *, workers: int = 1
) -> torch.Tensor | None:
    """``ops.prune.della_keep_probability`` of ``rows`` (2-D float32, contiguous, CPU, finite,
    2 to 2^24 - 1 columns) with the same bits, the rows split over up to ``workers`` threads;
    None when the kernels are off or do not take ``rows``."""
    lib = kernels.library()
    if (
        lib is None
        or rows.dim() != 2
        or not 2 <= rows.shape[1] < 1 << 24
        or not kernels.usable([], rows)
    ):
        return None
    count, cols = rows.shape
    out = torch.empty_like(rows)
    low, eps = ctypes.c_float(density - epsilon), ctypes.c_float(epsilon)

    def run(first: int, last: int) -> None:
        scratch = torch.empty(2, cols, dtype=torch.int64)
        lib.ck_della_probabilities(rows[first].data_ptr(), last - first, cols, low, eps,
                                   scratch[0].data_ptr(), scratch[1].data_ptr(),
                                   out[first].data_ptr())  # fmt: skip

    parts = max(1, min(workers, rows.numel() // PARALLEL_MIN, count))
    bounds = [count * part // parts for part in range(parts + 1)]
    if parts == 1:
        run(0, count)
        return out
    with ThreadPoolExecutor(parts - 1, thread_name_prefix="ckreg-rank") as pool:
        later = [pool.submit(run, bounds[p], bounds[p + 1]) for p in range(1, parts)]
        run(bounds[0], bounds[1])
        for done in later:
            done.result()
    return out
