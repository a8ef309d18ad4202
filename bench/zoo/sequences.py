"""Sequence sections of the quality table: trajectory averaging (mwa) and continual merging (opcm).

- trajectory: per task, the saved fine-tuning checkpoints merged by mwa (loss-weighted, one
  penalty ``p`` for all tasks chosen on validation) vs. their uniform average vs. the last one.
- continual: tasks arrive one at a time in manifest order; opcm folds each into its state, and
  is compared with the running average and running task arithmetic of the models seen so far.
  Besides the final test accuracy, ``continual/seen_avg`` is the mean over arrival steps of the
  average accuracy on the tasks seen so far.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mergeops
from bench.zoo.evaluator import DigitsEvaluator
from bench.zoo.loaded import Row, StateDict, Zoo
from bench.zoo.manifest import ZooManifest, load_tensors

MWA_P_GRID = (0.5, 1.0, 2.0, 4.0)
OPCM_ALPHA_GRID = (0.3, 0.5, 0.7, 0.9)
CONTINUAL_TA_LAMBDAS = (0.2, 0.3, 0.5, 0.7, 1.0)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _trajectory_merges(
    zoo_dir: Path | str, manifest: ZooManifest, load: Callable[[str], StateDict] | None = None
) -> dict[str, dict[str, StateDict]]:
    """Per variant (``last``, ``uniform``, ``mwa:<p>``), each task's merged trajectory;
    ``load(relative_path)`` reads a checkpoint (default: one safetensors file of the zoo)."""
    load = load or (lambda relative: load_tensors(zoo_dir, relative))
    merged: dict[str, dict[str, StateDict]] = {"last": {}, "uniform": {}}
    merged |= {f"mwa:{p}": {} for p in MWA_P_GRID}
    for task, entry in manifest.tasks.items():
        checkpoints = [load(point.model) for point in entry.trajectory]
        losses = [point.loss for point in entry.trajectory]
        names = [f"{task}@{point.step}" for point in entry.trajectory]
        merged["last"][task] = checkpoints[-1]
        merged["uniform"][task] = mergeops.merge("linear", checkpoints, model_names=names)
        for p in MWA_P_GRID:
            merged[f"mwa:{p}"][task] = mergeops.merge(
                "mwa", checkpoints, model_names=names, metrics=losses, p=p, metric_mode="lower"
            )
    return merged


def trajectory_rows(
    zoo_dir: Path | str,
    manifest: ZooManifest,
    *,
    log: Callable[[str], None] = print,
    evaluator: Callable[[str, str], DigitsEvaluator] | None = None,
    load: Callable[[str], StateDict] | None = None,
) -> list[Row]:
    """mwa (one p for all tasks, chosen on validation), uniform average, last checkpoint.

    ``evaluator(split, task)`` scores one task (default: the digits evaluator); ``load`` reads
    a trajectory checkpoint (see ``_trajectory_merges``)."""
    merged = _trajectory_merges(zoo_dir, manifest, load)
    make = evaluator or (lambda split, task: DigitsEvaluator(zoo_dir, split=split, tasks=[task]))
    evaluators = {
        split: {t: make(split, t) for t in manifest.tasks} for split in ("validation", "test")
    }

    def scores(per_task: dict[str, StateDict], split: str) -> dict[str, float]:
        out = {}
        for task, model in per_task.items():
            metrics = evaluators[split][task].evaluate(model)
            out[f"accuracy/{task}"] = metrics[f"accuracy/{task}"]
            out[f"normalized_accuracy/{task}"] = metrics[f"normalized_accuracy/{task}"]
        for kind in ("accuracy", "normalized_accuracy"):
            out[f"{kind}/avg"] = _mean([out[f"{kind}/{t}"] for t in per_task])
        return out

    best_p = max(MWA_P_GRID, key=lambda p: scores(merged[f"mwa:{p}"], "validation")["accuracy/avg"])
    rows = []
    for label, variant, params in (
        ("mwa(loss)", f"mwa:{best_p}", {"p": best_p, "metric": "train_loss"}),
        ("uniform_average", "uniform", {}),
        ("last_checkpoint", "last", {}),
    ):
        val = scores(merged[variant], "validation")["accuracy/avg"]
        rows.append(Row("trajectory", label, params, val, scores(merged[variant], "test")))
        log(f"trajectory {label:<16} {params} val {val:.3f}")
    return rows


def _opcm_steps(zoo: Zoo, alpha: float) -> Iterator[StateDict]:
    with tempfile.TemporaryDirectory(prefix="zoo-opcm-") as tmp:
        state = Path(tmp) / "state.safetensors"
        for task, model in zoo.tasks.items():
            yield mergeops.merge(
                "opcm", [model], base=zoo.base, model_names=[task], state_path=state, alpha=alpha
            )


def _average_steps(zoo: Zoo) -> Iterator[StateDict]:
    names = list(zoo.tasks)
    for t in range(1, len(names) + 1):
        seen = names[:t]
        yield mergeops.merge("linear", [zoo.tasks[n] for n in seen], model_names=seen)


def _task_arithmetic_steps(zoo: Zoo, lam: float) -> Iterator[StateDict]:
    names = list(zoo.tasks)
    for t in range(1, len(names) + 1):
        seen = names[:t]
        models = [zoo.tasks[n] for n in seen]
        yield mergeops.merge(
            "task_arithmetic", models, base=zoo.base, model_names=seen, **{"lambda": lam}
        )


def _continual_scores(
    steps: Iterator[StateDict], tasks: Sequence[str], evaluator: DigitsEvaluator
) -> dict[str, float]:
    """Final metrics plus ``continual/seen_avg`` over the arrival steps."""
    seen_avgs: list[float] = []
    metrics: dict[str, float] = {}
    for t, merged in enumerate(steps, start=1):
        metrics = evaluator.evaluate(merged)
        seen_avgs.append(_mean([metrics[f"accuracy/{task}"] for task in tasks[:t]]))
    return metrics | {"continual/seen_avg": _mean(seen_avgs)}


def continual_rows(
    zoo: Zoo, val: DigitsEvaluator, test: DigitsEvaluator, *, log: Callable[[str], None] = print
) -> list[Row]:
    """opcm vs. continual averaging vs. continual task arithmetic, tasks in manifest order."""
    tasks = list(zoo.tasks)
    candidates: list[
        tuple[str, list[dict[str, Any]], Callable[[dict[str, Any]], Iterator[StateDict]]]
    ] = [
        ("opcm", [{"alpha": a} for a in OPCM_ALPHA_GRID], lambda p: _opcm_steps(zoo, p["alpha"])),
        ("continual_average", [{}], lambda p: _average_steps(zoo)),
        (
            "continual_task_arithmetic",
            [{"lambda": lam} for lam in CONTINUAL_TA_LAMBDAS],
            lambda p: _task_arithmetic_steps(zoo, p["lambda"]),
        ),
    ]
    rows = []
    for label, grid, steps in candidates:
        # Select on the final merge's validation average (all tasks have arrived by then).
        best = max(grid, key=lambda p: _continual_scores(steps(p), tasks, val)["accuracy/avg"])
        val_score = _continual_scores(steps(best), tasks, val)["accuracy/avg"]
        rows.append(
            Row("continual", label, best, val_score, _continual_scores(steps(best), tasks, test))
        )
        log(f"continual {label:<26} {best} val {val_score:.3f}")
    return rows
