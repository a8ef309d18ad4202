"""Why a frontier claim fails (or holds) on LM zoos, with numbers:
``python -m bench.lmzoo.frontier_why --json claims.json [--root DIR]``.

For each zoo of a ``bench.lmzoo.claims --json`` output:

- headroom: the fine-tunes' own-task average minus task arithmetic's test average — a merge
  can only win what task arithmetic leaves on the table;
- forgetting: each fine-tune's average over all the zoo's tasks against the base's (a
  fine-tune of a real pretrained model keeps the base's other skills);
- each frontier method's gain over task arithmetic split in two: what its own weighting adds
  over the plain average (``method - linear``) against what tuning λ adds (``TA - linear``);
- the task vectors' geometry (from the zoo's files): mean and max pairwise cosine of the
  flattened task vectors (interference), their size against the base (``‖τ‖/‖θ0‖``), and per
  weight matrix the overlap of their top singular subspaces and the energy there;
- AdaMerging (layer-wise, from λ = 0.3): the unlabeled entropy and validation accuracy before
  and after learning λ with the entropy objective and with the labelled proxy loss — when lower
  entropy is not higher accuracy, the paper's objective cannot find a better λ.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

import mergeops
from bench.lmzoo.evaluator import LMTasksEvaluator, StateDict
from bench.lmzoo.quality import load_lm_zoo

FRONTIER = ("regmean", "adamerging", "wudi", "iso_c")
ADA_LEARN = {"granularity": "layer", "steps": 100, "lr": 0.005}


def _test_avg(rows: Sequence[Mapping[str, Any]], method: str) -> float | None:
    for row in rows:
        if row["method"] == method:
            return float(row["test"]["accuracy/avg"])
    return None


def row_lines(result: Mapping[str, Any]) -> list[str]:
    """Headroom and each frontier method's gain over linear vs task arithmetic's (test)."""
    rows = result["rows"]
    ta, linear = _test_avg(rows, "task_arithmetic"), _test_avg(rows, "linear")
    own = float(result["summary"]["finetuned_own"])
    if ta is None or linear is None:
        return ["  (no task_arithmetic / linear rows)"]
    lines = [f"  headroom: fine-tunes {own:.3f} - task arithmetic {ta:.3f} = {own - ta:+.3f}; "
             f"TA - linear {ta - linear:+.3f}"]  # fmt: skip
    lines += forgetting_lines(result)
    for method in FRONTIER:
        value = _test_avg(rows, method)
        if value is None:
            continue
        claim = next((c for name, c in result["claims"].items()
                      if name.lower().startswith(_claim_prefix(method))), None)  # fmt: skip
        noise = f" (Δ {claim['diff']:+.3f} ± {claim['std']:.3f})" if claim else ""
        lines.append(f"  {method:<10} {value:.3f}: vs linear {value - linear:+.3f}, "
                     f"vs TA {value - ta:+.3f}{noise}")  # fmt: skip
    return lines


def forgetting_lines(result: Mapping[str, Any]) -> list[str]:
    """Each fine-tune's test average over ALL the zoo's tasks against the base's: below it,
    the fine-tune forgot more of the other tasks than it gained on its own."""
    base = _test_avg(result["rows"], "pretrained")
    tuned = {r["method"].removeprefix("finetune:"): float(r["test"]["accuracy/avg"])
             for r in result["rows"] if r["method"].startswith("finetune:")}  # fmt: skip
    if base is None or not tuned:
        return []
    below = [t for t, v in tuned.items() if v < base]
    each = ", ".join(f"{t} {v:.3f}" for t, v in tuned.items())
    mean = sum(tuned.values()) / len(tuned)
    return [f"  forgetting: base {base:.3f}, fine-tunes on all tasks {mean:.3f} ({each}); "
            f"below the base: {', '.join(below) or 'none'}"]  # fmt: skip


def _claim_prefix(method: str) -> str:
    return {"regmean": "regmean", "adamerging": "layer-wise adamerging", "wudi": "wudi",
            "iso_c": "iso-c"}[method]  # fmt: skip


def geometry(base: StateDict, tuned: Sequence[StateDict]) -> dict[str, float]:
    """Mean / max pairwise cosine of the flattened task vectors and mean ‖τ‖/‖θ0‖."""
    keys = [k for k, v in base.items() if v.is_floating_point()]
    flat0 = torch.cat([base[k].flatten().double() for k in keys])
    vectors = [torch.cat([(m[k] - base[k]).flatten().double() for k in keys]) for m in tuned]
    cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0))
               for a, b in combinations(vectors, 2)]  # fmt: skip
    sizes = [float(v.norm() / flat0.norm()) for v in vectors]
    return {
        "cos_mean": sum(cosines) / max(len(cosines), 1),
        "cos_max": max(cosines, default=0.0),
        "rel_norm": sum(sizes) / len(sizes),
    }


def subspace_overlap(base: StateDict, tuned: Sequence[StateDict], k: int = 8) -> dict[str, float]:
    """Over the 2-D weights (embedding left out), the mean pairwise overlap ``‖U_iᵀU_j‖²_F / k``
    of the task vectors' top-``k`` left singular subspaces (0: disjoint, 1: the same; random
    subspaces give about k / rows) and the share of each task vector's energy in its top ``k``
    singular values. ISO-C, TSV and WUDI act on these subspaces: with little overlap there is
    little interference for them to remove."""
    keys = [key for key, v in base.items() if v.ndim == 2 and "embed" not in key]
    overlaps, energies, chance = [], [], []
    for key in keys:
        bases = []
        for model in tuned:
            u, sv, _ = torch.linalg.svd((model[key] - base[key]).double(), full_matrices=False)
            bases.append(u[:, :k])
            energies.append(float((sv[:k] ** 2).sum() / (sv**2).sum().clamp_min(1e-30)))
        overlaps += [float((a.T @ b).pow(2).sum() / k) for a, b in combinations(bases, 2)]
        chance.append(k / base[key].shape[0])
    return {
        "overlap": sum(overlaps) / max(len(overlaps), 1),
        "chance": sum(chance) / max(len(chance), 1),
        "energy_top_k": sum(energies) / max(len(energies), 1),
    }


def adamerging_why(zoo_dir: Path) -> str:
    """Entropy and validation accuracy from λ = 0.3, after entropy and after the labelled proxy."""
    zoo = load_lm_zoo(zoo_dir)
    val = LMTasksEvaluator(zoo_dir, split="validation")
    entropy = val.unlabeled_objective()
    models = list(zoo.tasks.values())
    start = mergeops.merge("task_arithmetic", models, base=zoo.base, **{"lambda": 0.3})
    parts = [f"λ=0.3: entropy {float(entropy.loss(start)):.3f}, "
             f"val {val.evaluate(start)['accuracy/avg']:.3f}"]  # fmt: skip
    for label, objective in (("entropy", entropy), ("proxy", val.objective())):
        learnt = mergeops.merge("adamerging", models, base=zoo.base, objective=objective,
                                **ADA_LEARN)  # fmt: skip
        parts.append(f"after {label}: entropy {float(entropy.loss(learnt)):.3f}, "
                     f"val {val.evaluate(learnt)['accuracy/avg']:.3f}")  # fmt: skip
    return "; ".join(parts)


def zoo_why(result: Mapping[str, Any], root: Path | None, *, ada: bool = True) -> list[str]:
    """Every analysis line of one zoo (geometry and AdaMerging need its folder under ``root``)."""
    lines = [f"{result['zoo']} (seed {result.get('seed')}, {','.join(result.get('tasks', []))})"]
    lines += row_lines(result)
    zoo_dir = root / result["zoo"] if root is not None else None
    if zoo_dir is None or not zoo_dir.is_dir():
        return lines
    zoo = load_lm_zoo(zoo_dir)
    g = geometry(zoo.base, list(zoo.tasks.values()))
    lines.append(f"  task vectors: cosine mean {g['cos_mean']:+.3f} max {g['cos_max']:+.3f}, "
                 f"‖τ‖/‖θ0‖ {g['rel_norm']:.3f}")  # fmt: skip
    sub = subspace_overlap(zoo.base, list(zoo.tasks.values()))
    lines.append(f"  subspaces (top 8 per weight): pairwise overlap {sub['overlap']:.3f} "
                 f"(random {sub['chance']:.3f}), energy in top 8 {sub['energy_top_k']:.3f}")  # fmt: skip
    if ada:
        lines.append(f"  adamerging (layer): {adamerging_why(zoo_dir)}")
    return lines


def verdict_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per frontier method over the zoos: on how many its claim holds, the mean Δ vs task
    arithmetic against its pooled std, and on how many zoos it falls below the plain average
    (then it removes signal, not interference); a claim that fails within the noise is said so."""
    lines = []
    for method in FRONTIER:
        found = []
        for result in results:
            value, linear = _test_avg(result["rows"], method), _test_avg(result["rows"], "linear")
            claim = next((c for name, c in result["claims"].items()
                          if name.lower().startswith(_claim_prefix(method))), None)  # fmt: skip
            if value is not None and linear is not None and claim is not None:
                found.append((claim, value - linear))
        if not found:
            continue
        n, held = len(found), sum(bool(c["held"]) for c, _ in found)
        mean = sum(c["diff"] for c, _ in found) / n
        pooled = sum(c["std"] ** 2 for c, _ in found) ** 0.5 / n
        below = sum(gain < 0 for _, gain in found)
        reversed_ = sum(c["diff"] < -2 * c["std"] for c, _ in found)
        if held * 2 > n:
            why = "holds"
        elif reversed_ * 2 > n:
            why = f"fails: reversed beyond noise on {reversed_}/{n}"
        else:
            why = f"fails within the noise on {n - held - reversed_}/{n}"
        lines.append(f"  {method:<10} holds on {held}/{n}; mean Δ vs TA {mean:+.3f} ± {pooled:.3f}; "
                     f"below linear on {below}/{n}: {why}")  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmzoo.frontier_why", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--json", type=Path, nargs="+", required=True,
                        help="bench.lmzoo.claims --json outputs")  # fmt: skip
    parser.add_argument("--root", type=Path, default=Path("bench/out/lmzoo-claims"),
                        help="where the zoos are (geometry, AdaMerging); default bench/out/lmzoo-claims")  # fmt: skip
    parser.add_argument("--no-adamerging", action="store_true", help="skip the AdaMerging runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [r for path in args.json for r in json.loads(path.read_text())]
    for result in results:
        print("\n".join(zoo_why(result, args.root, ada=not args.no_adamerging)), flush=True)
    print(f"over {len(results)} zoos:")
    print("\n".join(verdict_lines(results)))


if __name__ == "__main__":
    main()
