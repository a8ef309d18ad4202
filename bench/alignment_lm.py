"""Merges of LM-zoo models that share no base: ``python -m bench.alignment_lm``.

Issue 21's alignment claim on Llama-style transformers: the LM zoo's pretrained bases of two
seeds (same data mix and config, different initialisation and data order; reused from the
``bench.lmzoo.build.pretrained_base`` cache, trained there when missing) are merged by the
plain average of the unaligned weights, ``pleas`` (with and without least squares, and wider
MLP blocks in memory at x1.5 and x2.0) and ``ot_fusion`` (exact and Sinkhorn). Features come
from unlabeled VALIDATION prompts of every task (``bench.lmzoo.features``'s probe: residual
stream, attention heads, MLP neurons, and the inputs of every linear unit for pleas's least
squares). Every parent and merge is scored by exact match on the TEST prompts of each task;
differences are paired-bootstrapped over test prompts
(``bench.lmzoo.analysis.paired_bootstrap``). The ``pleas unit error`` line gives what the
least-squares step minimises, without and with it.

To say why a claim fails, the ``alignment`` lines give, per neuron layer, the mean feature
correlation of the two parents' neurons matched one-to-one (Hungarian on correlation) next to
that of the identity matching: matched neurons that correlate weakly mean the two models do
not compute the same features, so no permutation makes their average work.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

import mergeops
from bench.lmzoo.analysis import paired_bootstrap
from bench.lmzoo.build import EVAL_SIZES, pretrained_base
from bench.lmzoo.evaluator import prompt_batch
from bench.lmzoo.features import LlamaFeatureProbe
from bench.lmzoo.model import batch, exact_match, load_weights
from bench.lmzoo.tasks import TASKS, examples
from bench.lmzoo.train import LMTrainConfig, saved_state
from mergeops.methods.alignment.pleas import PleasParams, pleas_maps, pleas_merge, unit_errors

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

StateDict = dict[str, torch.Tensor]
Hits = dict[str, torch.Tensor]
DEFAULT_CACHE = Path("bench/out/lmzoo-claims/bases")
PLAIN = "plain average (unaligned)"
#: The claim's "wide margin" over the plain average and "approach": within this of the better parent.
MARGIN, APPROACH = 0.10, 0.10


def untie(state: StateDict) -> StateDict:
    """The state with the tied head written out (``lm_head.weight`` = the embedding): the
    Llama probe's residual layer moves ``lm_head.weight``'s columns, and ``save_pretrained``
    leaves a tied head out, so the methods refuse the saved state as it is."""
    return {**state, "lm_head.weight": state["model.embed_tokens.weight"]}


def _tied(merged: StateDict) -> StateDict:
    """Back to the saved form; the merged head must still equal the merged embedding."""
    head = merged.pop("lm_head.weight")
    if not torch.allclose(head, merged["model.embed_tokens.weight"], atol=1e-5):
        raise ValueError("merged lm_head.weight differs from model.embed_tokens.weight: "
                         "the merge broke the tied head")  # fmt: skip
    return merged


def _rows(
    a: StateDict, b: StateDict, probe: LlamaFeatureProbe
) -> dict[str, Callable[[], StateDict]]:
    saved = {"seed_a": a, "seed_b": b}
    named = {k: untie(v) for k, v in saved.items()}

    def aligned(method: str, **params: Any) -> Callable[[], StateDict]:
        return lambda: _tied(mergeops.merge(method, named, objective=probe, **params))

    def wider(factor: float) -> Callable[[], StateDict]:
        params = PleasParams(width_factor=factor)
        return lambda: _tied(pleas_merge(list(named.values()), probe, params))

    return {
        "parent a": lambda: a,
        "parent b": lambda: b,
        PLAIN: lambda: mergeops.merge("linear", saved),
        "pleas (as saved, tied head)": lambda: mergeops.merge("pleas", saved, objective=probe),
        "pleas": aligned("pleas"),
        "pleas (permute only)": aligned("pleas", least_squares=False),
        "pleas width x1.5 (in memory)": wider(1.5),
        "pleas width x2.0 (in memory)": wider(2.0),
        "ot_fusion (exact)": aligned("ot_fusion"),
        "ot_fusion (sinkhorn)": aligned("ot_fusion", solver="sinkhorn"),
    }


def _mean(h: Hits) -> float:
    return float(torch.stack([v.mean() for v in h.values()]).mean())


def probe_for(model: torch.nn.Module, tasks: Sequence[str], n: int, seed: int) -> LlamaFeatureProbe:
    """A feature probe on ``n`` unlabeled validation prompts per task (answers dropped)."""
    prompts = [p for t in tasks for p, _ in examples(t, "validation", n=n, seed=seed + 7)]
    return LlamaFeatureProbe(model.config, prompt_batch(prompts).input_ids)


def _corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    y = (y - y.mean(0)) / (y.std(0) + 1e-8)
    return (x.T @ y) / len(x)


def linear_r2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out R² of ``y`` from an affine map of ``x`` (fit on even rows, scored on odd rows),
    the mean over ``y``'s columns: how much of b's features any linear map (not only a
    permutation) recovers from a's."""
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    fit = torch.linalg.lstsq(x1[0::2], y[0::2].double()).solution
    test, pred = y[1::2].double(), x1[1::2] @ fit
    sst = ((test - test.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return float((1 - ((test - pred) ** 2).sum(0) / sst).mean())


def alignment_lines(a: StateDict, b: StateDict, probe: LlamaFeatureProbe) -> list[str]:
    """Per layer: mean correlation of identity-matched and Hungarian-matched neurons, and the
    held-out R² of b's features from a linear map of a's."""
    from scipy.optimize import linear_sum_assignment

    lines = ["alignment: mean feature correlation of the parents' neurons (identity / matched), "
             "held-out R² of b's features from a linear map of a's"]  # fmt: skip
    for layer in probe.layer_order():
        fa, fb = probe.features(a, layer.name), probe.features(b, layer.name)
        r2 = linear_r2(fa, fb)
        if layer.group > 1:  # heads: one feature per head, the mean over its dims
            fa = fa.reshape(len(fa), -1, layer.group).mean(-1)
            fb = fb.reshape(len(fb), -1, layer.group).mean(-1)
        c = _corr(fa, fb)
        rows, cols = linear_sum_assignment(c.numpy(), maximize=True)
        lines.append(f"  {layer.name:<10} identity {float(c.diagonal().mean()):+.3f}  "
                     f"matched {float(c[rows, cols].mean()):+.3f}  linear R² {r2:+.3f}  "
                     f"({c.shape[0]} neurons)")  # fmt: skip
    return lines


def unit_error_lines(a: StateDict, b: StateDict, probe: LlamaFeatureProbe) -> list[str]:
    """pleas's step-3 objective on these bases: the mean relative error of every linear unit
    (q/k/v, o_proj, gate/up, down_proj) of the merge, on its own inputs, against the mapped
    average of the parents' outputs, without and with least squares."""
    models = [untie(a), untie(b)]
    maps = pleas_maps(models, probe, PleasParams())
    errors = []
    for least_squares in (False, True):
        merged = pleas_merge(models, probe, PleasParams(least_squares=least_squares))
        found = unit_errors(merged, models, maps, probe)
        errors.append(sum(found.values()) / len(found))
    return [f"pleas unit error (mean relative, {len(found)} units): permute only "
            f"{errors[0]:.3f}, with least squares {errors[1]:.3f}"]  # fmt: skip


def _scorer(model: torch.nn.Module, state: StateDict) -> LlamaForCausalLM:
    """``model``, or a fresh one whose ``intermediate_size`` fits a wider merge's MLPs."""
    from transformers import LlamaForCausalLM

    llama = cast("LlamaForCausalLM", model)
    width = state["model.layers.0.mlp.gate_proj.weight"].shape[0]
    if width == llama.config.intermediate_size:
        return llama
    config = type(llama.config)(**{**llama.config.to_dict(), "intermediate_size": width})
    return LlamaForCausalLM(config).eval()


def _hits(
    model: torch.nn.Module, state: StateDict, tasks: Sequence[str], n: int, seed: int
) -> Hits:
    scored = load_weights(_scorer(model, state), state)
    return {t: exact_match(scored, batch(examples(t, "test", n=n, seed=seed))) for t in tasks}


def run(
    config: LMTrainConfig,
    *,
    seeds: tuple[int, int] = (0, 1),
    cache: Path | None = DEFAULT_CACHE,
    probe_size: int = 16,
    test_size: int = EVAL_SIZES["test"],
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[str], dict[str, Hits]]:
    """Load (or pretrain) both bases, score every row; return the report lines and hits."""
    tasks = list(TASKS)
    models = [pretrained_base(s, tasks, config, cache) for s in seeds]
    a, b = (saved_state(m) for m in models)
    probe = probe_for(models[0], tasks, probe_size, seeds[0])
    lines = [f"LM zoo bases of seeds {seeds[0]} (a) and {seeds[1]} (b), no shared base; "
             f"test exact match (mean of {len(tasks)} tasks, {test_size} prompts each)"]  # fmt: skip
    scores: dict[str, Hits] = {}
    for name, make in _rows(a, b, probe).items():
        start = time.perf_counter()
        try:
            state = make()
        except Exception as error:  # report the method's failure exactly, go on with the rest
            lines.append(f"  {name:<28} FAILED: {type(error).__name__}: {error}")
            log(lines[-1])
            continue
        took = time.perf_counter() - start
        scores[name] = _hits(models[0], state, tasks, test_size, seeds[0])
        per_task = " ".join(f"{t} {float(v.mean()):.3f}" for t, v in scores[name].items())
        lines.append(f"  {name:<28} {_mean(scores[name]):.3f}  ({per_task}; "
                     f"merge {took:.1f} s)")  # fmt: skip
        log(lines[-1])
    lines += verdict_lines(scores)
    lines += unit_error_lines(a, b, probe)
    lines += alignment_lines(a, b, probe)
    return lines, scores


def verdict_lines(scores: Mapping[str, Hits]) -> list[str]:
    """Bootstrapped differences to the plain average and the better parent, and the verdict."""
    best = max(("parent a", "parent b"), key=lambda n: _mean(scores[n]))
    lines = ["paired bootstrap over test prompts (Δ ± std; P(Δ <= 0)):"]
    holds = {}
    for name in (n for n in scores if n.startswith(("pleas", "ot_fusion"))):
        d_plain, s_plain, p_plain = paired_bootstrap(scores[name], scores[PLAIN])
        d_best, s_best, p_best = paired_bootstrap(scores[name], scores[best])
        lines.append(f"  {name} - {PLAIN}: {d_plain:+.3f} ± {s_plain:.3f} (P = {p_plain:.2f})")
        lines.append(f"  {name} - {best}: {d_best:+.3f} ± {s_best:.3f} (P = {p_best:.2f})")
        holds[name] = d_plain >= MARGIN and p_plain < 0.05 and d_best >= -APPROACH
    for name, ok in holds.items():
        lines.append(f"claim for {name} (beats plain by >= {MARGIN:.2f}, within {APPROACH:.2f} "
                     f"of {best}): {'HOLDS' if ok else 'FAILS'}")  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="pretrained-base cache (bases trained and saved there when missing)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 1), help="the two base seeds")
    parser.add_argument("--probe-size", type=int, default=16,
                        help="unlabeled validation prompts per task for the features")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines, _ = run(LMTrainConfig(), seeds=tuple(args.seeds), cache=args.cache,
                   probe_size=args.probe_size, log=print)  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
