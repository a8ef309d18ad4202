"""Round-3 LM zoo fine-tunes (issue 19): low-rank factors folded into full checkpoints, replay
of the pretraining mix, a larger test split, and digests that leave older zoos' names alone."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.lmzoo.build import build_lm_zoo, zoo_key
from bench.lmzoo.evaluator import LMTasksEvaluator
from bench.lmzoo.lowrank import TARGETS
from bench.lmzoo.model import lm_config, new_model
from bench.lmzoo.tasks import TASKS, TOKEN_ID
from bench.lmzoo.train import NEAR_CONFIG, LMTrainConfig, Sampler, finetune, saved_state

TINY = LMTrainConfig(
    hidden=16, heads=2, pool=40, batch_size=8, pretrain_steps=4, finetune_steps=4, lora_steps=0,
    trajectory_points=2, fisher_examples=2, irrelevant=0, shard_size="20KB",
    finetune_mode="lowrank", finetune_rank=2, finetune_lr=1e-2, replay=0.25, moment_steps=2,
    test_size=200,
)  # fmt: skip


def test_added_fields_at_their_defaults_keep_old_zoo_names() -> None:
    round2 = LMTrainConfig(finetune_lr=1e-3, lora_steps=0)
    assert zoo_key(0, ["reverse", "sort", "count", "brackets"], round2) == "lm-seed0-4t-73acfef3ad"
    assert zoo_key(0, ["copy", "sort", "count", "brackets"], round2) == "lm-seed0-4t-20698abd62"
    for changed in ({"replay": 0.1}, {"test_size": 512}, {"finetune_mode": "lowrank"}):
        assert zoo_key(0, ["copy"], round2.model_copy(update=changed)) != zoo_key(
            0, ["copy"], round2
        )
    assert zoo_key(0, ["copy"], NEAR_CONFIG) != zoo_key(0, ["copy"], LMTrainConfig())


def test_replay_takes_its_share_from_the_pretraining_mix() -> None:
    sampler = Sampler(["copy"], seed=0, pool=40, replay=0.25, replay_tasks=list(TASKS))
    tags = sampler.next(32).input_ids[:, 1].tolist()  # token after BOS is the task's tag
    assert sum(t == TOKEN_ID["C"] for t in tags) >= 24  # 24 copy + 8 from the mix
    assert len(set(tags)) > 2  # the mix brings other tasks
    plain = Sampler(["copy"], seed=0, pool=40)
    assert set(plain.next(32).input_ids[:, 1].tolist()) == {TOKEN_ID["C"]}


def test_lowrank_finetune_folds_rank_r_updates_into_full_weights() -> None:
    torch.set_num_threads(1)
    base = new_model(lm_config(hidden=16, layers=2, heads=2), 0)
    before = saved_state(base)
    run = finetune(base, "copy", seed=0, config=TINY)
    after = saved_state(run.model)
    assert after.keys() == before.keys() and len(run.trajectory) == 2
    for key, value in after.items():
        delta = (value - before[key]).double()
        if any(f".{t}." in key for t in TARGETS):
            rank = int(torch.linalg.matrix_rank(delta, rtol=1e-4))  # float32 rounding
            assert 0 < rank <= TINY.finetune_rank, (key, rank)
        else:  # embeddings and norms stay the base's
            assert torch.equal(value, before[key]), key
    moments = [run.optimizer.state[p]["exp_avg_sq"] for p in run.model.parameters()]
    assert all(m.sum() > 0 for m in moments[1:])  # every weight has second moments


def test_tiny_lowrank_zoo_has_a_larger_test_split(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    manifest = build_lm_zoo(tmp_path, seed=0, tasks=["copy", "count"], config=TINY,
                            log=lambda _: None)  # fmt: skip
    assert manifest.eval_sizes == {"validation": 64, "test": 200}
    moments = load_file(str(tmp_path / manifest.tasks["copy"].second_moment))
    assert "model.layers.0.self_attn.q_proj.weight" in moments
    test = LMTasksEvaluator(tmp_path, split="test")
    hits = test.per_example(load_file(str(tmp_path / "base" / "model.safetensors")))
    assert len(hits["copy"]) == 200
    assert 100 < len(hits["count"]) < 200  # count has fewer distinct test inputs: all of them
