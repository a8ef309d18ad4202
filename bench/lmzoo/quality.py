"""Merge quality on a built LM zoo, in memory: ``python -m bench.lmzoo.quality --zoo DIR``.

The digits zoo's machinery, reused as it is: the validation grids and selection, the
multitask rows (``bench.zoo.quality.multitask_rows``), trajectory (mwa) and continual (opcm)
sections (``bench.zoo.sequences``) — with the ``lm_tasks`` evaluator and the zoo's Hugging Face
directories. One section is the LM zoo's own: merges of the LoRA adapters, either as full
weights (``lora="full"``: base + B·A, any method) or as adapters (``lora="factors"``: A and B
averaged entry by entry, base-free methods only).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import mergeops
from bench.lmzoo.evaluator import LMTasksEvaluator, load_hf_dir
from bench.lmzoo.manifest import load_manifest
from bench.zoo.loaded import Row, StateDict, Zoo
from bench.zoo.quality import GRIDS, MergeFn, _merge_fn, format_table, multitask_rows, select
from bench.zoo.sequences import continual_rows, trajectory_rows

SECTIONS = ("multitask", "adapters", "trajectory", "continual")
# Adapter merges: (row label, method, lora mode). ``factors`` merges stay adapters.
ADAPTER_MERGES = (
    ("lora_linear_adapter", "linear", "factors"),
    ("lora_task_arithmetic_full", "task_arithmetic", "full"),
    ("lora_ties_full", "ties", "full"),
)


#: Rows whose side inputs are the LM zoo's own (the digits merge function computes digits Grams).
LM_OWN = ("regmean", "regmean_plusplus")


@dataclass
class LMZoo(Zoo):
    """The digits zoo's ``Zoo`` record plus each fine-tune's layer-input Grams (regmean)."""

    grams: dict[str, StateDict] = field(default_factory=dict)


def load_lm_zoo(zoo_dir: Path | str) -> LMZoo:
    """The zoo's models in memory (the digits zoo's ``Zoo`` record, HF key names)."""
    zoo_dir = Path(zoo_dir)
    manifest = load_manifest(zoo_dir)
    tasks = manifest.tasks
    return LMZoo(
        manifest=manifest,  # type: ignore[arg-type]  # same fields the sections read
        base=load_hf_dir(zoo_dir / manifest.base),
        tasks={t: load_hf_dir(zoo_dir / e.model) for t, e in tasks.items()},
        second_moments={t: _file(zoo_dir / e.second_moment) for t, e in tasks.items()},
        fishers={t: _file(zoo_dir / e.fisher) for t, e in tasks.items()},
        irrelevant=[load_hf_dir(zoo_dir / e.model) for e in manifest.irrelevant],
        irrelevant_second_moments=[_file(zoo_dir / e.second_moment) for e in manifest.irrelevant],
        grams={t: _file(zoo_dir / e.gram) for t, e in tasks.items() if e.gram is not None},
    )


def lm_merge_fn(
    method: str, zoo: LMZoo, objective: mergeops.Objective, val: LMTasksEvaluator
) -> MergeFn:
    """``bench.zoo.quality._merge_fn`` with the LM zoo's Grams (regmean) and probe (regmean++);
    adamerging asks ``val`` for its unlabeled objective there already."""
    if method not in LM_OWN:
        return _merge_fn(method, zoo, objective, val)  # type: ignore[arg-type]
    names = list(zoo.tasks)
    models = [zoo.tasks[t] for t in names]
    side: dict[str, Any] = {"model_names": names}
    if method == "regmean":
        missing = [t for t in names if t not in zoo.grams]
        if missing:
            raise KeyError(f"the LM zoo has no gram for tasks {missing}: rebuild it")
        side["grams"] = [zoo.grams[t] for t in names]
    else:
        side["objective"] = val.gram_probe()
    return lambda params: mergeops.merge(method, models, **side, **params)


def lm_multitask_rows(
    zoo: LMZoo,
    val: LMTasksEvaluator,
    test: LMTasksEvaluator,
    *,
    methods: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """The digits zoo's multitask rows, then regmean / regmean_plusplus with the LM side inputs."""
    wanted = list(methods) if methods is not None else [*GRIDS, "emr", "fw"]
    shared = [m for m in wanted if m not in LM_OWN]
    rows = multitask_rows(zoo, val, test, methods=shared, log=log)  # type: ignore[arg-type]
    objective = val.objective()
    for method in [m for m in wanted if m in LM_OWN]:
        params, merged, score = select(
            lm_merge_fn(method, zoo, objective, val),
            GRIDS[method],
            lambda s: val.evaluate(s)["accuracy/avg"],
        )
        rows.append(Row("multitask", method, params, score, test.evaluate(merged)))
        log(f"{method:<16} {params} val {score:.3f}")
    return rows


