"""Merge quality on a built zoo, in memory through ``mergeops.merge``: ``python -m bench.zoo.quality``.

Every method's hyperparameters are chosen by a small grid on the validation split (average
accuracy over tasks); only the chosen setting is scored on the test split. This module holds
the multi-task table; trajectory (mwa) and continual (opcm) sections live in
``bench.zoo.sequences``. The REST-driven benchmark reuses the grids and the selection.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import mergeops
from bench.zoo.evaluator import DigitsEvaluator
from bench.zoo.grams import DigitsGramProbe, task_grams
from bench.zoo.loaded import Row, StateDict, Zoo, load_zoo

MergeFn = Callable[[Mapping[str, Any]], StateDict]

# Validation grids (small on purpose: the zoo is one seed; see METHODS.md for the defaults).
GRIDS: dict[str, list[dict[str, Any]]] = {
    "linear": [{}],
    "task_arithmetic": [{"lambda": lam} for lam in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)],
    "ties": [
        {"density": d, "lambda": lam} for d in (0.1, 0.2, 0.5) for lam in (0.3, 0.5, 0.7, 1.0, 1.5)
    ],
    "dare_ties": [
        {"density": d, "lambda": lam, "seed": 0}
        for d in (0.2, 0.5)
        for lam in (0.1, 0.2, 0.3, 0.5, 1.0)
    ],
    "fisher": [{"fisher_norm": norm} for norm in (False, True)],
    "consensus": [
        {"k": k, "alpha": a, "lambda": lam}
        for k in (2, 3)
        for a in (0.2, 0.3, 0.5)
        for lam in (0.4, 0.6)
    ],
    "ota": [{"power": p} for p in (0.5, 1.0)],
    "ota_ffg": [{"power": p, "density": d} for p in (0.5,) for d in (0.1, 0.2, 0.5)],
    "fw": [
        {"step_size": s, "lambda": lam, "max_iters": 10} for s in (0.1, 0.3) for lam in (0.1, 0.3)
    ],
    # the frontier methods (issue 19)
    "regmean": [{"alpha": a} for a in (0.5, 0.7, 0.9, 1.0)],
    "regmean_plusplus": [{"alpha": a} for a in (0.5, 0.7, 0.9, 1.0)],
    # entropy on unlabeled inputs (the paper's objective) and, for contrast, the labelled
    # validation proxy loss fw uses: on this zoo lower entropy means worse accuracy
    "adamerging": [
        {"granularity": g, "steps": s, "lr": lr, "init": 0.3}
        for g in ("task", "layer")
        for s, lr in ((50, 0.002), (100, 0.005))
    ],
    "adamerging_proxy": [
        {"granularity": g, "steps": 100, "lr": 0.005, "init": 0.3} for g in ("task", "layer")
    ],
    "wudi": [{"alpha": a, "steps": 300, "lr": lr} for a in (0.3, 0.5, 1.0) for lr in (1e-3, 1e-2)],
    "iso_c": [{"alpha": a} for a in (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)],
    "iso_cts": [{"alpha": a, "common_space_fraction": 0.8} for a in (0.5, 1.0, 1.5, 2.0)],
    "tsv_m": [{"alpha": a} for a in (0.3, 0.5, 0.7, 1.0)],
    "pcb": [{"pcb_ratio": r, "lambda": lam} for r in (0.1, 0.2, 0.5) for lam in (0.5, 1.0, 1.5)],
    "doge_ta": [
        {"lambda": lam, "density": 0.3, "steps": 100, "lr": lr}
        for lam in (0.1, 0.2, 0.3)
        for lr in (1e-5, 1e-4)
    ],
    "magmax": [{"lambda": lam} for lam in (0.3, 0.5, 0.7, 1.0)],
}
#: Served per task (each task its own rebuilt model), not as one merged model: own rows.
PER_TASK = ("emr",)


def select(
    merge_fn: MergeFn, grid: Sequence[Mapping[str, Any]], score: Callable[[StateDict], float]
) -> tuple[dict[str, Any], StateDict, float]:
    """Best (params, merged, validation score) over ``grid``; the first wins ties."""
    best: tuple[dict[str, Any], StateDict, float] | None = None
    for params in grid:
        merged = merge_fn(params)
        value = score(merged)
        if best is None or value > best[2]:
            best = (dict(params), merged, value)
    if best is None:
        raise ValueError("empty hyperparameter grid")
    return best


def _merge_fn(
    method: str, zoo: Zoo, objective: mergeops.Objective, val: DigitsEvaluator | None = None
) -> MergeFn:
    names = list(zoo.tasks)
    models = [zoo.tasks[t] for t in names]
    side: dict[str, Any] = {"model_names": names}
    if method == "regmean":
        seed = zoo.manifest.seed
        side["grams"] = [task_grams(zoo.tasks[t], t, seed=seed) for t in names]
    if method == "regmean_plusplus":
        side["objective"] = DigitsGramProbe(zoo.manifest.seed)
    if method == "adamerging":
        assert val is not None
        side["objective"] = val.unlabeled_objective()
    if method == "adamerging_proxy":
        side["objective"] = objective
        method = "adamerging"
    if method in ("ota", "ota_ffg"):
        side["second_moments"] = [zoo.second_moments[t] for t in names]
    if method == "fisher":
        side["fisher"] = [zoo.fishers[t] for t in names]
    if method == "fw":
        side["objective"] = objective
    base = None if method in ("linear", "fisher", "regmean", "regmean_plusplus") else zoo.base
    return lambda params: mergeops.merge(method, models, base=base, **side, **params)


def _fw_pool_fn(zoo: Zoo, objective: mergeops.Objective, method: str = "fw") -> MergeFn:
    """``method`` over the task models plus every irrelevant (shuffled-label) model."""
    models = list(zoo.tasks.values()) + zoo.irrelevant
    names = list(zoo.tasks) + [f"irrelevant-{i}" for i in range(len(zoo.irrelevant))]
    side: dict[str, Any] = {"model_names": names}
    if method == "fw":
        side["objective"] = objective
    return lambda params: mergeops.merge(method, models, base=zoo.base, **side, **params)


def _avg(evaluator: DigitsEvaluator) -> Callable[[StateDict], float]:
    return lambda state_dict: evaluator.evaluate(state_dict)["accuracy/avg"]


def multitask_rows(
    zoo: Zoo,
    val: DigitsEvaluator,
    test: DigitsEvaluator,
    *,
    methods: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Reference rows, then each method (grid-selected on validation) and the fw pool runs."""
    rows = [Row("multitask", "pretrained", test=test.evaluate(zoo.base))]
    own: dict[str, float] = {}
    for task, model in zoo.tasks.items():
        metrics = test.evaluate(model)
        rows.append(Row("individual", f"finetune:{task}", test=metrics))
        own |= {k: v for k, v in metrics.items() if k.endswith(f"/{task}")}
    for kind in ("accuracy", "normalized_accuracy"):
        own[f"{kind}/avg"] = sum(own[f"{kind}/{t}"] for t in zoo.tasks) / len(zoo.tasks)
    rows.append(Row("individual", "finetuned(own task each)", test=own))
    objective = val.objective()
    for method in [m for m in methods or list(GRIDS) if m not in PER_TASK]:
        merge_fn = _merge_fn(method, zoo, objective, val)
        params, merged, score = select(merge_fn, GRIDS[method], _avg(val))
        rows.append(Row("multitask", method, params, score, test.evaluate(merged)))
        log(f"{method:<16} {params} val {score:.3f}")
    if methods is None or "emr" in methods:
        rows.append(emr_row(zoo, test))
        log("emr              (tuning-free; each task served from its own mask and rescaler)")
    if methods is None or "fw" in methods:
        for method in ("task_arithmetic", "fw"):
            fn = _fw_pool_fn(zoo, objective, method)
            params, merged, score = select(fn, GRIDS[method], _avg(val))
            name = f"{method}+{len(zoo.irrelevant)}irrelevant"
            rows.append(Row("multitask", name, params, score, test.evaluate(merged)))
            log(f"{name:<16} {params} val {score:.3f}")
    return rows


