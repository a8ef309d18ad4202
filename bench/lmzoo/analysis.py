"""Noise and TIES-vs-task-arithmetic study on a built LM zoo: ``python -m bench.lmzoo.analysis``.

- noise: for each multitask/adapter claim of the benchmark table, the two rows' merges are
  redone in memory with the params the benchmark chose (read from its ``--json``; the flows'
  merges equal them, see the parity line) and the difference of test averages is bootstrapped
  over the test prompts (paired: the same resampled prompts for both rows).
- ties: why TIES trails (or beats) task arithmetic: each variant's params are chosen on the
  VALIDATION split, then scored on test — TIES as configured (disjoint mean), TIES on a wider
  λ range, TIES summing instead of averaging (``normalize: false``), trimming without the sign
  vote, the sign vote without trimming (density 1), and task arithmetic itself.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import mergeops
from bench.lmzoo.evaluator import LMTasksEvaluator, StateDict
from bench.lmzoo.quality import ADAPTER_MERGES, LMZoo, lm_merge_fn, load_lm_zoo
from bench.quality_report import CLAIMS
from bench.zoo.loaded import Zoo
from bench.zoo.quality import _fw_pool_fn

BOOTSTRAP = 2000


def _row_merge(
    zoo_dir: Path, zoo: LMZoo, method: str, params: Mapping[str, Any], val: LMTasksEvaluator
) -> StateDict:
    """The merge behind a multitask or adapter row label, with ``params``."""
    names = list(zoo.tasks)
    for label, name, mode in ADAPTER_MERGES:
        if method == label:
            adapters = [str(zoo_dir / e.adapter) for e in zoo.manifest.tasks.values()]
            base = zoo.base if mode == "full" else None
            return mergeops.merge(name, adapters, base=base, model_names=names, lora=mode, **params)
    if "+" in method:
        return _fw_pool_fn(zoo, val.objective(), method.split("+")[0])(params)
    return lm_merge_fn(method, zoo, val.objective(), val)(params)


def _avg(
    hits: Mapping[str, torch.Tensor], index: Mapping[str, torch.Tensor] | None = None
) -> float:
    values = [(h[index[t]] if index else h).mean() for t, h in hits.items()]
    return float(torch.stack(values).mean())


def paired_bootstrap(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], seed: int = 0
) -> tuple[float, float, float]:
    """(difference of averages, its bootstrap std, P(difference <= 0)) over resampled prompts."""
    generator = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(BOOTSTRAP):
        index = {t: torch.randint(len(h), (len(h),), generator=generator) for t, h in a.items()}
        diffs.append(_avg(a, index) - _avg(b, index))
    d = torch.tensor(diffs)
    return _avg(a) - _avg(b), float(d.std()), float((d <= 0).float().mean())


def noise_lines(zoo_dir: Path, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    zoo = load_lm_zoo(zoo_dir)
    val = LMTasksEvaluator(zoo_dir, split="validation")
    test = LMTasksEvaluator(zoo_dir, split="test")
    by_name = {r["method"]: r for r in rows if r["section"] in ("multitask", "adapters")}
    n_irrelevant = len(zoo.irrelevant)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def hits(method: str) -> dict[str, torch.Tensor]:
        if method not in cache:
            cache[method] = test.per_example(
                _row_merge(zoo_dir, zoo, method, by_name[method]["params"], val)
            )
        return cache[method]

    lines = []
    pairs = [
        (c, b.format(n=n_irrelevant), w.format(n=n_irrelevant))
        for c, _, b, w, m in CLAIMS
        if m == "accuracy/avg"
    ]
    pairs.append(
        (
            "LoRA: TIES beats task arithmetic (full weights)",
            "lora_ties_full",
            "lora_task_arithmetic_full",
        )
    )
    for claim, better, worse in pairs:
        if better in by_name and worse in by_name:
            diff, std, p = paired_bootstrap(hits(better), hits(worse))
            lines.append(
                f"  {claim}: {better} - {worse} = {diff:+.3f} ± {std:.3f} (bootstrap std; P(Δ<=0) = {p:.2f})"
            )
    return lines


def _trim_sum(zoo: Zoo, density: float, lam: float) -> StateDict:
    """Trim each task vector to its top-``density`` magnitudes per tensor, sum, no sign vote."""
    out = {}
    for key, base in zoo.base.items():
        total = torch.zeros_like(base, dtype=torch.float32)
        for model in zoo.tasks.values():
            tau = (model[key] - base).float().flatten()
            k = max(1, int(density * tau.numel()))
            keep = torch.zeros_like(tau)
            top = tau.abs().topk(k).indices
            keep[top] = tau[top]
            total += keep.view_as(base)
        out[key] = base.float() + lam * total
    return out


def ties_study(zoo_dir: Path, log: Callable[[str], None] = print) -> list[str]:
    zoo = load_lm_zoo(zoo_dir)
    val = LMTasksEvaluator(zoo_dir, split="validation")
    test = LMTasksEvaluator(zoo_dir, split="test")
    names = list(zoo.tasks)
    models = [zoo.tasks[t] for t in names]

    def merge(method: str) -> Callable[[Mapping[str, Any]], StateDict]:
        return lambda p: mergeops.merge(method, models, base=zoo.base, model_names=names, **p)

    lams = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    variants: list[tuple[str, Callable[[Mapping[str, Any]], StateDict], list[dict[str, Any]]]] = [
        ("task_arithmetic", merge("task_arithmetic"), [{"lambda": x} for x in lams]),
        (
            "ties (benchmark grid)",
            merge("ties"),
            [
                {"density": d, "lambda": x}
                for d in (0.1, 0.2, 0.5)
                for x in (0.3, 0.5, 0.7, 1.0, 1.5)
            ],
        ),
        (
            "ties, λ up to 8 (mean)",
            merge("ties"),
            [
                {"density": d, "lambda": x}
                for d in (0.2, 0.5, 0.8)
                for x in (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
            ],
        ),
        (
            "ties normalize=false (sum)",
            merge("ties"),
            [
                {"density": d, "lambda": x, "normalize": False}
                for d in (0.2, 0.5, 0.8)
                for x in lams
            ],
        ),
        (
            "sign vote only (density 1, sum)",
            merge("ties"),
            [{"density": 1.0, "lambda": x, "normalize": False} for x in lams],
        ),
        (
            "trim only (no sign vote, sum)",
            lambda p: _trim_sum(zoo, p["density"], p["lambda"]),
            [{"density": d, "lambda": x} for d in (0.2, 0.5, 0.8) for x in lams],
        ),
    ]
    lines = [f"  {'variant':<34} {'val_avg':>7} {'test_avg':>8}  params (chosen on validation)"]
    for label, fn, grid in variants:
        best = max(grid, key=lambda p: val.evaluate(fn(p))["accuracy/avg"])
        merged = fn(best)
        line = f"  {label:<34} {val.evaluate(merged)['accuracy/avg']:7.3f} {test.evaluate(merged)['accuracy/avg']:8.3f}  {json.dumps(best)}"
        log(line)
        lines.append(line)
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmzoo.analysis", description=__doc__)
    parser.add_argument("--zoo", type=Path, required=True, help="an LM zoo directory")
    parser.add_argument("--rows", type=Path, help="the benchmark's --json (for the noise section)")
    parser.add_argument("--skip-ties", action="store_true", help="only the noise section")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.rows is not None:
        payload = json.loads(args.rows.read_text())
        rows = payload["rows"] if isinstance(payload, dict) else payload
        print(
            "Noise (paired bootstrap over test prompts, in-memory merges with the chosen params):"
        )
        print("\n".join(noise_lines(args.zoo, rows)))
    if not args.skip_ties:
        print("TIES vs task arithmetic (each variant's params chosen on validation):")
        ties_study(args.zoo)


if __name__ == "__main__":
    main()
