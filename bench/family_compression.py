"""Family compression on the digits zoo: ``python -m bench.family_compression``.

The zoo's fine-tunes (8 tasks by default) stored as ONE multi-task vector τ_MTL plus ONE
bit-packed TALL mask per task (Wang et al. 2024, arXiv 2405.07813), against storing every
fine-tune whole. λ is chosen per task on the VALIDATION split from the paper's grid; retention
(rebuilt accuracy / the fine-tune's own accuracy) is reported on the TEST split. The tensor math
is the registry's (``registry.services.family``), the file bytes are what ``store_family`` puts
in the store (safetensors of τ_MTL and of the packed masks); "zstd" is those bytes compressed at
level 19, as a lossless codec at rest would store them. The base is stored either way and is
not counted. Goal (issue 11): >= 5x smaller with >= 99 % of each task's accuracy kept.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zstandard
from safetensors.torch import save

from bench._common import load_average, print_table
from bench.zoo import DEFAULT_TASKS, ensure_zoo, load_manifest
from bench.zoo.evaluator import DigitsEvaluator
from bench.zoo.manifest import load_tensors
from mergeops.ops.masks import pack_masks
from registry.services import family as family_service

GOAL_RATIO, GOAL_RETENTION = 5.0, 0.99
DEFAULT_ZOO = Path(".ckreg/demo/zoo/digits-seed0")  # the one bench.merge_quality builds


@dataclass
class TaskFigures:
    """One fine-tune: chosen λ, own accuracy before/after on validation and test, mask density."""

    task: str
    lam: float
    val_original: float
    val_rebuilt: float
    test_original: float
    test_rebuilt: float
    density: float

    @property
    def retention(self) -> float:
        return self.test_rebuilt / self.test_original


@dataclass
class FamilyFigures:
    tasks: list[TaskFigures] = field(default_factory=list)
    original_bytes: int = 0
    original_zstd_bytes: int = 0
    merged_bytes: int = 0
    merged_zstd_bytes: int = 0
    mask_bytes: int = 0
    mask_zstd_bytes: int = 0
    elapsed_s: float = 0.0

    @property
    def family_bytes(self) -> int:
        return self.merged_bytes + self.mask_zstd_bytes

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.family_bytes

    @property
    def goal_met(self) -> bool:
        return self.ratio >= GOAL_RATIO and all(t.retention >= GOAL_RETENTION for t in self.tasks)


def _zstd(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=19).compress(data))


def _own(evaluator: DigitsEvaluator, state: dict[str, torch.Tensor], task: str) -> float:
    return evaluator.evaluate(state)[f"accuracy/{task}"]


def _task_figures(
    task: str, base: dict, member: dict, merged: dict, grid: Sequence[float],
    validation: DigitsEvaluator, test: DigitsEvaluator,
) -> tuple[TaskFigures, dict[str, torch.Tensor]]:  # fmt: skip
    dtypes = family_service.state_dtypes(member)
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    for lam in grid:
        masks = family_service.tall_masks(base, member, merged, lam)
        score = _own(validation, family_service.rebuild_state(base, merged, masks, dtypes), task)
        if best is None or score > best[1]:
            best = (lam, score, masks)
    assert best is not None
    lam, val_rebuilt, masks = best
    rebuilt = family_service.rebuild_state(base, merged, masks, dtypes)
    ones = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    figures = TaskFigures(
        task, lam, _own(validation, member, task), val_rebuilt, _own(test, member, task),
        _own(test, rebuilt, task), ones / total,
    )  # fmt: skip
    return figures, masks


def run(
    zoo_dir: Path | None = None,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    grid: Sequence[float] = family_service.LAMBDA_GRID,
    build_options: dict[str, Any] | None = None,
) -> FamilyFigures:
    """Measure the family form of the zoo's fine-tunes of ``tasks`` (building the zoo if absent)."""
    started = time.perf_counter()
    zoo = ensure_zoo(zoo_dir or DEFAULT_ZOO, seed=0, tasks=list(tasks), **(build_options or {}))
    manifest = load_manifest(zoo)
    base = load_tensors(zoo, manifest.base)
    members = {t: load_tensors(zoo, manifest.tasks[t].model) for t in tasks}
    figures = FamilyFigures()
    for task in tasks:
        raw = (zoo / manifest.tasks[task].model).read_bytes()
        figures.original_bytes += len(raw)
        figures.original_zstd_bytes += _zstd(raw)
    merged = family_service.multitask_vector(base, members.values())
    merged_file = save({k: v.contiguous() for k, v in merged.items()})
    figures.merged_bytes, figures.merged_zstd_bytes = len(merged_file), _zstd(merged_file)
    validation = DigitsEvaluator(zoo, split="validation", tasks=list(tasks))
    test = DigitsEvaluator(zoo, split="test", tasks=list(tasks))
    for task in tasks:
        row, masks = _task_figures(task, base, members[task], merged, grid, validation, test)
        packed, meta = pack_masks(masks)
        mask_file = save(packed, metadata=meta)
        figures.mask_bytes += len(mask_file)
        figures.mask_zstd_bytes += _zstd(mask_file)
        figures.tasks.append(row)
    figures.elapsed_s = time.perf_counter() - started
    return figures


