"""Zoos of one seed share their pretrained base through ``base_cache`` (the claims over task
lists pretrain each seed once); the cached base gives the same zoo as a fresh pretraining."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.lmzoo.build import base_key, build_lm_zoo
from bench.lmzoo.tasks import TASKS
from bench.lmzoo.train import LMTrainConfig

TINY = LMTrainConfig(
    hidden=16, heads=2, pool=40, batch_size=8, pretrain_steps=6, finetune_steps=3, lora_steps=1,
    lora_rank=2, trajectory_points=1, fisher_examples=2, irrelevant=0, shard_size="20KB",
)  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_base_is_pretrained_once_per_seed_and_reused(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cache = tmp_path / "bases"
    quiet = {"config": TINY, "log": lambda _: None}
    build_lm_zoo(tmp_path / "fresh", seed=3, tasks=["sort", "copy"], **quiet)  # no cache
    build_lm_zoo(tmp_path / "a", seed=3, tasks=["copy"], base_cache=cache, **quiet)
    [cached] = cache.iterdir()
    assert cached.name == base_key(3, list(TASKS), TINY)
    build_lm_zoo(tmp_path / "b", seed=3, tasks=["sort", "copy"], base_cache=cache, **quiet)
    assert len(list(cache.iterdir())) == 1  # another task list, same base
    fresh = _weights(tmp_path / "fresh" / "base")
    for zoo in ("a", "b"):
        assert _weights(tmp_path / zoo / "base").keys() == fresh.keys()
        for key, value in fresh.items():
            torch.testing.assert_close(
                _weights(tmp_path / zoo / "base")[key], value, rtol=0, atol=0
            )
    tuned = [_weights(tmp_path / z / "tasks/sort/model") for z in ("fresh", "b")]
    for key, value in tuned[0].items():  # the fine-tune from the cached base is the same
        torch.testing.assert_close(tuned[1][key], value, rtol=0, atol=0)
    assert base_key(3, list(TASKS), TINY.model_copy(update={"finetune_lr": 1.0})) == cached.name
    assert base_key(4, list(TASKS), TINY) != cached.name
    assert base_key(3, ["copy"], TINY) != cached.name
