"""The frontier rows on a tiny LM zoo: Grams captured at build time (regmean), the unlabeled
entropy objective (adamerging) and the Gram probe (regmean_plusplus), through the zoo's own
quality table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.lmzoo.build import build_lm_zoo
from bench.lmzoo.evaluator import LMTasksEvaluator
from bench.lmzoo.manifest import LMZooManifest
from bench.lmzoo.quality import lm_multitask_rows, load_lm_zoo
from bench.lmzoo.train import LMTrainConfig

TINY = LMTrainConfig(
    hidden=32, heads=2, pool=100, batch_size=16, pretrain_steps=20, finetune_steps=8,
    lora_steps=2, lora_rank=4, trajectory_points=2, fisher_examples=4, irrelevant=0,
    shard_size="20KB",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LMZooManifest]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("lmzoo-frontier")
        manifest = build_lm_zoo(out, seed=0, tasks=["copy", "sort"], config=TINY,
                                log=lambda _: None)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return out, manifest


def test_grams_are_captured_per_linear_weight(tiny_zoo: tuple[Path, LMZooManifest]) -> None:
    zoo, manifest = tiny_zoo
    entry = manifest.tasks["copy"]
    assert entry.gram is not None
    grams = load_file(str(zoo / entry.gram))
    weights = load_file(str(next((zoo / entry.model).glob("*.safetensors"))))
    assert "lm_head.weight" not in grams  # tied head: not a saved weight
    q = "model.layers.0.self_attn.q_proj.weight"
    assert grams[q].shape == (32, 32) and torch.equal(
        grams[q], grams["model.layers.0.self_attn.k_proj.weight"]
    )  # same inputs
    for key, gram in grams.items():
        assert gram.shape == (weights[key].shape[1],) * 2, key
        assert torch.allclose(gram, gram.T, atol=1e-5) and torch.linalg.eigvalsh(gram).min() > -1e-4


def test_unlabeled_objective_is_differentiable(tiny_zoo: tuple[Path, LMZooManifest]) -> None:
    zoo, _ = tiny_zoo
    val = LMTasksEvaluator(zoo, split="validation", proxy_size=8)
    params = {k: v.clone().requires_grad_(True) for k, v in load_lm_zoo(zoo).base.items()}
    loss = val.unlabeled_objective().loss(params)
    loss.backward()
    assert (
        0 < float(loss.detach()) <= 2 * torch.log(torch.tensor(float(val.model.config.vocab_size)))
    )
    assert params["model.layers.1.mlp.down_proj.weight"].grad.abs().sum() > 0


def test_probe_matches_captured_grams(tiny_zoo: tuple[Path, LMZooManifest]) -> None:
    zoo, _ = tiny_zoo
    loaded = load_lm_zoo(zoo)
    probe = LMTasksEvaluator(zoo).gram_probe()
    assert probe.linear_weights()[:2] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ]
    grams = probe.input_grams(loaded.tasks["sort"], "sort")
    for key, gram in loaded.grams["sort"].items():
        assert torch.allclose(grams[key], gram, atol=1e-4), key


def test_frontier_rows_on_tiny_zoo(tiny_zoo: tuple[Path, LMZooManifest]) -> None:
    zoo, _ = tiny_zoo
    val = LMTasksEvaluator(zoo, split="validation", proxy_size=8)
    test = LMTasksEvaluator(zoo, split="test")
    rows = lm_multitask_rows(
        load_lm_zoo(zoo), val, test, methods=["regmean", "adamerging"], log=lambda _: None
    )
    by_name = {r.method: r for r in rows}
    assert {"regmean", "adamerging"} <= set(by_name)
    for method in ("regmean", "adamerging"):
        assert 0.0 <= by_name[method].test["accuracy/avg"] <= 1.0
        assert by_name[method].params  # a grid point was chosen


def test_claims_summary_counts_zoos_and_spread() -> None:
    from bench.lmzoo.claims import CLAIMS, summarize

    def zoo(diff: float, held: bool) -> dict:
        claims = {c: {"diff": diff, "std": 0.01, "p": 0.0, "held": held} for c, *_ in CLAIMS}
        summary = {"pretrained": 0.4, "finetuned_own": 0.9, "finetune_all_tasks_avg": 0.5,
                   "best": "ties", "best_normalized": 0.8}  # fmt: skip
        return {"claims": claims, "summary": summary}

    lines = summarize([zoo(0.05, True), zoo(0.03, True), zoo(-0.01, False)])
    first = lines[0]
    assert CLAIMS[0][0] in first and "HOLDS" in first and "2/3" in first
    assert "[-0.010, +0.050]" in first and "+0.023" in first
    assert "pooled ±0.006" in first  # sqrt(3 · 0.01²) / 3
    assert "does not hold" in summarize([zoo(0.05, True), zoo(-0.01, False)])[0]
