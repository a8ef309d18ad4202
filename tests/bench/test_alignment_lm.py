"""``bench.alignment_lm`` end to end on the smallest LM bases (two seeds, trained here)."""

from __future__ import annotations

import re

import torch

from bench.alignment_lm import PLAIN, run, untie
from bench.lmzoo.train import LMTrainConfig

TINY = LMTrainConfig(hidden=32, layers=1, heads=2, pool=64, batch_size=8, pretrain_steps=20)


def test_two_seed_bases_are_merged_scored_and_judged(tmp_path):
    torch.manual_seed(0)
    lines, scores = run(TINY, seeds=(0, 1), cache=tmp_path, probe_size=2, test_size=8)
    text = "\n".join(lines)
    # as save_pretrained writes them (tied head left out) the methods refuse, naming the tensor
    assert "pleas (as saved, tied head)  FAILED: MergeError: layer 'residual': model 'seed_a' " \
        "has no 'lm_head.weight'" in text  # fmt: skip
    for row in (
        "parent a",
        "parent b",
        PLAIN,
        "pleas",
        "pleas width x1.5 (in memory)",
        "pleas width x2.0 (in memory)",
        "ot_fusion (exact)",
        "ot_fusion (sinkhorn)",
    ):
        assert set(scores[row]) and all(len(h) == 8 for h in scores[row].values()), row
    assert text.count("claim for ") == 6 and "linear R²" in text
    errors = re.search(r"permute only ([\d.]+), with least squares ([\d.]+)", text)
    assert errors and float(errors[2]) < float(errors[1])  # step 3 does what it minimises
    saved = sorted(p.name.split("-")[1] for p in tmp_path.iterdir() if p.name.startswith("base-"))
    assert saved == ["seed0", "seed1"]  # both bases trained once and cached


def test_same_seed_twice_merges_back_to_the_parent(tmp_path):
    """Identical parents: every hard merge is the parent, so the plumbing (untie, re-tie,
    scoring, a wider scorer for wider MLPs) is exact (Sinkhorn's soft map blurs even identical neurons, so it is left out)."""
    _, scores = run(TINY, seeds=(0, 0), cache=tmp_path, probe_size=2, test_size=8)
    rows = ("pleas", "pleas (permute only)", "pleas width x2.0 (in memory)", "ot_fusion (exact)")
    for row in (*rows, PLAIN):
        for task, hits in scores[row].items():
            assert torch.equal(hits, scores["parent a"][task]), (row, task)
    state = {"model.embed_tokens.weight": torch.ones(3, 2)}
    assert untie(state)["lm_head.weight"] is state["model.embed_tokens.weight"]
