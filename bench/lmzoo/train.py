"""Training the LM zoo: pretraining on a task mix, full fine-tunes, LoRA adapters, Fisher.

Everything is seeded; one thread is the fastest setting on a shared 2-core machine (the models
are ~0.3 M parameters). Fine-tunes keep their Adam optimizer (second moments are captured from
it) and the weights at a few steps along the run (trajectories, with the train loss there).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from bench.lmzoo.model import Batch, answer_loss, batch
from bench.lmzoo.tasks import TASKS, examples

StateDict = dict[str, torch.Tensor]


class LMTrainConfig(BaseModel):
    """Sizes and steps of a zoo build.

    The defaults make fine-tunes of a broadly pretrained model (issue 19, item 5): the base is
    pretrained on every task of ``bench.lmzoo.tasks.TASKS`` (``pretrain_mix="all"``: broader
    than a zoo's task list), and each fine-tune takes a few gentle steps from it (lr 3e-4,
    100 steps) so task vectors stay small and compatible. ``LEGACY_CONFIG`` is the earlier
    zoo (base pretrained on the zoo's own tasks only, fine-tunes at lr 1e-3 for 200 steps,
    which forget the other tasks).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    pool: int = 2000  # distinct train examples per task
    batch_size: int = 32
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    pretrain_mix: Literal["all", "tasks"] = "all"  # every known task, or the zoo's own
    finetune_steps: int = 100
    finetune_lr: float = 3e-4
    lora_steps: int = 150
    lora_lr: float = 4e-3
    lora_rank: int = 8
    trajectory_points: int = 3
    fisher_examples: int = 32
    loss_examples: int = 128
    irrelevant: int = 2
    shard_size: str = "400KB"  # max_shard_size of the sharded fine-tune (the model is ~1.3 MB)
    # Round 3 (fine-tunes that stay near the base). At their defaults these fields are left
    # out of a zoo's digest (``digest_fields``), so zoos built before them keep their names.
    finetune_mode: Literal["full", "lowrank"] = "full"  # lowrank: LoRA factors, folded
    finetune_rank: int = Field(8, ge=1)  # rank of the low-rank fine-tune's factors
    replay: float = Field(0.0, ge=0.0, lt=1.0)  # share of each batch from the pretraining mix
    moment_steps: int = Field(20, ge=1)  # lowrank: lr-0 Adam steps giving second moments
    test_size: int = Field(112, ge=1)  # test prompts per task (capped at distinct inputs)


#: Fields added after zoos were first built, with the defaults that reproduce those zoos.
ADDED_DEFAULTS: dict[str, object] = {
    "finetune_mode": "full", "finetune_rank": 8, "replay": 0.0, "moment_steps": 20,
    "test_size": 112,
}  # fmt: skip


def digest_fields(config: LMTrainConfig) -> dict[str, object]:
    """The config as a zoo's digest reads it: added fields at their old default left out."""
    dump = config.model_dump()
    return {k: v for k, v in dump.items() if k not in ADDED_DEFAULTS or v != ADDED_DEFAULTS[k]}


#: The zoo before issue 19: narrow pretraining, long and strong fine-tunes.
LEGACY_CONFIG = LMTrainConfig(pretrain_mix="tasks", finetune_steps=200, finetune_lr=1e-3)
#: Round 3 (issue 19): fine-tunes that learn their task and stay near the base: rank-8 LoRA
#: factors on the projections, folded into full weights, 150 steps at lr 3e-3 with 10 % of each
#: batch replayed from the pretraining mix; 512 test prompts per task. No adapters (unread).
NEAR_CONFIG = LMTrainConfig(
    finetune_mode="lowrank", finetune_rank=8, finetune_lr=3e-3, finetune_steps=150, replay=0.1,
    test_size=512, lora_steps=0,
)  # fmt: skip


@dataclass
class TrainedRun:
    """A fine-tune: final model, its optimizer, and (step, loss, weights) along the run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trajectory: list[tuple[int, float, StateDict]] = field(default_factory=list)


class Sampler:
    """Random training batches over a few tasks from fixed pools of distinct train examples."""

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        seed: int,
        pool: int,
        shuffle_answers: bool = False,
        replay: float = 0.0,
        replay_tasks: Sequence[str] = (),
    ) -> None:
        self.pairs = _pool(tasks, seed, pool)
        if shuffle_answers:  # an "irrelevant" task: every prompt gets another prompt's answer
            answers = [a for _, a in self.pairs]
            random.Random(f"shuffle:{seed}:{tasks}").shuffle(answers)
            self.pairs = [(p, a) for (p, _), a in zip(self.pairs, answers, strict=True)]
        self.rng = random.Random(f"sampler:{seed}:{','.join(tasks)}:{shuffle_answers}")
        # replay: the pretraining examples themselves (same seed and pool as ``pretrain``)
        self.replay = replay
        self.replay_pairs = _pool(replay_tasks, seed, pool) if replay > 0 else []
        if replay > 0 and not self.replay_pairs:
            raise ValueError(f"replay {replay} needs replay_tasks (got {list(replay_tasks)})")

    def next(self, size: int) -> Batch:
        """``size`` examples: a ``replay`` share from the pretraining mix, the rest the task's."""
        k = round(self.replay * size)
        picked = self.rng.sample(self.pairs, size - k)
        return batch(picked + self.rng.sample(self.replay_pairs, k) if k else picked)

    def fixed(self, size: int) -> Batch:
        return batch(random.Random(0).sample(self.pairs, min(size, len(self.pairs))))


