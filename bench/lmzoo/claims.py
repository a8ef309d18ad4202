"""Merge claims on LM zoos over seeds and task lists, with noise and spread (issue 19, items 4-5):
``python -m bench.lmzoo.claims --root DIR --seeds 0,1,2 --tasks copy,sort,add,parity
--tasks reverse,count,shift,brackets``.

Each (seed, task list) zoo is built (or reused) under ``--root`` with the zoo's default
config, one build at a time; its multitask table is computed as ``bench.lmzoo.quality`` does
(hyperparameters chosen on validation, scored on test). Each claim's two merges are compared on
the same resampled test prompts (paired bootstrap within each task): it holds on a zoo when
the difference is beyond twice its bootstrap std (a "keeps" claim: when it is not below
-0.02 beyond the noise). A claim counts where it holds on most zoos; the summary gives the
mean difference and its spread (min..max) over zoos.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.lmzoo.analysis import paired_bootstrap
from bench.lmzoo.build import ensure_lm_zoo
from bench.lmzoo.evaluator import LMTasksEvaluator
from bench.lmzoo.quality import lm_merge_fn, lm_multitask_rows, load_lm_zoo
from bench.lmzoo.train import LEGACY_CONFIG, NEAR_CONFIG, LMTrainConfig
from bench.zoo.loaded import Row
from bench.zoo.quality import GRIDS, _fw_pool_fn, format_table, select

#: (claim, better row, worse row, kind): "beats" needs Δ > 2·std, "keeps" Δ > -0.02 - 2·std.
CLAIMS: tuple[tuple[str, str, str, str], ...] = (
    ("RegMean beats task arithmetic", "regmean", "task_arithmetic", "beats"),
    ("layer-wise AdaMerging beats task arithmetic", "adamerging_layer", "task_arithmetic", "beats"),
    ("WUDI beats task arithmetic", "wudi", "task_arithmetic", "beats"),
    ("ISO-C beats task arithmetic", "iso_c", "task_arithmetic", "beats"),
    ("TIES beats task arithmetic", "ties", "task_arithmetic", "beats"),
    ("DARE keeps TIES' accuracy", "dare_ties", "ties", "keeps"),
    ("Fisher beats plain averaging", "fisher", "linear", "beats"),
    ("Consensus beats task arithmetic", "consensus", "task_arithmetic", "beats"),
    ("OTA beats task arithmetic", "ota", "task_arithmetic", "beats"),
    ("FW beats task arithmetic", "fw", "task_arithmetic", "beats"),
    ("FW beats TA with irrelevant models", "fw+irr", "task_arithmetic+irr", "beats"),
    ("task arithmetic beats the pretrained base", "task_arithmetic", "pretrained", "beats"),
)
TABLE_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "fisher", "consensus", "ota", "fw",
    "regmean", "regmean_plusplus", "adamerging", "wudi", "iso_c", "iso_cts", "tsv_m", "pcb",
    "magmax",
)  # fmt: skip
#: The rows the claims need (the quick table; ``--full-table`` adds TABLE_METHODS and emr).
CLAIM_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "fisher", "consensus", "ota", "fw",
    "regmean", "adamerging", "wudi", "iso_c",
)  # fmt: skip
KEEP_MARGIN = 0.02


def _hits_for(zoo_dir: Path, rows: Sequence[Row]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-example test hits of every row a claim names (merges redone with chosen params)."""
    zoo = load_lm_zoo(zoo_dir)
    val = LMTasksEvaluator(zoo_dir, split="validation")
    test = LMTasksEvaluator(zoo_dir, split="test")
    objective = val.objective()
    chosen = {r.method: r.params for r in rows if r.section == "multitask"}
    needed = {name for _, a, b, _ in CLAIMS for name in (a, b)}
    hits = {"pretrained": test.per_example(zoo.base)}
    for name in sorted(needed - {"pretrained"}):
        table = chosen.get("adamerging", {})
        if name == "adamerging_layer" and table.get("granularity") == "layer":
            merged = lm_merge_fn("adamerging", zoo, objective, val)(table)  # best of all: reuse
        elif name == "adamerging_layer":  # the claim is about the layer-wise variant
            grid = [p for p in GRIDS["adamerging"] if p["granularity"] == "layer"]
            fn = lm_merge_fn("adamerging", zoo, objective, val)
            _, merged, _ = select(fn, grid, lambda s: val.evaluate(s)["accuracy/avg"])
        elif name.endswith("+irr"):
            method = name.removesuffix("+irr")
            label = f"{method}+{len(zoo.irrelevant)}irrelevant"
            merged = _fw_pool_fn(zoo, objective, method)(chosen[label])
        else:
            merged = lm_merge_fn(name, zoo, objective, val)(chosen[name])
        hits[name] = test.per_example(merged)
    return hits