def _file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def adapter_rows(
    zoo_dir: Path,
    zoo: Zoo,
    val: LMTasksEvaluator,
    test: LMTasksEvaluator,
    *,
    log: Callable[[str], None],
) -> list[Row]:
    """Each task's own adapter, then the adapter merges (grid-selected on validation)."""
    manifest = load_manifest(zoo_dir)
    own: dict[str, float] = {}
    for task, entry in manifest.tasks.items():
        metrics = LMTasksEvaluator(zoo_dir, split="test", tasks=[task]).evaluate(
            load_hf_dir(zoo_dir / entry.adapter)
        )
        own |= {k: v for k, v in metrics.items() if k.endswith(f"/{task}")}
    for kind in ("accuracy", "normalized_accuracy"):
        own[f"{kind}/avg"] = sum(own[f"{kind}/{t}"] for t in manifest.tasks) / len(manifest.tasks)
    rows = [Row("individual", "lora(own task each)", test=own)]
    adapters = [str(zoo_dir / e.adapter) for e in manifest.tasks.values()]
    names = manifest.task_names
    for label, method, mode in ADAPTER_MERGES:
        base = zoo.base if mode == "full" else None

        def merge_fn(params, method=method, mode=mode, base=base):  # type: ignore[no-untyped-def]
            return mergeops.merge(
                method, adapters, base=base, model_names=names, lora=mode, **params
            )

        params, merged, score = select(
            merge_fn, GRIDS[method], lambda s: val.evaluate(s)["accuracy/avg"]
        )
        rows.append(Row("adapters", label, params, score, test.evaluate(merged)))
        log(f"{label:<28} {params} val {score:.3f}")
    return rows


def run_lm_quality(
    zoo_dir: Path | str,
    *,
    methods: Sequence[str] | None = None,
    sections: Sequence[str] = SECTIONS,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Every section on the LM zoo at ``zoo_dir``; hyperparameters chosen on validation."""
    zoo_dir = Path(zoo_dir)
    zoo = load_lm_zoo(zoo_dir)
    val = LMTasksEvaluator(zoo_dir, split="validation")
    test = LMTasksEvaluator(zoo_dir, split="test")
    rows: list[Row] = []
    if "multitask" in sections:
        rows += lm_multitask_rows(zoo, val, test, methods=methods, log=log)
    if "adapters" in sections:
        rows += adapter_rows(zoo_dir, zoo, val, test, log=log)
    if "trajectory" in sections:
        rows += trajectory_rows(
            zoo_dir,
            zoo.manifest,
            log=log,
            evaluator=lambda split, task: LMTasksEvaluator(zoo_dir, split=split, tasks=[task]),  # type: ignore[arg-type,return-value]
            load=lambda relative: load_hf_dir(zoo_dir / relative),
        )
    if "continual" in sections:
        rows += continual_rows(zoo, val, test, log=log)  # type: ignore[arg-type]
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmzoo.quality", description=__doc__)
    parser.add_argument(
        "--zoo", type=Path, required=True, help="a directory built by bench.lmzoo.build"
    )
    parser.add_argument("--methods", default="", help="comma-separated subset of methods")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="table sections")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run_lm_quality(
        args.zoo,
        methods=[m for m in args.methods.split(",") if m] or None,
        sections=[s for s in args.sections.split(",") if s],
    )
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