def _pool(tasks: Sequence[str], seed: int, pool: int) -> list[tuple[str, str]]:
    return [p for t in tasks for p in examples(t, "train", n=pool, seed=seed, at_most=True)]


def _fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: Sampler,
    *,
    steps: int,
    batch_size: int,
    save_at: Sequence[int] = (),
    snapshot: Callable[[torch.nn.Module], StateDict] | None = None,
) -> list[tuple[int, float, StateDict]]:
    """Adam steps with a linear warm-up of 10 steps; weights saved after each step in ``save_at``."""
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    probe = sampler.fixed(128)
    saved = []
    model.train()
    for step in range(1, steps + 1):
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * min(1.0, step / 10)
        loss = answer_loss(model, sampler.next(batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step in save_at:
            model.eval()
            with torch.no_grad():
                probe_loss = float(answer_loss(model, probe))
            saved.append((step, probe_loss, (snapshot or saved_state)(model)))
            model.train()
    model.eval()
    return saved


def saved_state(model: torch.nn.Module) -> StateDict:
    """The weights as ``save_pretrained`` stores them (tied ``lm_head.weight`` left out)."""
    return {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }


def pretrain(
    model: torch.nn.Module, tasks: Sequence[str], *, seed: int, config: LMTrainConfig
) -> torch.nn.Module:
    """Pretrain on an even mix of every task (short: the fine-tunes add the skill)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    sampler = Sampler(tasks, seed=seed, pool=config.pool)
    _fit(model, optimizer, sampler, steps=config.pretrain_steps, batch_size=config.batch_size)
    return model


def trajectory_steps(config: LMTrainConfig) -> list[int]:
    """``trajectory_points`` steps evenly spaced from the fine-tune's middle to its end."""
    n, total = config.trajectory_points, config.finetune_steps
    if n < 2:
        return [total]
    return sorted({total - (total // 2) * i // (n - 1) for i in range(n)})


def pretrain_mix(tasks: Sequence[str], config: LMTrainConfig) -> list[str]:
    """The tasks the base is pretrained on (and fine-tunes replay): all known, or the zoo's."""
    return list(TASKS) if config.pretrain_mix == "all" else list(tasks)


def finetune(
    base: torch.nn.Module,
    task: str,
    *,
    seed: int,
    config: LMTrainConfig,
    shuffle_answers: bool = False,
    mix: Sequence[str] | None = None,
) -> TrainedRun:
    """Fine-tune of a copy of ``base`` on one task, with its trajectory: full, or low-rank and
    folded (``config.finetune_mode``); ``config.replay`` of each batch from ``mix`` (the
    pretraining tasks, default every known task)."""
    sampler = Sampler(
        [task], seed=seed, pool=config.pool, shuffle_answers=shuffle_answers,
        replay=config.replay, replay_tasks=list(mix) if mix is not None else list(TASKS),
    )  # fmt: skip
    if config.finetune_mode == "lowrank":
        from bench.lmzoo.lowrank import lowrank_finetune

        torch.manual_seed(seed)
        model, optimizer, saved = lowrank_finetune(
            base, sampler, config, save_at=trajectory_steps(config), fit=_fit
        )
        return TrainedRun(model=model, optimizer=optimizer, trajectory=saved)
    model = copy.deepcopy(base)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.finetune_lr)
    saved = _fit(
        model,
        optimizer,
        sampler,
        steps=config.finetune_steps,
        batch_size=config.batch_size,
        save_at=trajectory_steps(config),
    )
    return TrainedRun(model=model, optimizer=optimizer, trajectory=saved)


def train_lora(
    base: torch.nn.Module, task: str, *, seed: int, config: LMTrainConfig
) -> torch.nn.Module:
    """A PEFT LoRA adapter (attention and MLP projections) on a copy of ``base``."""
    from bench.lmzoo.lowrank import lora_model

    torch.manual_seed(seed)
    model = lora_model(base, config.lora_rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lora_lr)
    sampler = Sampler([task], seed=seed, pool=config.pool)
    _fit(model, optimizer, sampler, steps=config.lora_steps, batch_size=config.batch_size)
    return model


def diagonal_fisher(model: torch.nn.Module, data: Batch) -> StateDict:
    """Empirical diagonal Fisher: mean over examples of the squared per-example gradient of the
    answer log-likelihood, keyed like the saved weights."""
    params = {k: p for k, p in model.named_parameters() if k != "lm_head.weight"}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    n = data.input_ids.shape[0]
    for i in range(n):
        one = Batch(
            data.input_ids[i : i + 1], data.attention_mask[i : i + 1], data.labels[i : i + 1]
        )
        model.zero_grad(set_to_none=True)
        answer_loss(model, one).backward()
        for k, p in params.items():
            if p.grad is not None:
                total[k] += p.grad.detach() ** 2 / n
    model.zero_grad(set_to_none=True)
    return total