def emr_row(zoo: Zoo, test: DigitsEvaluator) -> Row:
    """EMR: task t scored with its own rebuilt model θ0 + g_t·m_t ⊙ τ_uni, on task t only."""
    from mergeops.methods.masks.emr import reconstruct_model

    names = list(zoo.tasks)
    result = mergeops.merge_with_extras(
        "emr", [zoo.tasks[t] for t in names], base=zoo.base, model_names=names, device="cpu"
    )
    unified = result.extras["task_vector"]
    metrics: dict[str, float] = {}
    for task in names:
        rebuilt = reconstruct_model(
            zoo.base, unified, result.extras[f"mask.{task}"], result.extras[f"rescale.{task}"]
        )
        scored = test.evaluate(rebuilt)
        for kind in ("accuracy", "normalized_accuracy"):
            if f"{kind}/{task}" in scored:
                metrics[f"{kind}/{task}"] = scored[f"{kind}/{task}"]
    for kind in ("accuracy", "normalized_accuracy"):
        values = [metrics[f"{kind}/{t}"] for t in names if f"{kind}/{t}" in metrics]
        metrics[f"{kind}/avg"] = sum(values) / len(values)
    return Row("multitask", "emr(per-task)", {}, None, metrics)


def run_quality(
    zoo_dir: Path | str,
    *,
    methods: Sequence[str] | None = None,
    sections: Sequence[str] = ("multitask", "trajectory", "continual"),
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Every table section on the zoo at ``zoo_dir``; hyperparameters chosen on validation."""
    from bench.zoo.sequences import continual_rows, trajectory_rows

    zoo = load_zoo(zoo_dir)
    val = DigitsEvaluator(zoo_dir, split="validation")
    test = DigitsEvaluator(zoo_dir, split="test")
    rows: list[Row] = []
    if "multitask" in sections:
        rows += multitask_rows(zoo, val, test, methods=methods, log=log)
    if "trajectory" in sections:
        rows += trajectory_rows(zoo_dir, zoo.manifest, log=log)
    if "continual" in sections:
        rows += continual_rows(zoo, val, test, log=log)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: test accuracy per task, average, normalised average."""
    tasks = sorted({k.split("/", 1)[1] for r in rows for k in r.test if k.startswith("accuracy/")})
    tasks = [t for t in tasks if t != "avg"] + ["avg"]
    header = f"{'section':<11} {'method':<26} " + " ".join(f"{t[:8]:>8}" for t in tasks)
    lines = [header + f" {'norm_avg':>8} {'val_avg':>8} {'seen_avg':>8}  params", "-" * len(header)]
    for row in rows:
        cells = [row.test.get(f"accuracy/{t}") for t in tasks]
        text = " ".join(f"{c:8.3f}" if c is not None else f"{'':>8}" for c in cells)
        norm = row.test.get("normalized_accuracy/avg")
        text += f" {norm:8.3f}" if norm is not None else f" {'':>8}"
        text += f" {row.validation:8.3f}" if row.validation is not None else f" {'':>8}"
        seen = row.test.get("continual/seen_avg")
        text += f" {seen:8.3f}" if seen is not None else f" {'':>8}"
        lines.append(f"{row.section:<11} {row.method:<26} {text}  {json.dumps(row.params)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.zoo.quality",
        description="Merge every method on a built zoo in memory; print the test table.",
    )
    parser.add_argument(
        "--zoo", type=Path, required=True, help="a directory built by bench.zoo.build"
    )
    parser.add_argument("--methods", default="", help="comma-separated subset of methods")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m] or None
    torch.set_num_threads(1)  # fastest on a shared 2-core machine; merges are tiny
    rows = run_quality(args.zoo, methods=methods)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