def report(figures: FamilyFigures) -> None:
    """Print the per-task and the bytes tables side by side with the goal."""
    print_table(
        "TALL family compression on the digits zoo (λ on validation, accuracy on test)",
        ["task", "λ", "mask ones", "val orig", "val rebuilt", "test orig", "test rebuilt",
         "kept", "goal"],
        [[t.task, t.lam, f"{t.density:.1%}", t.val_original, t.val_rebuilt, t.test_original,
          t.test_rebuilt, f"{t.retention:.2%}", f">= {GOAL_RETENTION:.0%}"] for t in figures.tasks],
    )  # fmt: skip
    n = len(figures.tasks)
    print_table(
        "Stored bytes of the fine-tunes (the base is stored either way, not counted)",
        ["form", "bytes", "x smaller"],
        [
            [f"{n} originals (raw)", figures.original_bytes, 1.0],
            [f"{n} originals (zstd-19, lossless)", figures.original_zstd_bytes,
             figures.original_bytes / figures.original_zstd_bytes],
            ["τ_MTL (raw) + masks bit-packed", figures.merged_bytes + figures.mask_bytes,
             figures.original_bytes / (figures.merged_bytes + figures.mask_bytes)],
            ["τ_MTL (raw) + masks bit-packed + zstd", figures.family_bytes, figures.ratio],
            ["τ_MTL (zstd) + masks bit-packed + zstd",
             figures.merged_zstd_bytes + figures.mask_zstd_bytes,
             figures.original_bytes / (figures.merged_zstd_bytes + figures.mask_zstd_bytes)],
            ["goal", "", f">= {GOAL_RATIO:.0f}x"],
        ],
    )  # fmt: skip
    worst = min(t.retention for t in figures.tasks)
    verdict = "MET" if figures.goal_met else "NOT MET"
    print(
        f"goal {verdict}: {figures.ratio:.2f}x smaller, worst task keeps {worst:.2%} of its "
        f"accuracy ({figures.elapsed_s:.1f}s; {load_average()})"
    )


def main(argv: Sequence[str] | None = None) -> FamilyFigures:
    parser = argparse.ArgumentParser(
        prog="python -m bench.family_compression",
        description="Stored bytes and accuracy kept when the zoo's fine-tunes are stored as one "
        "task vector plus TALL masks.",
    )
    parser.add_argument("--zoo", type=Path, default=None, help=f"zoo dir (default {DEFAULT_ZOO})")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks")
    args = parser.parse_args(argv)
    figures = run(args.zoo, tasks=[t for t in args.tasks.split(",") if t])
    report(figures)
    return figures


if __name__ == "__main__":
    main()
