"""The frontier merges' claims on the digits zoo, with paired-bootstrap noise:
``python -m bench.frontier_claims --zoo DIR [--zoo DIR ...]``.

Each zoo's table is computed as ``bench.zoo.quality`` does (hyperparameters chosen on the
validation split, scored on test); then each claim's two merges are compared on the same
resampled test examples (paired bootstrap over examples within each task). Claims (issue 19):
RegMean, layer-wise AdaMerging, WUDI and ISO-C each beat task arithmetic beyond the noise;
the best merge keeps >= 85 % of the fine-tunes' average (normalised accuracy). A claim counts
where it holds on most zoos.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

import mergeops
from bench.lmzoo.analysis import paired_bootstrap
from bench.zoo.evaluator import DigitsEvaluator
from bench.zoo.loaded import load_zoo
from bench.zoo.quality import GRIDS, _merge_fn, format_table, multitask_rows, select

CONTENDERS = ("regmean", "regmean_plusplus", "adamerging", "wudi", "iso_c", "iso_cts", "tsv_m")
METHODS = (
    "task_arithmetic",
    "ties",
    *CONTENDERS,
    "adamerging_proxy",
    "pcb",
    "doge_ta",
    "magmax",
    "emr",
)


def zoo_claims(zoo_dir: Path, log=print) -> list[tuple[str, bool, str]]:
    """(claim, held, detail) for one zoo; prints its table."""
    zoo = load_zoo(zoo_dir)
    val = DigitsEvaluator(zoo_dir, split="validation")
    test = DigitsEvaluator(zoo_dir, split="test")
    rows = multitask_rows(zoo, val, test, methods=list(METHODS), log=lambda _: None)
    log(f"\n== {zoo_dir} (seed {zoo.manifest.seed})\n{format_table(rows)}")
    objective = val.objective()
    avg = lambda sd: val.evaluate(sd)["accuracy/avg"]  # noqa: E731
    hits = {}
    for method in ("task_arithmetic", *CONTENDERS):
        grid = GRIDS[method]
        if method == "adamerging":  # the claim is about the layer-wise variant
            grid = [p for p in grid if p["granularity"] == "layer"]
        _, merged, _ = select(_merge_fn(method, zoo, objective, val), grid, avg)
        hits[method] = test.per_example(merged)
    claims = []
    for method in ("regmean", "adamerging", "wudi", "iso_c"):
        diff, std, p = paired_bootstrap(hits[method], hits["task_arithmetic"])
        held = diff > 2 * std
        claims.append((f"{method} beats task_arithmetic", held,
                       f"{diff:+.3f} ± {std:.3f} (P(Δ<=0) = {p:.2f})"))  # fmt: skip
    best = max((r for r in rows if r.section == "multitask" and r.method != "pretrained"),
               key=lambda r: r.test.get("normalized_accuracy/avg", 0.0))  # fmt: skip
    norm = best.test["normalized_accuracy/avg"]
    claims.append(("best merge keeps >= 85 % (normalised)", norm >= 0.85,
                   f"{best.method}: {norm:.3f}"))  # fmt: skip
    return claims


def adamerging_analysis(zoo_dir: Path) -> str:
    """Why AdaMerging's claim fails or holds: entropy and accuracy before and after learning λ
    (layer-wise, from 0.3), with the unlabeled entropy objective and with the labelled proxy."""
    zoo = load_zoo(zoo_dir)
    val = DigitsEvaluator(zoo_dir, split="validation")
    entropy = val.unlabeled_objective()
    models = list(zoo.tasks.values())
    start = mergeops.merge("task_arithmetic", models, base=zoo.base, **{"lambda": 0.3})
    parts = [f"start (λ=0.3): entropy {float(entropy.loss(start)):.2f}, "
             f"val acc {val.evaluate(start)['accuracy/avg']:.3f}"]  # fmt: skip
    for label, objective in (("entropy", entropy), ("labelled proxy", val.objective())):
        learnt = mergeops.merge("adamerging", models, base=zoo.base, objective=objective,
                                granularity="layer", steps=100, lr=0.005)  # fmt: skip
        parts.append(f"after {label}: entropy {float(entropy.loss(learnt)):.2f}, "
                     f"val acc {val.evaluate(learnt)['accuracy/avg']:.3f}")  # fmt: skip
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.frontier_claims", description=__doc__)
    parser.add_argument("--zoo", type=Path, action="append", required=True,
                        help="a digits zoo built by bench.zoo.build (repeat for seeds)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    outcomes: dict[str, list[bool]] = {}
    lines = []
    for zoo_dir in args.zoo:
        for claim, held, detail in zoo_claims(zoo_dir):
            outcomes.setdefault(claim, []).append(held)
            lines.append(f"  {zoo_dir.name}: {claim}: {'HOLDS' if held else 'fails'} — {detail}")
    print("\nclaims (a claim counts where it holds on most zoos):")
    print("\n".join(lines))
    for claim, held in outcomes.items():
        verdict = "holds" if sum(held) * 2 > len(held) else "does not hold"
        print(f"  {claim}: {verdict} ({sum(held)}/{len(held)})")
    print("\nwhy adamerging (entropy) trails: lower entropy is not higher accuracy on this zoo")
    for zoo_dir in args.zoo:
        print(f"  {zoo_dir.name}: {adamerging_analysis(zoo_dir)}")


if __name__ == "__main__":
    main()
