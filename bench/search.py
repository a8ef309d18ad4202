"""Merge search on the digits zoo: ``python -m bench.search``.

Scores on VALIDATION (what a search sees), reports TEST: default TIES (density 0.2, λ 1), the
best hand-set TIES / task-arithmetic merge of ``bench.zoo.quality``'s grids, CMA-ES over TIES
(density, λ) and M2N2 over the archive seeded with the task fine-tunes, each with the same
evaluation budget. The search loops are the flow's own (``flows.search_steps``) without the
registry round trips; evaluations per minute are measured here. Paired bootstrap over test
examples (``bench.lmzoo.analysis``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import mergeops
from bench.lmzoo.analysis import paired_bootstrap
from bench.zoo.build import ensure_zoo
from bench.zoo.evaluator import DigitsEvaluator
from bench.zoo.loaded import load_zoo
from bench.zoo.quality import GRIDS
from flows.search_steps import CmaSearch, M2n2Search
from registry.services.searches import SearchSpec

StateDict = dict[str, torch.Tensor]


def _hits(evaluator: DigitsEvaluator, state: StateDict) -> dict[str, torch.Tensor]:
    return {t: v.float() for t, v in evaluator.per_example(state).items()}


def _avg(h: dict[str, torch.Tensor]) -> float:
    return float(torch.stack([v.mean() for v in h.values()]).mean())


def run(zoo_dir: Path, evaluations: int, seed: int) -> list[str]:
    """Every row's validation and test accuracy, the search rates and the bootstrap lines."""
    zoo = load_zoo(ensure_zoo(zoo_dir))
    val, test = DigitsEvaluator(zoo_dir, split="validation"), DigitsEvaluator(zoo_dir, split="test")
    models = list(zoo.tasks.values())

    def merge(method: str, params: dict[str, Any]) -> StateDict:
        return mergeops.merge(method, models, base=zoo.base, **params)

    rows: dict[str, tuple[float, StateDict]] = {}
    rows["ties default (density 0.2, lambda 1)"] = (0.0, merge("ties", {}))
    for method in ("ties", "task_arithmetic"):
        scored = [(_avg(_hits(val, m)), m) for m in (merge(method, p) for p in GRIDS[method])]
        rows[f"{method} best of hand-set grid ({len(scored)})"] = max(scored, key=lambda s: s[0])
    lines: list[str] = []
    spec = SearchSpec.model_validate({"algorithm": "cma_es", "budget": {"evaluations": evaluations},
                                      "space": {"density": [0.05, 1.0], "lambda": [0.2, 2.0]},
                                      "seed": seed})  # fmt: skip
    cma = CmaSearch(spec, {}, lambda p: (_avg(_hits(val, (m := merge("ties", p)))), m), None)
    start = time.perf_counter()
    for _ in range(evaluations):
        cma.step()
    rate = evaluations / (time.perf_counter() - start) * 60
    best = cma.recipe()
    rows[f"cma_es over ties ({evaluations} evals)"] = (best["score"], merge("ties", best["params"]))
    lines.append(f"cma_es: {rate:.0f} evaluations/min; best {best['params']}")
    m2n2_spec = SearchSpec.model_validate({"algorithm": "m2n2", "budget": {"evaluations": evaluations},
                                           "archive_size": len(models), "seed": seed})  # fmt: skip
    names = list(zoo.tasks)
    m2n2 = M2n2Search(m2n2_spec, list(range(len(models))), lambda i: zoo.tasks[names[i]],
                      lambda s: torch.cat(list(_hits(val, s).values())), None)  # fmt: skip
    start = time.perf_counter()
    for _ in range(evaluations):
        m2n2.step()
    rate = evaluations / (time.perf_counter() - start) * 60
    lines.append(f"m2n2: {rate:.0f} evaluations/min (archive {len(models)}, first {len(models)} "
                 "evaluations score the fine-tunes themselves)")  # fmt: skip
    rows[f"m2n2 best of archive ({evaluations} evals)"] = (
        m2n2.recipe()["score"],
        m2n2.weights(m2n2.best_member()),
    )
    return _table(rows, val, test) + lines


def _table(
    rows: dict[str, tuple[float, StateDict]], val: DigitsEvaluator, test: DigitsEvaluator
) -> list[str]:
    lines = [f"{'merge':<44} {'val':>6} {'test':>6}"]
    hits = {}
    for name, (_, state) in rows.items():
        hits[name] = _hits(test, state)
        lines.append(f"{name:<44} {_avg(_hits(val, state)):6.3f} {_avg(hits[name]):6.3f}")
    baselines = [n for n in rows if n.startswith(("ties", "task_arithmetic"))]
    lines.append("paired bootstrap over test examples (Δ ± std; P(Δ <= 0)):")
    for name in rows:
        for other in baselines if name.startswith(("cma_es", "m2n2")) else ():
            diff, std, p = paired_bootstrap(hits[name], hits[other])
            lines.append(f"  {name} - {other}: {diff:+.3f} ± {std:.3f} (P = {p:.2f})")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--zoo", type=Path, default=Path("bench/out/zoo"),
                        help="digits zoo folder (built there when missing)")  # fmt: skip
    parser.add_argument("--evaluations", type=int, default=40, help="budget of each search")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("\n".join(run(args.zoo, args.evaluations, args.seed)))


if __name__ == "__main__":
    main()
