"""Before/after micro benchmarks of the issue-20 kernels, side by side, in one process.

    python -m bench.merge_kernels --micro [--repeats 5]

Each row times the previous kernel ("before", kept here as the reference it was) and the
current one ("after") on the same bf16-derived task vectors (a fine-tune's bf16 weights minus
the base's, in float32, as the engine sees them: many tied magnitudes), alternating the two,
and checks that both give the same result. Times are medians of wall seconds and of this
process's CPU seconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from mergeops.ops import basic
from mergeops.ops.select import rank_stats
from mergeops.ops.sign_consensus import combine_task_vectors
from mergeops.ops.sparsify import kth_smallest

WEIGHTS = (1.0, 0.8, 0.6, 0.4)


def _tau(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.02).to(torch.bfloat16)
    tuned = (base.float() + torch.randn(numel, generator=g) * 0.001).to(torch.bfloat16)
    return tuned.float() - base.float()


def _old_select(flat: torch.Tensor, k: int) -> tuple[float, int, int]:
    value = kth_smallest(flat, flat.numel() - k + 1)
    above = int(torch.count_nonzero(flat > value))
    return float(value), above, int(torch.count_nonzero(flat == value))


def _new_select(flat: torch.Tensor, k: int) -> tuple[float, int, int]:
    stat = rank_stats(flat, [flat.numel() - k + 1])[0]
    return stat.value, flat.numel() - stat.below - stat.equal, stat.equal


def _slice_inputs(rows: int, row: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = _tau(rows * row, 0).view(rows, row)
    return base, [base + _tau(rows * row, s).view(rows, row) for s in (1, 2, 3, 4)]


def _ta_unblocked(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    taus = [m.clone().sub_(base) for m in models]  # owned copies, as the engine hands them
    return combine_task_vectors(base, taus, WEIGHTS, consensus=True, normalize=True, scale=1.0)


def _ta_blocked(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    owned = [m.clone() for m in models]
    out = torch.empty_like(base)
    rows = max(1, (128 * 1024) // base.shape[1])
    for start in range(0, base.shape[0], rows):
        block = base[start : start + rows]
        taus = [m[start : start + rows].sub_(block) for m in owned]
        combine_task_vectors(block, taus, WEIGHTS, consensus=True, normalize=True, scale=1.0,
                             out=out[start : start + rows])  # fmt: skip
    return out


def _consensus_inputs(seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    deltas = [_tau(128 * 1024, seed + t) * w for t, w in enumerate(WEIGHTS)]
    total = torch.zeros(128 * 1024)
    for delta in deltas:
        total.add_(delta)
    return deltas, total


def _consensus(deltas: list[torch.Tensor], total: torch.Tensor, *, bool_mask: bool) -> torch.Tensor:
    """One block of TIES's disjoint sum as ``ops.blocked_combine`` runs it: with a bool agree
    mask multiplied in (before) or a float one fused by ``addcmul_`` (after)."""
    kept, weight = torch.zeros_like(total), torch.zeros_like(total)
    product = torch.empty_like(total)
    agree = torch.empty(total.shape, dtype=torch.bool if bool_mask else torch.float32)
    elected = torch.where(total >= 0, 1.0, -1.0)
    for delta, w in zip(deltas, WEIGHTS, strict=True):
        torch.mul(delta, elected, out=product)
        torch.gt(product, 0, out=agree)
        if bool_mask:
            torch.mul(delta, agree, out=product)
            kept.add_(product)
        else:
            kept.addcmul_(delta, agree)
        weight.add_(agree, alpha=w)
    return kept.div_(weight.masked_fill_(weight == 0, 1))


def _linear_before(models: list[torch.Tensor]) -> torch.Tensor:
    return basic.weighted_sum(models, WEIGHTS) / float(sum(WEIGHTS))


def _linear_after(models: list[torch.Tensor]) -> torch.Tensor:
    return basic.weighted_average(models, WEIGHTS)


def _time(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return bool(a == b)


def run(repeats: int) -> None:
    """Print one before/after row per kernel."""
    big = _tau(32 * 1024 * 1024, 7).abs_()
    mid = _tau(3 * 1024 * 1024, 8).abs_()
    base, models = _slice_inputs(512, 1024)  # one 2 MiB float32 row slice per input
    block = _consensus_inputs(20)
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("top-k cut stats, 32M |tau|", lambda: _old_select(big, big.numel() // 2),
         lambda: _new_select(big, big.numel() // 2)),
        ("top-k cut stats, 3M |tau|", lambda: _old_select(mid, mid.numel() // 5),
         lambda: _new_select(mid, mid.numel() // 5)),
        ("ties combine, 2 MiB in 128K blocks", lambda: _ta_unblocked(base, models),
         lambda: _ta_blocked(base, models)),
        ("ties consensus, 128K block", lambda: _consensus(*block, bool_mask=True),
         lambda: _consensus(*block, bool_mask=False)),
        ("linear average, 2 MiB slice", lambda: _linear_before(models),
         lambda: _linear_after(models)),
    ]  # fmt: skip
    print(f"torch threads {torch.get_num_threads()}; medians of {repeats} runs")
    print(f"{'kernel':<30}{'before wall/CPU s':>20}{'after wall/CPU s':>20}  same result")
    for name, before, after in cases:
        runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        results: dict[str, Any] = {}
        for repeat in range(repeats):
            order = [("before", before), ("after", after)]
            for label, fn in order if repeat % 2 == 0 else order[::-1]:
                wall, cpu, results[label] = _time(fn)
                runs[label].append((wall, cpu))
        cells = [
            f"{statistics.median(w for w, _ in runs[k]):.4f} / "
            f"{statistics.median(c for _, c in runs[k]):.4f}"
            for k in ("before", "after")
        ]
        same = _same(results["before"], results["after"])
        print(f"{name:<30}{cells[0]:>20}{cells[1]:>20}  {same}")
