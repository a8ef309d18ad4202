"""Merges of models that share no base on the digits multi-init zoo: ``python -m bench.alignment``.

Builds (or reuses) ``K`` digits models trained from different initialisations on the same
tasks (``bench.zoo.multi_init``), then scores on the TEST split: each parent, the plain
average of the unaligned models, pleas (engine width, and wider in memory for K = 2) and
ot_fusion (exact and Sinkhorn). Alignment features are unlabeled VALIDATION inputs.
Differences are paired-bootstrapped over test examples (``bench.lmzoo.analysis``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

import mergeops
from bench.lmzoo.analysis import paired_bootstrap
from bench.zoo.multi_init import (
    DigitsFeatureProbe,
    build_multi_init,
    hits,
    load_multi_init,
    probe_inputs,
)
from mergeops.methods.alignment.pleas import PleasParams, pleas_merge

StateDict = dict[str, torch.Tensor]
Hits = dict[str, torch.Tensor]


def _rows(models: list[StateDict], probe: DigitsFeatureProbe) -> dict[str, Callable[[], StateDict]]:
    named = {f"m{i}": m for i, m in enumerate(models)}
    rows: dict[str, Callable[[], StateDict]] = {
        f"parent {i}": (lambda m=m: m) for i, m in enumerate(models)
    }
    rows["plain average (unaligned)"] = lambda: mergeops.merge("linear", named)
    rows["pleas"] = lambda: mergeops.merge("pleas", named, objective=probe)
    rows["pleas (permute only, no least squares)"] = lambda: mergeops.merge(
        "pleas", named, objective=probe, least_squares=False
    )
    if len(models) == 2:
        for factor in (1.5, 2.0):
            rows[f"pleas width x{factor}"] = lambda f=factor: pleas_merge(
                models, probe, PleasParams.model_validate({"width_factor": f})
            )
    rows["ot_fusion (exact)"] = lambda: mergeops.merge("ot_fusion", named, objective=probe)
    rows["ot_fusion (sinkhorn)"] = lambda: mergeops.merge(
        "ot_fusion", named, objective=probe, solver="sinkhorn"
    )
    return rows


def _mean(h: Hits) -> float:
    return float(torch.stack([v.mean() for v in h.values()]).mean())


def run(out_dir: Path, *, k: int, steps: int, seed: int, log: Callable[[str], None]) -> list[str]:
    """Build or load the zoo, score every row, return the report lines."""
    if not (out_dir / "multi_init.json").exists():
        start = time.perf_counter()
        build_multi_init(out_dir, k=k, seed=seed, steps=steps)
        log(f"built {k} models in {time.perf_counter() - start:.1f} s")
    models, manifest = load_multi_init(out_dir)
    tasks: Sequence[str] = manifest["tasks"]
    probe = DigitsFeatureProbe(probe_inputs(tasks, seed=manifest["seed"]), tasks)
    scores: dict[str, Hits] = {}
    lines = [f"K = {manifest['k']} models, tasks {', '.join(tasks)}; test accuracy (mean of tasks)"]
    for name, make in _rows(models, probe).items():
        start = time.perf_counter()
        scores[name] = hits(make(), tasks, "test", seed=manifest["seed"])
        per_task = " ".join(f"{t} {float(v.mean()):.3f}" for t, v in scores[name].items())
        lines.append(f"  {name:<40} {_mean(scores[name]):.3f}  ({per_task}; "
                     f"{time.perf_counter() - start:.2f} s)")  # fmt: skip
        log(lines[-1])
    lines += _noise(scores, manifest["k"])
    return lines


def _noise(scores: Mapping[str, Hits], k: int) -> list[str]:
    best = max((f"parent {i}" for i in range(k)), key=lambda n: _mean(scores[n]))
    lines = ["paired bootstrap over test examples (Δ ± std; P(Δ <= 0)):"]
    for name in scores:
        if name.startswith(("pleas", "ot_fusion")):
            for other in ("plain average (unaligned)", best):
                diff, std, p = paired_bootstrap(scores[name], scores[other])
                lines.append(f"  {name} - {other}: {diff:+.3f} ± {std:.3f} (P = {p:.2f})")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(".ckreg-bench/multi_init"),
                        help="zoo folder (built there when missing)")  # fmt: skip
    parser.add_argument("--k", type=int, default=2, help="models from different inits")
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = run(args.out, k=args.k, steps=args.steps, seed=args.seed, log=lambda _: None)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