def zoo_outcomes(
    zoo_dir: Path,
    methods: Sequence[str] = (*TABLE_METHODS, "emr"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The zoo's table (logged) and, per claim, (Δ, std, P(Δ<=0), held)."""
    zoo = load_lm_zoo(zoo_dir)
    val = LMTasksEvaluator(zoo_dir, split="validation")
    test = LMTasksEvaluator(zoo_dir, split="test")
    started = time.perf_counter()
    rows = lm_multitask_rows(
        zoo, val, test, methods=list(methods),
        log=lambda line: print(f"  [{time.perf_counter() - started:4.0f}s] {line}", flush=True),
    )  # fmt: skip
    log(f"\n== {zoo_dir.name}: tasks {', '.join(zoo.tasks)}\n{format_table(rows)}")
    hits = _hits_for(zoo_dir, rows)
    claims = {}
    for claim, better, worse, kind in CLAIMS:
        diff, std, p = paired_bootstrap(hits[better], hits[worse])
        held = diff > 2 * std if kind == "beats" else diff > -KEEP_MARGIN - 2 * std
        claims[claim] = {"diff": diff, "std": std, "p": p, "held": held}
    merges = [r for r in rows if r.section == "multitask" and r.method != "pretrained"]
    best = max(merges, key=lambda r: r.test.get("normalized_accuracy/avg", 0.0))
    own = next(r for r in rows if r.method == "finetuned(own task each)")
    summary = {
        "pretrained": rows[0].test["accuracy/avg"],
        "finetuned_own": own.test["accuracy/avg"],
        "finetune_all_tasks_avg": _finetune_all_tasks(rows),
        "best": best.method,
        "best_normalized": best.test["normalized_accuracy/avg"],
    }
    return {"zoo": zoo_dir.name, "claims": claims, "summary": summary,
            "rows": [{"method": r.method, "params": r.params, "test": r.test} for r in rows]}  # fmt: skip


def _finetune_all_tasks(rows: Sequence[Row]) -> float:
    """Mean over fine-tunes of each one's average accuracy over ALL tasks (forgetting)."""
    values = [r.test["accuracy/avg"] for r in rows if r.method.startswith("finetune:")]
    return sum(values) / len(values)


def why(outcomes: Sequence[Mapping[str, Any]]) -> str:
    """Why a claim fails: on how many zoos it was reversed beyond the noise, and how many
    differences stayed within twice the bootstrap std (more test prompts could settle them)."""
    failed = [o for o in outcomes if not o["held"]]
    reversed_ = sum(o["diff"] < -2 * o["std"] for o in failed)
    return f"reversed beyond noise on {reversed_}, within noise on {len(failed) - reversed_}"


def summarize(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per claim: held on k of n zoos, mean Δ, spread, verdict, and the std of the mean
    Δ over zoos (independent zoos: sqrt(Σ std²) / n), to judge the mean against the noise."""
    lines = []
    for claim, *_ in CLAIMS:
        outcomes = [r["claims"][claim] for r in results]
        diffs = [o["diff"] for o in outcomes]
        held = sum(o["held"] for o in outcomes)
        noise = sum(o["std"] for o in outcomes) / len(outcomes)
        pooled = sum(o["std"] ** 2 for o in outcomes) ** 0.5 / len(outcomes)  # std of mean Δ
        verdict = "HOLDS" if held * 2 > len(outcomes) else "does not hold"
        if held * 2 <= len(outcomes):
            verdict += f" ({why(outcomes)})"
        lines.append(
            f"  {claim:<46} {verdict:<13} {held}/{len(outcomes)}  mean Δ {sum(diffs) / len(diffs):+.3f}"
            f"  spread [{min(diffs):+.3f}, {max(diffs):+.3f}]  bootstrap std ~{noise:.3f}"
            f"  pooled ±{pooled:.3f}"
        )
    for key in ("pretrained", "finetuned_own", "finetune_all_tasks_avg", "best_normalized"):
        values = [r["summary"][key] for r in results]
        lines.append(f"  {key:<46} mean {sum(values) / len(values):.3f}  "
                     f"[{min(values):.3f}, {max(values):.3f}]")  # fmt: skip
    lines.append("  best merge per zoo: " + ", ".join(r["summary"]["best"] for r in results))
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmzoo.claims", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("bench/out/lmzoo-claims"),
        help="where zoos are built or reused (default bench/out/lmzoo-claims)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--tasks", action="append", default=[],
                        help="a comma-separated task list (repeat for several lists)")  # fmt: skip
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--legacy", action="store_true", help="the pre-issue-19 zoo config")
    kind.add_argument("--near", action="store_true",
                      help="round 3: low-rank folded fine-tunes with replay, 512 test prompts")  # fmt: skip
    parser.add_argument("--config", default="{}", help="JSON LMTrainConfig overrides")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None,
                        help="only summarise earlier --json outputs (no builds)")  # fmt: skip
    parser.add_argument("--full-table", action="store_true",
                        help="every frontier row, not only those the claims need")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write every outcome as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.summarize:
        results = [r for path in args.summarize for r in json.loads(path.read_text())]
        print(f"claims over {len(results)} zoos (a claim counts where it holds on most):")
        print("\n".join(summarize(results)))
        return
    if not args.tasks:
        parser.error("give at least one --tasks list (or --summarize FILES)")
    base = LEGACY_CONFIG if args.legacy else NEAR_CONFIG if args.near else LMTrainConfig()
    config = base.model_copy(update=json.loads(args.config))
    LMTrainConfig.model_validate(config.model_dump())  # unknown or bad overrides fail here
    results = []
    for task_list in args.tasks:
        for seed in (int(s) for s in args.seeds.split(",")):
            started = time.perf_counter()
            tasks = [t for t in task_list.split(",") if t]
            zoo_dir = ensure_lm_zoo(args.root, seed=seed, tasks=tasks, config=config)
            print(
                f"zoo seed {seed} {tasks} ready in {time.perf_counter() - started:.0f}s", flush=True
            )
            methods = (*TABLE_METHODS, "emr") if args.full_table else CLAIM_METHODS
            results.append(zoo_outcomes(zoo_dir, methods) | {"seed": seed, "tasks": tasks})
            if args.json is not None:
                args.json.write_text(json.dumps(results, indent=2, default=float))
    print("\nclaims (a claim counts where it holds on most zoos):")
    print("\n".join(summarize(results)))


if __name__ == "__main__":
    main()
