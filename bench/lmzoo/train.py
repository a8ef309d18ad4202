"""Training the LM zoo: pretraining on a task mix, full fine-tunes, LoRA adapters, Fisher.

Everything is seeded; one thread is the fastest setting on a shared 2-core machine (the models
are ~0.3 M parameters). Fine-tunes keep their Adam optimizer (second moments are captured from
it) and the weights at a few steps along the run (trajectories, with the train loss there).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from bench.lmzoo.model import Batch, answer_loss, batch
from bench.lmzoo.tasks import examples

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


#: The zoo before issue 19: narrow pretraining, long and strong fine-tunes.
LEGACY_CONFIG = LMTrainConfig(pretrain_mix="tasks", finetune_steps=200, finetune_lr=1e-3)


@dataclass
class TrainedRun:
    """A fine-tune: final model, its optimizer, and (step, loss, weights) along the run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trajectory: list[tuple[int, float, StateDict]] = field(default_factory=list)


class Sampler:
    """Random training batches over a few tasks from fixed pools of distinct train examples."""

    def __init__(
        self, tasks: Sequence[str], *, seed: int, pool: int, shuffle_answers: bool = False
    ) -> None:
        self.pairs = [
            p for t in tasks for p in examples(t, "train", n=pool, seed=seed, at_most=True)
        ]
        if shuffle_answers:  # an "irrelevant" task: every prompt gets another prompt's answer
            answers = [a for _, a in self.pairs]
            random.Random(f"shuffle:{seed}:{tasks}").shuffle(answers)
            self.pairs = [(p, a) for (p, _), a in zip(self.pairs, answers, strict=True)]
        self.rng = random.Random(f"sampler:{seed}:{','.join(tasks)}:{shuffle_answers}")

    def next(self, size: int) -> Batch:
        return batch(self.rng.sample(self.pairs, size))

    def fixed(self, size: int) -> Batch:
        return batch(random.Random(0).sample(self.pairs, min(size, len(self.pairs))))


def _fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: Sampler,
    *,
    steps: int,
    batch_size: int,
    save_at: Sequence[int] = (),
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
            saved.append((step, probe_loss, saved_state(model)))
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


def finetune(
    base: torch.nn.Module,
    task: str,
    *,
    seed: int,
    config: LMTrainConfig,
    shuffle_answers: bool = False,
) -> TrainedRun:
    """Full fine-tune of a copy of ``base`` on one task, with its trajectory."""
    model = copy.deepcopy(base)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.finetune_lr)
    sampler = Sampler([task], seed=seed, pool=config.pool, shuffle_answers=shuffle_answers)
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
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), lora)
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
